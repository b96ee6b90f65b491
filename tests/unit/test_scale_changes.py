"""Admin changes every replica applies in order (``service.scale.adapter_changes``): the router's log keeps what
every replica accepted; a replica behind fetches and applies what it lacks, once, before the call it serves. No Ray
needed: the app and the router are stand-ins that record what they are asked."""
from __future__ import annotations

import asyncio

from service.scale.adapter_changes import ChangeLog, Follower
from service.scale.exchange import HttpReply, HttpRequest


def change(path: str, method: str = "POST") -> HttpRequest:
    return HttpRequest(method, path, b"", (), b"{}")


def test_the_log_keeps_a_change_every_replica_accepted():
    log = ChangeLog()
    log.record(change("/adapters"), [201, 201])
    log.record(change("/adapters/x", "DELETE"), [200, 404])  # not every replica: not kept
    log.record(change("/adapters/y", "DELETE"), [])  # no replica answered
    log.record(change("/adapters/z/merge"), [200])
    assert [c.path for c in log.between(0, len(log))] == ["/adapters", "/adapters/z/merge"]
    assert [c.path for c in log.between(1, 2)] == ["/adapters/z/merge"]


class Replica:
    """A replica's app (every change it is sent, in order; answers ``status``) and a router holding ``logged``."""

    def __init__(self, logged: list[HttpRequest], status: int = 200):
        self.logged, self.status, self.applied, self.fetches = logged, status, [], []
        self.follower = Follower(self.apply, self.fetch)

    async def apply(self, request: HttpRequest) -> HttpReply:
        await asyncio.sleep(0)  # a change takes its time: another call may come meanwhile
        self.applied.append(request.path)
        return HttpReply(self.status, (), b"")

    async def fetch(self, start: int, end: int) -> list[HttpRequest]:
        self.fetches.append((start, end))
        return self.logged[start:end]


def test_a_replica_behind_applies_what_it_lacks_once_and_in_order():
    logged = [change(f"/adapters/{name}") for name in "abc"]
    replica = Replica(logged)

    async def calls():
        await asyncio.gather(*(replica.follower.catch_up(3) for _ in range(4)))  # calls at once, one catch-up
        await replica.follower.catch_up(2)  # an older call: nothing to do

    asyncio.run(calls())
    assert replica.applied == ["/adapters/a", "/adapters/b", "/adapters/c"]
    assert replica.fetches == [(0, 3)]
    assert replica.follower.applied == 3


def test_a_change_comes_after_every_change_before_it():
    logged = [change("/adapters/a"), change("/adapters/b")]
    replica = Replica(logged)
    reply = asyncio.run(replica.follower.change(change("/adapters/c"), 2))  # this replica missed a and b
    assert reply.status == 200
    assert replica.applied == ["/adapters/a", "/adapters/b", "/adapters/c"]
    assert replica.follower.applied == 3
    asyncio.run(replica.follower.catch_up(3))  # the router kept c: nothing is applied twice
    assert len(replica.applied) == 3


def test_a_change_refused_leaves_the_replica_where_it_was():
    replica = Replica([], status=409)
    asyncio.run(replica.follower.change(change("/adapters"), 0))
    assert replica.follower.applied == 0
