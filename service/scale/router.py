"""The ingress of a scaled service: a Ray Serve deployment that takes every HTTP request and hands it to the loraswap
replicas (``service.scale.replica``) through their deployment handle.

- A request that runs the model goes to one replica, with its adapter (``routing.adapter_of``) as the multiplexed
  model id, so that Ray Serve prefers a replica that holds that adapter; its reply streams back as the replica sends
  it (server-sent events included), naming the replica in ``x-loraswap-replica``. Other requests (listings, probes,
  the API schema) go to any replica.
- A request that changes the adapters (``routing.changes_adapters``) goes to every replica (the handle's
  ``broadcast``); when they all answer alike, the reply is theirs and names them all, else a 502 says who answered
  what. One accepted by all is kept in the log of changes (``adapter_changes``), which a replica that was not live
  then applies before it serves.
- ``GET /metrics`` gathers every replica's metrics, each series labelled with its replica (``replica_metrics``).

The body limit and the error replies are loraswap's (``service.http.app``), so a request refused here looks as one
the replica refuses."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Message

from service.http.app import METHODS, BodyLimit, add_error_handlers, error
from service.scale.adapter_changes import ChangeLog
from service.scale.exchange import HttpReply, HttpRequest
from service.scale.replica_metrics import labelled
from service.scale.routing import REPLICA_HEADER, adapter_of, changes_adapters, default_adapters
from service.settings import Settings

log = logging.getLogger(__name__)
NONE_ANSWERED = "no replica answered: the service is starting, or its replicas failed"
NONE_ANSWERED_RETRY = 1  # Retry-After of that 503, seconds: replicas start, and Ray Serve replaces one that failed


@serve.ingress()
class Router:
    """The ingress deployment class (bound to the replicas' deployment handle and the service's settings)."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings):
        self.replicas, self.settings = replicas, settings
        self.defaults = default_adapters(settings)
        self.log = ChangeLog()

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls it once the replica is constructed
        app = FastAPI(title="loraswap scale", docs_url=None, redoc_url=None, openapi_url=None)  # the replicas' own
        app.add_api_route("/{path:path}", self.forward, methods=list(METHODS), include_in_schema=False)
        add_error_handlers(app)
        app.add_middleware(BodyLimit, max_bytes=self.settings.max_body_bytes)
        return app

    async def forward(self, request: Request) -> Response:
        """Hand ``request`` to one replica, to all of them, or gather their metrics (see the module)."""
        http = await HttpRequest.read(request)
        if changes_adapters(http.method, http.path):
            return await self.broadcast(request, http)
        if http.method == "GET" and http.path == "/metrics":
            return await self.metrics(request)
        adapter = adapter_of(http.method, http.path, http.body, self.defaults)
        routed = self.replicas.options(stream=True, multiplexed_model_id=adapter)
        return await relayed(routed.stream.remote(http, len(self.log)))

    async def broadcast(self, request: Request, http: HttpRequest) -> Response:
        """Send the change ``http`` to every replica; their common reply, or a 502 when they differ."""
        async with self.log.lock:
            replies: dict[str, HttpReply] = await self.everyone("change", http, len(self.log))
            self.log.record(http, [reply.status for reply in replies.values()])
        if not replies:
            return error(request, 503, NONE_ANSWERED, retry_after=NONE_ANSWERED_RETRY)
        statuses = {name: reply.status for name, reply in sorted(replies.items())}
        if len(set(statuses.values())) > 1:
            told = ", ".join(f"{name} {status}" for name, status in statuses.items())
            return error(request, 502, f"the replicas answered differently ({told}): their adapters may now differ "
                         "(/metrics shows each replica's); make the change again, or undo it")
        reply = replies[min(replies)]
        return whole(reply.status, [*reply.headers, replica_header(replies)], reply.body)

    async def everyone(self, method: str, *args) -> dict:
        """Call ``method`` with ``args`` on every live replica; their replies (name, reply), by name. A replica that
        fails to answer (it died meanwhile: Ray Serve replaces it, and the replacement catches up on the changes) is
        left out, and logged."""
        results = await self.replicas.broadcast(method, *args).results_async(return_exceptions=True)
        for failure in (result for result in results if isinstance(result, BaseException)):
            log.warning("a replica did not answer %s: %r", method, failure)
        return dict(result for result in results if not isinstance(result, BaseException))

    async def adapter_changes(self, start: int, end: int) -> list[HttpRequest]:
        """The admin changes numbered ``start`` up to ``end`` (excluded), for a replica catching up."""
        return self.log.between(start, end)

    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics, each series labelled with its replica."""
        texts = await self.everyone("metrics", len(self.log))
        if not texts:
            return error(request, 503, NONE_ANSWERED, retry_after=NONE_ANSWERED_RETRY)
        return whole(200, [(b"content-type", CONTENT_TYPE_LATEST.encode()), replica_header(texts)], labelled(texts))


def replica_header(replicas) -> tuple[bytes, bytes]:
    """``REPLICA_HEADER`` naming every replica of ``replicas`` (their names, in order, joined by commas)."""
    return REPLICA_HEADER.encode(), ",".join(sorted(replicas)).encode()


def whole(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    """A reply of ``body`` with ``headers`` (as ASGI has them) and its own Content-Length."""
    response = Response(body, status_code=status)
    response.raw_headers = [*(header for header in headers if header[0] != b"content-length"),
                            (b"content-length", str(len(body)).encode())]
    return response


async def relayed(messages: DeploymentResponseGenerator) -> Response:
    """The reply a replica streams as ASGI messages (``LoraswapReplica.stream``): whole when its body came in one
    message, else streamed on as it comes (the replica's call is cancelled should the client go away)."""
    start = await anext(messages)
    first = await anext(messages)
    headers = list(map(tuple, start.get("headers", ())))
    if not first.get("more_body", False):
        return whole(start["status"], headers, first.get("body", b""))
    response = StreamingResponse(bodies(first, messages), status_code=start["status"])
    response.raw_headers = headers
    return response


async def bodies(first: Message, messages: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The body of ``first`` and of each message after it; cancels the replica's call if closed before its end."""
    ended = False
    try:
        yield first.get("body", b"")
        async for message in messages:
            yield message.get("body", b"")
        ended = True
    finally:
        if not ended:
            messages.cancel()
