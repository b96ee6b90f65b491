"""The scale router's own error replies, without Ray: its class as Ray Serve wraps it, with a replicas handle that
reaches no replica."""
from __future__ import annotations

from fastapi.testclient import TestClient

from service.scale.router import NONE_ANSWERED, NONE_ANSWERED_RETRY, Router
from service.settings import Settings
from tests.server_helpers import ADMIN, ADMIN_KEY


class NoReplicas:
    """A replicas handle whose broadcasts no replica answers (all starting, or failed)."""

    def broadcast(self, method: str, *args):
        return self

    async def results_async(self, return_exceptions: bool) -> list:
        return []


def test_no_replica_answering_is_a_503_that_says_when_to_retry():
    """A 503 the service recovers from (replicas start; Ray Serve replaces a failed one): Retry-After 1, as when the
    rule was "every 503"; now each 503 says its own wait."""
    router = Router.__mro__[1](NoReplicas(), Settings(admin_key=ADMIN_KEY))  # the class @serve.ingress wraps
    client = TestClient(router.__serve_build_asgi_app__())
    for reply in (client.get("/metrics"), client.post("/adapters/unmerge", headers=ADMIN)):
        assert (reply.status_code, reply.json()) == (503, {"error": NONE_ANSWERED}), reply.text
        assert reply.headers["Retry-After"] == str(NONE_ANSWERED_RETRY) == "1"
