"""The FastAPI application: routers, error replies, request metrics, and the runtime's lifespan."""
from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.http.errors import CLIENT_CLOSED, RETRY_AFTER_SECONDS, STATUS, error_code, openai_error, status_of
from service.http.openai_routes import openai_router
from service.http.routes import admin_router, ops_router, tasks_router
from service.lora.adapter_files import BASE_LABEL
from service.runtime import Runtime
from service.settings import Settings

# health and readiness probes and metric scrapes are not work: not counted as requests in flight
NOT_IN_FLIGHT = frozenset({"/health", "/ready", "/metrics"})


def openai_shaped(request: Request) -> bool:
    """Whether replies to ``request`` take OpenAI's error shape: those on ``/v1/*``, where OpenAI's clients call."""
    return request.url.path.startswith("/v1/")


def error(request: Request, status: int, message: str, *, param: str | None = None, code: str | None = None,
          detail: list[dict] | None = None) -> JSONResponse:
    """An error reply: ``{"error": {"message", "type", "param", "code"}}`` on ``/v1/*`` (OpenAI's shape), else
    ``{"error": message}`` with pydantic's ``detail`` list, if given. 429 and 503 say when to retry."""
    if openai_shaped(request):
        body = openai_error(status, message, param, code)
    else:
        body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status,
                        headers={"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None)


def field_of(problem: dict) -> str | None:
    """The request field a validation problem is about, dotted (``messages.0.role``); None for the body itself."""
    where, *path = problem["loc"]
    return ".".join(map(str, path)) if where == "body" and path and isinstance(path[0], str) else None


def add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with a clear message (see ``error``); a domain error's status comes from ``STATUS``."""

    async def _domain(request: Request, exc: Exception):
        return error(request, status_of(type(exc)), str(exc), code=error_code(type(exc)))

    for kind in STATUS:
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        response = error(request, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = exc.errors()
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in problems)
        return error(request, 422, f"invalid request: {message}", param=field_of(problems[0]),
                     code=problems[0]["type"], detail=[encodable(e) for e in problems])


def is_json_scalar(value) -> bool:
    """Whether JSON can carry ``value`` as it is: a string, a finite number, true, false or null."""
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def encodable(problem: dict) -> dict:
    """One of pydantic's validation errors as a reply can always encode it: the ``input`` it echoes only when it is
    a JSON scalar (not NaN, infinity, bytes that are not UTF-8, or a whole object), ``ctx`` values as text."""
    kept = {key: problem[key] for key in ("type", "loc", "msg")}
    if "input" in problem and is_json_scalar(problem["input"]):
        kept["input"] = problem["input"]
    if "ctx" in problem:
        kept["ctx"] = {key: v if is_json_scalar(v) else str(v) for key, v in problem["ctx"].items()}
    return kept


class RequestMetrics:
    """ASGI middleware: request latency by route, adapter and status, from the request's arrival to the last byte of
    its reply (a streamed reply's end), and the requests in flight (not probes nor scrapes). A reply begun but not
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
                    endpoint=route.path, adapter=scope.get("state", {}).get("adapter", BASE_LABEL),
                    status=str(status if ended else CLIENT_CLOSED if status < 500 else status),
                ).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, rt: Runtime | None = None) -> FastAPI:
    """Build the app; the model loads in the background so /health and /ready answer at once."""
    rt = rt or Runtime(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not rt.ready.is_set():
            rt.start_in_background()
        yield
        rt.stop()

    app = FastAPI(title="loraswap", version="0.1.0", lifespan=lifespan)
    app.state.runtime = rt
    for router in (tasks_router, admin_router, openai_router, ops_router):
        app.include_router(router)
    add_error_handlers(app)
    app.add_middleware(RequestMetrics)
    return app
