"""Errors to HTTP replies, in one table: the status of each domain error (``service.errors``), the replies the HTTP
layer makes itself, and the OpenAPI documentation of a route's error replies, derived from both. On ``/v1/*`` a reply
takes OpenAI's shape, its ``type`` derived from the status and its ``code`` from the domain error's class. What a reply
echoes of the request is bounded and always encodable (``echoable``)."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from fastapi import HTTPException

from service.errors import (
    AdapterConflict,
    AdapterError,
    AdapterPathMissing,
    AdapterPathRefused,
    EngineStopped,
    InputTooLong,
    NoFreeSlot,
    NoRoomForAdapter,
    NoSpan,
    QueueFull,
    RenderUnavailable,
    TemplateRefused,
    UnknownAdapter,
)
from service.http.schemas import ErrorOut, OpenAIErrorOut
from service.settings import variable, worded
from service.strict_json import PAST_ANY_BOUND

CLIENT_CLOSED = 499  # nginx's "client closed request": recorded in the metrics, never received by anyone
ECHO_LIMIT = 200  # characters of one value of the request a reply echoes: a field's input, a key in its location
MESSAGE_LIMIT = 2000  # characters of a reply's message (a domain error's may quote a name the request sent)
LISTED_PROBLEMS = 10  # validation problems a 422 lists (its message says how many more there were)


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


class Refused(HTTPException):
    """An error reply the HTTP layer makes, with a ``code`` saying what kind of fault it is (OpenAI's, on ``/v1/*``)
    and the request field it is traced to, if any (``param``)."""

    def __init__(self, status: int, detail: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.param, self.code = param, code


class FieldRefused(Refused):
    """An error reply the HTTP layer makes for a fault traced to one request field, which the reply names (OpenAI's
    ``param``, on ``/v1/*``)."""

    def __init__(self, status: int, detail: str, param: str, code: str):
        super().__init__(status, detail, code, param)


# a domain error's status is that of the first of its classes (itself, then its bases) found here
STATUS: dict[type[Exception], int] = {
    UnknownAdapter: 404,
    AdapterPathMissing: 404,
    AdapterPathRefused: 403,
    AdapterConflict: 409,
    NoFreeSlot: 503,
    NoRoomForAdapter: 507,  # RFC 4918's Insufficient Storage: the server cannot store what the request needs stored
    AdapterError: 422,
    InputTooLong: 413,
    NoSpan: 422,
    TemplateRefused: 422,
    RenderUnavailable: 503,  # transient, as NoFreeSlot and EngineStopped: sent with Retry-After (their retry_after)
    QueueFull: 429,
    EngineStopped: 503,
    ClientGone: CLIENT_CLOSED,
}
# on /v1/*, the status and code of a domain error where OpenAI's API gives another than the table above (and than
# ``error_code``): an unknown model is its 404 ``model_not_found``; a prompt past the context its 400
# ``context_length_exceeded``, as vLLM's too, which OpenAI's Python client raises as BadRequestError (a 413 was an
# APIStatusError of no kind). /answer and /nli keep the table's (404 ``unknown_adapter``, 413 ``input_too_long``)
OPENAI_ERRORS: dict[type[Exception], tuple[int, str]] = {UnknownAdapter: (404, "model_not_found"),
                                                           InputTooLong: (400, "context_length_exceeded")}

# the replies the HTTP layer makes itself: bodies it cannot parse or validate, and admin authorization
HTTP_REPLIES = {
    400: "Authorization or Content-Type sent more than once (on any route), or a body that cannot be parsed (not JSON, "
         "not UTF-8, nested too deeply, or naming a key twice in one object).",
    401: "A route that needs a key without it, or with a wrong one (the message says which): the admin key on admin "
         "routes, the API key (when one is set) on the routes that run the model, on GET /v1/models and on GET "
         "/adapters (which takes either).",
    403: "The server's other key sent (the API key to an admin route, the admin key to a route that needs the API "
         "key), or admin routes disabled: no admin key is set.",
    413: f"A request body larger than the server takes (its body limit: --max-body-bytes, "
         f"{variable('max_body_bytes')}).",
    415: "A body sent with another Content-Type than application/json, or compressed (a Content-Encoding).",
    422: "An invalid request: a field missing, unknown, of the wrong type or out of range (NaN and infinities too), "
         "or messages the chat template cannot render.",
}


def status_of(kind: type[Exception], openai: bool = False) -> int:
    """The HTTP status of a kind of domain error (StopIteration for one that is none); ``openai``: on ``/v1/*``, where
    ``OPENAI_ERRORS`` gives its own."""
    if openai and kind in OPENAI_ERRORS:
        return OPENAI_ERRORS[kind][0]
    return next(STATUS[base] for base in kind.__mro__ if base in STATUS)


def request_fault(kind: type[Exception]) -> bool:
    """Whether an error of ``kind`` is the request's fault, which a request field can be: a 4xx, but a 429 (a queue
    full passes: the same request succeeds later) and a client gone (``CLIENT_CLOSED``). A 5xx is the server's."""
    return 400 <= status_of(kind) < 500 and status_of(kind) not in (429, CLIENT_CLOSED)


def param_of(exc: Exception, fields: Mapping[type[Exception], str]) -> str | None:
    """The request field ``fields`` traces ``exc`` to: that of the first of its classes (itself, then its bases)
    found there, as ``status_of`` finds a status; None when none is, or when ``exc`` is not the request's fault
    (``request_fault``: NoFreeSlot, a 503, is an AdapterError, which vLLM's load route traces to ``lora_path``)."""
    if not request_fault(type(exc)):
        return None
    return next((fields[base] for base in type(exc).__mro__ if base in fields), None)


def message_of(exc: Exception, named: Callable[[str], str]) -> str:
    """A domain error's message as a reply says it: each setting it names (its ``settings``: ``NamesSettings``) named
    by ``named``, the runtime's (``Runtime.named``: as the server's operator sets it), never by its field."""
    return worded(str(exc), named, getattr(exc, "settings", ()))


@contextmanager
def blaming(fields: Mapping[type[Exception], str], named: Callable[[str], str]) -> Iterator[None]:
    """Within: a domain error that ``fields`` traces to one request field (``param_of``: of a kind there, and the
    request's fault) is raised as a FieldRefused naming that field (OpenAI's ``param``), with the status and code it
    has and its message as ``message_of`` says it with ``named``; others pass as they are, a 5xx or a 429 with its
    Retry-After (a review: NoFreeSlot, an AdapterError, was a 503 without one, blaming ``lora_path``). ``fields``
    maps kinds to the field at fault, such as UnknownAdapter to ``model``. For the routes under ``/v1`` (its only
    users): the status and code are OpenAI's (``OPENAI_ERRORS``)."""
    try:
        yield
    except tuple(fields) as exc:
        param = param_of(exc, fields)
        if param is None:
            raise
        kind = type(exc)
        raise FieldRefused(status_of(kind, openai=True), message_of(exc, named), param,
                           error_code(kind, openai=True)) from None


def openai_type(status: int) -> str:
    """The ``type`` of an OpenAI-shaped error reply of ``status``, as OpenAI's API names its kinds of error."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An error reply's body in OpenAI's shape (see ``OpenAIErrorOut``)."""
    return {"error": {"message": message, "type": openai_type(status), "param": param, "code": code}}


def error_code(kind: type[Exception], openai: bool = False) -> str:
    """The ``code`` of an error reply for a domain error: its class name in snake case (UnknownAdapter:
    "unknown_adapter"); ``openai``: on ``/v1/*``, where ``OPENAI_ERRORS`` gives OpenAI's own ("model_not_found")."""
    if openai and kind in OPENAI_ERRORS:
        return OPENAI_ERRORS[kind][1]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind.__name__).lower()


def error_replies(*errors: type[Exception] | int, shape: type = ErrorOut) -> dict:
    """OpenAPI ``responses`` for a route that may fail with ``errors``: domain error classes (described by their
    docstring's first line) and statuses of ``HTTP_REPLIES``; several of one status are listed together. ``shape``:
    the reply body's model (``OpenAIErrorOut`` on ``/v1/*``, whose statuses are OpenAI's: ``OPENAI_ERRORS``)."""
    meanings: dict[int, list[str]] = {}
    for error in errors:
        status, meaning = (error, HTTP_REPLIES[error]) if isinstance(error, int) else (
            status_of(error, openai=shape is OpenAIErrorOut), error.__doc__.strip().splitlines()[0])
        meanings.setdefault(status, []).append(meaning)
    return {status: {"model": shape, "description": " ".join(meanings[status])} for status in sorted(meanings)}


def echoable(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error reply can always carry it: at most ``limit`` characters of it (its start and its end,
    saying how many were cut between), and each lone surrogate, which UTF-8 cannot encode, spelled as its escape
    (``\\ud800``)."""
    if len(text) > limit:
        head, tail = limit // 2, limit - limit // 2
        text = f"{text[:head]}...[{len(text) - limit} characters cut]...{text[len(text) - tail:]}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def echoable_message(message: str) -> str:
    """An error reply's message as it can always carry it: each run of more than ``ECHO_LIMIT`` characters without a
    space (what the request sent: a name, a path, a value) ``echoable``, then the whole at most ``MESSAGE_LIMIT``."""
    runs_cut = re.sub(rf"\S{{{ECHO_LIMIT + 1},}}", lambda run: echoable(run.group()), message)
    return echoable(runs_cut, MESSAGE_LIMIT)


def is_json_scalar(value) -> bool:
    """Whether JSON can carry ``value`` as it is: a string, a finite number, true, false or null."""
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def echoed(value):
    """A JSON scalar of the request as a reply echoes it: a string ``echoable``, an integer of more than
    ``ECHO_LIMIT`` digits as its digits ``echoable`` (a string), one of more than Python converts (read as
    ``strict_json.PAST_ANY_BOUND``) said in words, other scalars as they are."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) == PAST_ANY_BOUND:
            return f"{'a negative' if value < 0 else 'an'} integer of {len(str(PAST_ANY_BOUND))} digits or more"
        if len(digits := str(value)) > ECHO_LIMIT:
            return echoable(digits)
    return echoable(value) if isinstance(value, str) else value


def encodable(problem: dict) -> dict:
    """One of pydantic's validation errors as a reply can always encode it: the ``input`` it echoes only when it is
    a JSON scalar (not NaN, infinity, bytes that are not UTF-8, or a whole object), ``ctx`` values as text; every
    string that comes from the request (input, keys in ``loc``) ``echoable``."""
    kept = {"type": problem["type"], "loc": [echoed(part) for part in problem["loc"]],
            "msg": echoable_message(problem["msg"])}
    if "input" in problem and is_json_scalar(problem["input"]):
        kept["input"] = echoed(problem["input"])
    if "ctx" in problem:
        kept["ctx"] = {key: echoed(v if is_json_scalar(v) else str(v)) for key, v in problem["ctx"].items()}
    return kept


def field_of(problem: dict) -> str | None:
    """The request field a validation problem is about, dotted (``messages.0.role``); None for the body itself."""
    where, *path = problem["loc"]
    return ".".join(map(str, path)) if where == "body" and path and isinstance(path[0], str) else None


def invalid_request(problems: list[dict]) -> tuple[str, list[dict]]:
    """The message of a 422 (each problem's location and message) and its ``detail`` list: the first
    ``LISTED_PROBLEMS`` of pydantic's ``problems``, ``encodable``."""
    listed = [encodable(problem) for problem in problems[:LISTED_PROBLEMS]]
    message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in listed)
    more = f"; and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
    return f"invalid request: {message}{more}", listed
