"""The FastAPI application: routers, error replies, request metrics, and the runtime's lifespan."""
from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service import metrics
from service.http.errors import RETRY_AFTER_SECONDS, STATUS, status_of
from service.http.routes import admin_router, openai_router, ops_router, tasks_router
from service.lora.adapter_files import BASE_LABEL
from service.runtime import Runtime
from service.settings import Settings

# health and readiness probes and metric scrapes are not work: not counted as requests in flight
NOT_IN_FLIGHT = frozenset({"/health", "/ready", "/metrics"})


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status,
                        headers={"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with a clear ``error`` message; a domain error's status comes from ``STATUS``."""

    async def _domain(_: Request, exc: Exception):
        return error(status_of(type(exc)), str(exc))

    for kind in STATUS:
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, f"invalid request: {problems}", detail=[encodable(e) for e in exc.errors()])


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


def add_request_metrics(app: FastAPI) -> None:
    """Request latency by route, adapter and status, and the number of requests in flight (not probes)."""

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started = time.perf_counter()
        counted = request.url.path not in NOT_IN_FLIGHT
        if counted:
            metrics.REQUESTS_IN_FLIGHT.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if counted:
                metrics.REQUESTS_IN_FLIGHT.dec()
            route = request.scope.get("route")
            if route is not None and route.path != "/metrics":
                metrics.REQUEST_DURATION.labels(
                    endpoint=route.path, adapter=getattr(request.state, "adapter", BASE_LABEL), status=str(status)
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
    add_request_metrics(app)
    return app
