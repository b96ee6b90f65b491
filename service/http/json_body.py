"""Request bodies read as JSON whose objects name each key once (``service.strict_json``): a body such as
``{"adapter": "squad", "adapter": "nli"}`` is refused (400 naming the key), never served with one of its values picked
silently. A client that goes away before its body's end is recorded as one that went away (499), not as a body
that cannot be parsed (FastAPI's 400)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from service import strict_json
from service.http.errors import CLIENT_CLOSED


async def whole_body(request: Request) -> bytes:
    """``request``'s body, read to its end; HTTPException(CLIENT_CLOSED) when its client went away before that end
    (the reply then goes nowhere, and the metrics record the request as 499)."""
    try:
        return await Request.body(request)
    except ClientDisconnect:
        raise HTTPException(CLIENT_CLOSED, "the client went away while sending the body") from None


class UniqueKeysRequest(Request):
    async def body(self) -> bytes:
        return await whole_body(self)

    async def json(self) -> Any:
        """The body read as JSON (UTF-8, UTF-16 or UTF-32, as ``json.loads`` reads bytes); RepeatedKey (a
        ValueError) for an object that holds a key twice, json.JSONDecodeError for text that is not JSON."""
        if not hasattr(self, "_json"):
            self._json = strict_json.loads(await self.body())
        return self._json


class UniqueKeysRoute(APIRoute):
    """A FastAPI route whose JSON body is read by ``UniqueKeysRequest`` (FastAPI's "custom Request and APIRoute
    class" pattern). FastAPI answers its ValueError as a 400 (``app.add_error_handlers`` keeps the reason). An empty
    body where the route requires one is a 400 as well (FastAPI took it for a body not sent: 422 "Field required"),
    as no JSON text is empty; a body sent compressed (a Content-Encoding but identity) is a 415 (RFC 9110 15.5.16),
    where it was read as if it were not (a review: gzip's bytes were a 400, a plain body so labelled served). On a
    route that acts on its request (any method but GET), a query parameter the route does not take is a 422 naming it
    (``unknown_query``), as an unknown body field is: a review's ``POST /answer?adapter=nli`` was served by the default
    adapter, the parameter dropped without a word. A GET reads nothing from its request, and a probe or a scrape
    configured with parameters is answered as ever."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        required = self.body_field is not None and self.body_field.field_info.is_required()
        taken = query_names(self.dependant)

        async def unique_keys_handler(request: Request) -> Response:
            request = UniqueKeysRequest(request.scope, request.receive)
            if request.method != "GET":
                unknown_query(request, taken)
            codings = [coding.strip().lower() for header in request.headers.getlist("content-encoding")
                       for coding in header.split(",") if coding.strip()]  # every header, each a list (RFC 9110 5.3)
            coded = [coding for coding in codings if coding != "identity"]
            if self.body_field is not None and coded:
                raise HTTPException(415, f"the body must be sent as it is: Content-Encoding {coded[0]} is not taken")
            if required and not await request.body():
                raise HTTPException(400, "empty body") from ValueError("the body is empty")
            return await handler(request)

        return unique_keys_handler


def query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route reads: its endpoint's and its dependencies' (FastAPI's ``Dependant`` tree)."""
    return {param.alias for param in dependant.query_params}.union(*map(query_names, dependant.dependencies))


def unknown_query(request: Request, taken: set[str]) -> None:
    """RequestValidationError (422), one problem per query parameter of ``request`` not in ``taken`` (the names its
    route reads), in pydantic's words for an unknown body field (``extra_forbidden``) at ``("query", name)``."""
    unknown = {name: value for name, value in request.query_params.multi_items() if name not in taken}  # once each
    if unknown:
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("query", name), "input": value,
                                       "msg": "Extra inputs are not permitted"} for name, value in unknown.items()])
