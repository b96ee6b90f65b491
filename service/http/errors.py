"""Errors to HTTP replies, in one table: the status of each domain error (``service.errors``), the replies the HTTP
layer makes itself, and the OpenAPI documentation of a route's error replies, derived from both."""
from __future__ import annotations

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
    401: "An admin route without the admin key.",
    403: "Admin routes are disabled: no admin key is set.",
    422: "An invalid request: a field missing, unknown, of the wrong type or out of range (NaN and infinities too).",
}


def status_of(kind: type[Exception]) -> int:
    """The HTTP status of a kind of domain error (StopIteration for one that is none)."""
    return next(STATUS[base] for base in kind.__mro__ if base in STATUS)


def error_replies(*errors: type[Exception] | int) -> dict:
    """OpenAPI ``responses`` for a route that may fail with ``errors``: domain error classes (described by their
    docstring's first line) and statuses of ``HTTP_REPLIES``; several of one status are listed together."""
    meanings: dict[int, list[str]] = {}
    for error in errors:
        status, meaning = (error, HTTP_REPLIES[error]) if isinstance(error, int) else (
            status_of(error), error.__doc__.strip().splitlines()[0])
        meanings.setdefault(status, []).append(meaning)
    return {status: {"model": ErrorOut, "description": " ".join(meanings[status])} for status in sorted(meanings)}
