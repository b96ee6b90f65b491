"""The FastAPI application: routers, error replies, request metrics, and the runtime's lifespan."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import EngineStopped
from service.http.errors import (
    CLIENT_CLOSED,
    STATUS,
    Refused,
    echoable,
    echoable_message,
    error_code,
    error_replies,
    field_of,
    invalid_request,
    message_of,
    openai_error,
    status_of,
)
from service.http.openai_routes import openai_router
from service.http.routes import APP_DEPENDENCIES, admin_router, ops_router, tasks_router
from service.http.schemas import ErrorOut, OpenAIErrorOut
from service.runtime import Runtime
from service.settings import Settings, worded

# health and readiness probes and metric scrapes are not work: not counted as requests in flight
NOT_IN_FLIGHT = frozenset({"/health", "/ready", "/metrics"})
# the methods a 405's Allow header may name (HEAD wherever GET is: ``HeadAsGet``)
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# the adapter label of a request refused before it was valid with its adapter known (an invalid body, whichever check
# found its fault; an unknown adapter; a key missing, wrong or the other one; a body unreadable or too large), or on a
# route that runs no model; not an identifier, so never an adapter's name. A valid request whose adapter is known
# carries its adapter (``routes.bound``), whatever answers it (413 for a prompt too long, 429, 503, 499)
NO_ADAPTER_LABEL = "-"
# the 503's message to a request a forced stop cut short (``CutShort``)
FORCED_STOP = "the service is shutting down: a forced stop (Ctrl-C) cut the request short"


def openai_shaped(request: Request) -> bool:
    """Whether replies to ``request`` take OpenAI's error shape: those on ``/v1/*``, where OpenAI's clients call."""
    return request.url.path.startswith("/v1/")


def error(request: Request, status: int, message: str, *, param: str | None = None, code: str | None = None,
          detail: list[dict] | None = None, retry_after: int | None = None) -> JSONResponse:
    """An error reply: ``{"error": {"message", "type", "param", "code"}}`` on ``/v1/*`` (OpenAI's shape), else
    ``{"error": message}`` with pydantic's ``detail`` list, if given; with ``retry_after`` (whole seconds) a
    Retry-After header saying when to retry. The message and ``param`` are ``echoable`` (bounded, encodable), as
    whatever they quote of the request may not be."""
    message, param = echoable_message(message), param and echoable(param)
    if openai_shaped(request):
        body = openai_error(status, message, param, code)
    else:
        body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status,
                        headers=None if retry_after is None else {"Retry-After": str(retry_after)})


def unreadable(request: Request, reason: str) -> JSONResponse:
    """400: the body cannot be read as JSON (not UTF-8, not JSON, nested too deeply, a key twice in one object:
    ``json_body``), for ``reason``."""
    return error(request, 400, f"the body cannot be read as JSON: {reason}", code="json_invalid")


def allowed_methods(request: Request) -> str:
    """The Allow header of a 405 (RFC 9110 15.5.6): every method some route takes at the request's path, such as
    "GET, POST" for /adapters (Starlette's names only the methods of the first route whose path matched)."""
    routes = request.app.router.routes

    def taken(method: str) -> bool:
        return any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)

    return ", ".join(method for method in METHODS if taken("GET" if method == "HEAD" else method))


def domain_error(request: Request, exc: Exception, named: Callable[[str], str] = worded) -> JSONResponse:
    """The reply to ``request`` for the domain error ``exc``: its status from ``STATUS`` (``OPENAI_ERRORS`` on /v1),
    its Retry-After from its ``retry_after``, its message from ``message_of`` with ``named``."""
    openai = openai_shaped(request)
    return error(request, status_of(type(exc), openai), message_of(exc, named), code=error_code(type(exc), openai),
                 retry_after=getattr(exc, "retry_after", None))


def add_error_handlers(app: FastAPI, named: Callable[[str], str] = worded) -> None:
    """Every error is JSON with a clear message (see ``error``); a domain error's status comes from ``STATUS``, its
    Retry-After from its ``retry_after`` (``service.errors``: the transient ones' 429 and 503), its message from
    ``message_of`` with ``named`` (``Runtime.named``: the settings it names as the operator sets them)."""

    async def _domain(request: Request, exc: Exception):
        return domain_error(request, exc, named)

    for kind in STATUS:
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's: it could not parse the body
            cause = exc.__cause__
            return unreadable(request, "it is nested too deeply" if isinstance(cause, RecursionError) else str(cause))
        coded = isinstance(exc, Refused)
        response = error(request, exc.status_code, str(exc.detail), param=exc.param if coded else None,
                         code=exc.code if coded else None)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(request)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        if problems[0]["type"] == "json_invalid":  # FastAPI's: the body is not JSON
            return unreadable(request, f"{problems[0]['ctx']['error']} (at character {problems[0]['loc'][1]})")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if tuple(problems[0]["loc"]) == ("body",) and not (media == "application/json" or media.endswith("+json")):
            return error(request, 415, f"the body must be JSON, sent with Content-Type: application/json (got "
                                       f"{media or 'none'})", code="unsupported_media_type")
        request.state.adapter = NO_ADAPTER_LABEL  # invalid: no adapter's, whether a check past the schema found it
        message, detail = invalid_request(problems)
        return error(request, 422, message, param=field_of(detail[0]), code=problems[0]["type"], detail=detail)


class RequestMetrics:
    """ASGI middleware: request latency by route, adapter (the one the request was bound to; ``none``: the bare base
    model; ``NO_ADAPTER_LABEL``: none, or an invalid request) and status, from the request's arrival to the last byte
    of its reply (a streamed reply's end), and the requests in flight (not probes nor scrapes). A reply begun but not
    ended (a streamed reply whose client went away) is recorded as status 499, as a request whose client went away
    before its reply (``ClientGone``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, counted = time.perf_counter(), scope["path"] not in NOT_IN_FLIGHT
        status, ended = 500, False

        async def observed(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        if counted:
            metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, observed)
        finally:
            if counted:
                metrics.REQUESTS_IN_FLIGHT.dec()
            route = scope.get("route")
            if route is not None and route.path != "/metrics":
                metrics.REQUEST_DURATION.labels(
                    endpoint=route.path, adapter=scope.get("state", {}).get("adapter", NO_ADAPTER_LABEL),
                    status=str(status if ended else CLIENT_CLOSED if status < 500 else status),
                ).observe(time.perf_counter() - started)


class CutShort:
    """ASGI middleware: a request whose task is cancelled (only the server cancels one: a forced stop,
    ``server.DrainingServer.cut_short``) is answered, where its reply has not begun, with a 503 in its route's error
    shape (EngineStopped, ``FORCED_STOP``, without Retry-After: the server is going away), not uvicorn's plain-text
    500 'Internal Server Error' and a traceback; a reply begun (a stream's) ends as it is, its connection closed by
    the server."""

    def __init__(self, app: ASGIApp, named: Callable[[str], str] = worded):
        self.app, self.named = app, named

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        begun = False

        async def watched(message: Message) -> None:
            nonlocal begun
            begun = begun or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if not begun:
                await domain_error(Request(scope), EngineStopped(FORCED_STOP), self.named)(scope, receive, send)


class CloseWhileDraining:
    """ASGI middleware: while the service drains (``Runtime.draining``), every reply says ``Connection: close`` (RFC
    9112 9.6), and the server closes the connection once it is sent: its client sends its next request on a new
    connection, which the server refuses once it stops listening, so the client knows it was not taken. On a
    connection kept alive, a request sent as the drain ended met the server closing it and was lost with no reply (a
    review: httpx's ReadError, one request in each of 3 runs, sent ~1 s after SIGTERM as ``--drain-seconds 1`` ran
    out)."""

    def __init__(self, app: ASGIApp, rt: Runtime):
        self.app, self.rt = app, rt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.rt.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class HeadAsGet:
    """ASGI middleware: a HEAD request is answered as its GET would be, without the body (RFC 9110 9.3.2): the same
    status and headers, Content-Length included. FastAPI's routes take no HEAD (only Starlette's own, such as /docs,
    did), so a load balancer's ``HEAD /health`` or ``curl -I`` got a 405. The request runs as a GET (every GET route
    only reads) in a copy of its scope: the server reads the scope's method once the reply is sent (uvicorn expects
    the whole Content-Length of a GET), so this middleware is the outermost of the app's (``RequestMetrics`` reads
    the route from the copy). A path no GET route takes answers HEAD as it answers GET (a 405 naming the methods it
    takes). The OpenAPI schema lists GET only (HEAD is implied)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b""})

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused (413) before it is read whole: before a byte of
    it is read when its Content-Length says so, else at the chunk that passes the limit. The refusal is raised where
    the route reads the body, so it takes the route's error shape (``error``). (Starlette's RequestBodyLimitMiddleware
    answers such a body in plain text, whatever the route.) The refusal names the setting as ``named`` does
    (``Runtime.named``: as the operator sets it)."""

    def __init__(self, app: ASGIApp, max_bytes: int, named: Callable[[str], str] = worded):
        self.app, self.max_bytes, self.named = app, max_bytes, named

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")  # Latin-1: only 0-9 are decimal
        over, read = declared.isdecimal() and int(declared) > self.max_bytes, 0

        async def limited() -> Message:
            nonlocal read
            if not over:
                message = await receive()
                if message["type"] == "http.request":
                    read += len(message.get("body", b""))
                if read <= self.max_bytes:
                    return message
            raise HTTPException(413, self.named(f"the request body is larger than this server takes: {self.max_bytes} "
                                           "bytes (its max_body_bytes)"))

        await self.app(scope, limited, send)


def create_app(settings: Settings | None = None, rt: Runtime | None = None) -> FastAPI:
    """Build the app; the model loads in the background so /health and /ready answer at once."""
    rt = rt or Runtime(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not rt.ready.is_set():
            rt.start_in_background()
        try:
            yield
        except asyncio.CancelledError:  # a forced stop's end (server.cut_short): not waited for, nor a traceback
            return
        rt.stop()

    # redirect_slashes off: a path with a trailing slash is unknown (a JSON 404), not Starlette's empty 307 to the
    # path without it, which a client may follow with another method, or not at all
    app = FastAPI(title="loraswap", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  dependencies=[Depends(dependency) for dependency in APP_DEPENDENCIES])
    app.state.runtime = rt
    every_route = sorted({status for statuses in APP_DEPENDENCIES.values() for status in statuses})
    for router in (tasks_router, admin_router, openai_router, ops_router):  # each route's replies listed: theirs too
        shape = OpenAIErrorOut if router is openai_router else ErrorOut
        app.include_router(router, responses=error_replies(*every_route, shape=shape))
    add_error_handlers(app, rt.named)
    app.add_middleware(BodyLimit, max_bytes=rt.settings.max_body_bytes, named=rt.named)
    app.add_middleware(CutShort, named=rt.named)
    app.add_middleware(RequestMetrics)
    app.add_middleware(CloseWhileDraining, rt=rt)
    app.add_middleware(HeadAsGet)  # the outermost: what the server sees stays a HEAD
    return app
