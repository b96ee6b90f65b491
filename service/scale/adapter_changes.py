"""Admin changes (register, unregister, merge, unmerge) reach every replica, in order, also one that starts or
restarts after them. The router sends each change to every live replica with its number in the ``ChangeLog``, and
keeps it there once every replica accepted it; every call it makes tells the replica how many changes the log holds.
A replica behind (``Follower``: one that was not live when a change went out) first fetches the changes it lacks
from the router and applies them, in order, before it serves the call."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from service.scale.exchange import HttpReply, HttpRequest

log = logging.getLogger(__name__)


class ChangeLog:
    """The router's record of the admin changes every replica accepted, in the order they were made. Changes are
    made one at a time (``lock``), so that their numbers are their places in the log. It grows by one small request
    per change (about a kilobyte) for as long as the router lives."""

    def __init__(self) -> None:
        self.changes: list[HttpRequest] = []
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.changes)

    def between(self, start: int, end: int) -> list[HttpRequest]:
        """The changes numbered ``start`` up to ``end`` (excluded)."""
        return self.changes[start:end]

    def record(self, change: HttpRequest, statuses: list[int]) -> None:
        """Keep ``change`` (the next number) if every replica accepted it (``statuses``: their replies', all 2xx)."""
        if statuses and all(200 <= status < 300 for status in statuses):
            self.changes.append(change)


class Follower:
    """A replica's side: ``applied``, how many changes of the router's log it has applied; ``apply`` sends one to its
    app, ``fetch(start, end)`` gets changes numbered ``start`` to ``end`` from the router."""

    def __init__(self, apply: Callable[[HttpRequest], Awaitable[HttpReply]],
                 fetch: Callable[[int, int], Awaitable[list[HttpRequest]]]):
        self.apply, self.fetch = apply, fetch
        self.applied = 0
        self.lock = asyncio.Lock()  # one catch-up or change at a time, in the log's order

    async def catch_up(self, logged: int) -> None:
        """Apply the changes numbered ``applied`` up to ``logged`` (the log's length when the router made the call)."""
        if self.applied >= logged:
            return
        async with self.lock:
            await self._replay(logged)

    async def _replay(self, logged: int) -> None:
        if self.applied >= logged:  # another call caught up meanwhile
            return
        for number, change in enumerate(await self.fetch(self.applied, logged), start=self.applied):
            reply = await self.apply(change)
            log.info("caught up with admin change %d, %s %s: %d", number, change.method, change.path, reply.status)
        self.applied = logged

    async def change(self, change: HttpRequest, number: int) -> HttpReply:
        """Apply ``change``, number ``number`` of the log, after every change before it."""
        async with self.lock:
            await self._replay(number)
            reply = await self.apply(change)
            if 200 <= reply.status < 300:
                self.applied = max(self.applied, number + 1)
        return reply
