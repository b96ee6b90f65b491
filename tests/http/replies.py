"""Reading error replies in the shape their route promises: OpenAI's on ``/v1/*``, ``{"error": message}`` elsewhere."""
from __future__ import annotations

import httpx

from service.settings import SETTING_WORD, Settings

OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "server_error"}


def error_message(reply: httpx.Response) -> str:
    """The message of an error reply, once its shape is checked: on ``/v1/*`` ``{"error": {"message", "type", "param",
    "code"}}`` (OpenAI's: type one of OpenAI's kinds, param and code a string or null), elsewhere ``{"error":
    message}`` (with pydantic's ``detail`` list on a 422)."""
    body = reply.json()
    if reply.request.url.path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        error = body["error"]
        assert error["type"] in OPENAI_TYPES and all(
            error[key] is None or isinstance(error[key], str) for key in ("param", "code")), body
        message = error["message"]
    else:
        assert set(body) <= {"error", "detail"}, body
        message = body["error"]
    assert isinstance(message, str) and message, body
    return message


def settings_by_field(message: str) -> list[str]:
    """The settings ``message`` names by their fields (``max_rank``), which no reply should: the server names them as
    its operator sets them (``Runtime.named``: ``--max-rank`` or ``LORASWAP_MAX_RANK``)."""
    return [word for word in SETTING_WORD.findall(message) if word in Settings.model_fields]
