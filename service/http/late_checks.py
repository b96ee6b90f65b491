"""The checks of a request's fields that its schema cannot make, named in one 422 with the schema's.

Some checks need what only the route has: the adapter it picks (``prompt_style`` needs a chat template, the adapter's
or the base's), the tokenizer (``/nli``'s own ``labels``), a render of the chat template (``messages``, a chat style's
prompt). They ran once the schema had passed the whole body, so a request with several faults was refused for some,
and its client, fixing them, met the next (a review). Now a route's late checks (``LateChecks``) run on the fields the
schema found valid, whatever its other fields: where the body is valid, in the route (``LateChecks.run``); where it is
not, as FastAPI refuses it (``LateCheckedRoute``), each check whose fields are all valid adding its faults to the
schema's, in one 422 in the order of the fields."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter

from service.errors import EngineStopped, InputTooLong, QueueFull, RenderUnavailable, TemplateRefused, UnknownAdapter
from service.http.errors import error_code
from service.http.json_body import UniqueKeysRoute
from service.lora.adapter_files import AdapterWeights

# the refusals a check may meet that are no fault of a field (the prompt's size, the server's state): they answer a
# request whose fields are all valid, and give way to a 422
REFUSALS = (InputTooLong, QueueFull, RenderUnavailable, EngineStopped)


class LateProblems(RequestValidationError):
    """The 422 of a late check: the faults it found, each one of pydantic's validation errors (``problem``)."""


def problem(field: str, value: Any, kind: str, message: str) -> dict:
    """A fault of the request field ``field`` at ``value``, as pydantic words one (``kind``: its type, a code)."""
    return {"type": kind, "loc": ("body", field), "msg": message, "input": value}


def refused(field: str, value: Any, exc: ValueError) -> LateProblems:
    """The 422 of ``field`` refused at ``value`` with ``exc`` (a ValueError, as pydantic words one)."""
    return LateProblems([problem(field, value, "value_error", f"Value error, {exc}")])


def template_refused(field: str, value: Any, exc: TemplateRefused) -> LateProblems:
    """The 422 of ``field``, at ``value``, whose render the chat template refused (``exc``): code template_refused."""
    return LateProblems([problem(field, value, error_code(TemplateRefused), str(exc))])


# a late check: (the request, the runtime, the body, the adapter's weights, None for the bare base) -> what the route
# uses of it; raises LateProblems for the faults it finds, and may raise one of REFUSALS
Check = Callable[[Request, Any, BaseModel, AdapterWeights | None], Awaitable[Any]]


@dataclass(frozen=True)
class LateChecks:
    """A route's late checks. ``model``: its body; ``adapter_field``: the field that names its adapter (``adapter``,
    ``model``), and ``adapter``: the weights of the adapter a body asks for, (runtime, body) -> weights, None for
    the bare base, as the route picks them (UnknownAdapter for a name unknown); ``checks``: each (the fields it
    reads, the check), in the order of the fields they name."""

    model: type[BaseModel]
    adapter_field: str
    adapter: Callable[[Any, BaseModel], AdapterWeights | None]
    checks: Sequence[tuple[tuple[str, ...], Check]]

    async def run(self, request: Request, rt, body: BaseModel, adapter: AdapterWeights | None) -> list:
        """What each check gives, in order, for a body the schema passed, with ``adapter``, the route's. Raises
        LateProblems naming every fault they found; else the first of REFUSALS one met."""
        results, problems, refusal = await self.outcomes(request, rt, body, adapter, frozenset())
        if problems:
            raise LateProblems(problems)
        if refusal is not None:
            raise refusal
        return results

    async def problems(self, request: Request, rt, invalid: RequestValidationError) -> list[dict]:
        """The faults the checks find in the fields of a body the schema refused (``invalid``) that it found valid,
        each check run only where all the fields it reads are (the adapter too: none unknown)."""
        raw, errors = invalid.body, invalid.errors()
        if not isinstance(raw, dict) or any(len(error["loc"]) < 2 for error in errors):
            return []  # not an object, or not JSON: no field is valid
        faulty = {error["loc"][1] for error in errors}
        body = valid_part(self.model, raw, faulty)
        adapter = None
        if self.adapter_field not in faulty:
            try:
                adapter = self.adapter(rt, body)
            except UnknownAdapter:  # its 404 comes once the fields are valid
                faulty.add(self.adapter_field)
        return (await self.outcomes(request, rt, body, adapter, frozenset(faulty)))[1]

    async def outcomes(self, request: Request, rt, body: BaseModel, adapter: AdapterWeights | None,
                       faulty: frozenset) -> tuple[list, list[dict], Exception | None]:
        """Each check run whose fields are not ``faulty``: what they gave, the faults they found, the first of
        REFUSALS one met."""
        results, problems, refusal = [], [], None
        for reads, check in self.checks:
            if not faulty.isdisjoint(reads):
                continue
            try:
                results.append(await check(request, rt, body, adapter))
            except LateProblems as exc:
                problems.extend(exc.errors())
            except REFUSALS as exc:
                refusal = refusal or exc
        return results, problems, refusal


def late(checks: LateChecks) -> Callable:
    """Decorates a route's endpoint that runs ``checks`` (``LateChecks.run``), so that its route (a
    ``LateCheckedRoute``) runs them on a body the schema refuses too."""

    def decorate(endpoint: Callable) -> Callable:
        endpoint.late_checks = checks
        return endpoint

    return decorate


class LateCheckedRoute(UniqueKeysRoute):
    """A route (as ``UniqueKeysRoute``) whose endpoint's late checks (``late``) also run where the schema refuses its
    body: the faults they find in the fields it found valid join its own, in one 422, in the order of the fields."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        checks: LateChecks | None = getattr(self.endpoint, "late_checks", None)
        if checks is None:
            return handler

        async def late_checked_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except LateProblems:  # the endpoint's own run
                raise
            except RequestValidationError as exc:
                found = await checks.problems(request, request.app.state.runtime, exc)
                if not found:
                    raise
                problems = in_field_order(checks.model, [*exc.errors(), *found])
                raise RequestValidationError(problems, body=exc.body) from None

        return late_checked_handler


def in_field_order(model: type[BaseModel], problems: list[dict]) -> list[dict]:
    """``problems`` in the order of the fields of ``model`` they are at (pydantic's own order), those at another key
    (an unknown field) last, each field's in the order given."""
    order = {name: at for at, name in enumerate(model.model_fields)}
    return sorted(problems, key=lambda error: order.get(error["loc"][1], len(order)))


def valid_part(model: type[BaseModel], raw: dict, faulty: set) -> BaseModel:
    """A ``model`` of the fields of ``raw`` (a body the schema refused) that are not ``faulty``, each validated alone
    (``field_type``); the fields it has are those given (null for a field whose null is its default, as
    ``schemas.NullIsDefault`` reads it, is none), the others their defaults, required ones none."""
    null_is_a_value = getattr(model, "NULL_IS_A_VALUE", frozenset())
    values = {name: field_type(model, name).validate_python(value) for name, value in raw.items()
              if name in model.model_fields and name not in faulty and (value is not None or name in null_is_a_value)}
    return model.model_construct(_fields_set=set(values), **values)


@lru_cache(maxsize=64)
def field_type(model: type[BaseModel], name: str) -> TypeAdapter:
    """The validation of ``model``'s field ``name`` alone: its type and constraints (its value passed them in the
    whole body's validation: here it is made the value the model holds, a message's parts its text)."""
    field = model.model_fields[name]
    return TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
