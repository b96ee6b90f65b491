"""Errors to HTTP replies, in one table: the status of each domain error (``service.errors``), the replies the HTTP
layer makes itself, and the OpenAPI documentation of a route's error replies, derived from both. On ``/v1/*`` a reply
takes OpenAI's shape, its ``type`` derived from the status and its ``code`` from the domain error's class."""
from __future__ import annotations

import re

from service.errors import (
    AdapterConflict,
    AdapterError,
    AdapterPathMissing,
    AdapterPathRefused,
    EngineStopped,
    InputTooLong,
    NoFreeSlot,
    QueueFull,
    UnknownAdapter,
)
from service.http.schemas import ErrorOut

CLIENT_CLOSED = 499  # nginx's "client closed request": recorded in the metrics, never received by anyone
RETRY_AFTER_SECONDS = "1"  # sent with every 429 and 503


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


# a domain error's status is that of the first of its classes (itself, then its bases) found here
STATUS: dict[type[Exception], int] = {
    UnknownAdapter: 404,
    AdapterPathMissing: 404,
    AdapterPathRefused: 403,
    AdapterConflict: 409,
    NoFreeSlot: 503,
    AdapterError: 422,
    InputTooLong: 413,
    QueueFull: 429,
    EngineStopped: 503,
    ClientGone: CLIENT_CLOSED,
}

# the replies the HTTP layer makes itself: bodies it cannot parse or validate, and admin authorization
HTTP_REPLIES = {
    400: "A body that cannot be parsed (not JSON, not UTF-8, or nested too deeply).",
    401: "A route that needs a key without it: the admin key on admin routes, the API key (when one is set) on the "
         "routes that run the model.",
    403: "Admin routes are disabled: no admin key is set.",
    422: "An invalid request: a field missing, unknown, of the wrong type or out of range (NaN and infinities too), "
         "or messages the chat template cannot render.",
}


def status_of(kind: type[Exception]) -> int:
    """The HTTP status of a kind of domain error (StopIteration for one that is none)."""
    return next(STATUS[base] for base in kind.__mro__ if base in STATUS)


def openai_type(status: int) -> str:
    """The ``type`` of an OpenAI-shaped error reply of ``status``, as OpenAI's API names its kinds of error."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An error reply's body in OpenAI's shape (see ``OpenAIErrorOut``)."""
    return {"error": {"message": message, "type": openai_type(status), "param": param, "code": code}}


def error_code(kind: type[Exception]) -> str:
    """The ``code`` of an OpenAI-shaped reply for a domain error: its class name in snake case (UnknownAdapter:
    "unknown_adapter")."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind.__name__).lower()


def error_replies(*errors: type[Exception] | int, shape: type = ErrorOut) -> dict:
    """OpenAPI ``responses`` for a route that may fail with ``errors``: domain error classes (described by their
    docstring's first line) and statuses of ``HTTP_REPLIES``; several of one status are listed together. ``shape``:
    the reply body's model (``OpenAIErrorOut`` on ``/v1/*``)."""
    meanings: dict[int, list[str]] = {}
    for error in errors:
        status, meaning = (error, HTTP_REPLIES[error]) if isinstance(error, int) else (
            status_of(error), error.__doc__.strip().splitlines()[0])
        meanings.setdefault(status, []).append(meaning)
    return {status: {"model": shape, "description": " ".join(meanings[status])} for status in sorted(meanings)}
