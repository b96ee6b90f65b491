"""One HTTP exchange carried between Ray Serve deployments: the request as plain, picklable data (``HttpRequest``), and
an ASGI application called in process with it (``exchange``), its reply handed out message by message as the
application sends them, so that a streamed reply (server-sent events) streams on.

An in-process ASGI call instead of an HTTP hop: the replica runs loraswap's own FastAPI app on the request as
uvicorn would, middleware, validation and error replies included. (httpx's ASGITransport would do, but it reads
a streamed reply whole before handing any of it out.)"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message

from service.http.json_body import whole_body

log = logging.getLogger(__name__)

# how long an application whose client went away has to see the http.disconnect before it is cancelled (s)
DISCONNECT_GRACE_S = 1.0


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request as data: ``headers`` as ASGI has them (lower-case names, Latin-1 bytes), the whole ``body``."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None

    @classmethod
    async def read(cls, request: Request) -> HttpRequest:
        """``request`` with its body read whole (a body limit is the application's middleware's to enforce);
        HTTPException(499) when its client went away before the body's end (``json_body.whole_body``)."""
        client = (request.client.host, request.client.port) if request.client else None
        return cls(request.method, request.url.path, request.scope.get("query_string", b""),
                   tuple(request.scope["headers"]), await whole_body(request), client)

    def scope(self) -> dict:
        """The ASGI HTTP scope of this request, as a server on loopback would give it."""
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": ("127.0.0.1", 0), "state": {}}


@dataclass(frozen=True)
class HttpReply:
    """A whole reply: its status, headers (as ASGI has them) and body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


async def exchange(app: ASGIApp, request: HttpRequest) -> AsyncIterator[Message]:
    """Call ``app`` with ``request``; yield the messages it sends (``http.response.start``, then
    ``http.response.body`` ones, the last without ``more_body``). Closing the iterator early (the client went away)
    tells the application so (``http.disconnect``), as a server would, and cancels it after ``DISCONNECT_GRACE_S``.
    Raises what the application raised before its reply was complete; logs what it raised after (Starlette sends
    its 500, then raises for the server to log, as uvicorn does)."""
    sent: asyncio.Queue[Message] = asyncio.Queue()
    gone, read = asyncio.Event(), False

    async def receive() -> Message:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task, complete = asyncio.ensure_future(app(request.scope(), receive, sent.put)), False
    try:
        async for message in _until_done(sent, task):
            yield message
        complete = True
    finally:
        gone.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        task.cancel()
        if complete and task.done() and not task.cancelled() and task.exception() is not None:
            log.error("the application failed on %s %s", request.method, request.path, exc_info=task.exception())


async def _until_done(sent: asyncio.Queue[Message], task: asyncio.Future) -> AsyncIterator[Message]:
    """The messages ``task`` sends, up to the last of its reply's body."""
    while True:
        if sent.empty() and task.done():  # the application returned (or raised) with its reply incomplete
            task.result()
            raise RuntimeError("the application returned before its reply was complete")
        if sent.empty():
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            message = getter.result()
        else:
            message = sent.get_nowait()
        yield message
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            return


async def collected(app: ASGIApp, request: HttpRequest) -> HttpReply:
    """``app``'s whole reply to ``request``."""
    status, headers, body = 500, (), bytearray()
    async for message in exchange(app, request):
        if message["type"] == "http.response.start":
            status, headers = message["status"], tuple(map(tuple, message.get("headers", ())))
        else:
            body += message.get("body", b"")
    return HttpReply(status, headers, bytes(body))
