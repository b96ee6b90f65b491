"""HTTP routes, one router per area; they validate, call the tasks or the registry, and shape replies."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import (
    AdapterConflict,
    AdapterError,
    AdapterPathAmbiguous,
    AdapterPathMissing,
    AdapterPathRefused,
    EngineFailed,
    EngineStopped,
    InputTooLong,
    NoRoomForAdapter,
    QueueFull,
    RenderUnavailable,
    StillLoading,
    TemplateRefused,
    UnknownAdapter,
)
from service.http.errors import ClientGone, error_replies
from service.http.json_body import UniqueKeysRoute
from service.http.keys import ADMIN_KEY, check_admin_key, check_api_key, listing_key
from service.http.late_checks import LateCheckedRoute, LateChecks, late, refused, template_refused
from service.http.schemas import (
    ANSWER_TOKENS,
    SERVER_CAPS,
    AdapterIn,
    AnswerIn,
    AnswerOut,
    ErrorOut,
    NliIn,
    NliOut,
    NoFields,
    OpenAIIn,
    ServerCaps,
)
from service.lora.adapter_files import BASE_LABEL, AdapterWeights, adapter_or_base, check_name
from service.runtime import Runtime
from service.tasks.labels import label_ids
from service.tasks.prompt_styles import ADAPTER_STYLE, require_template
from service.tasks.prompts import NLI_LABELS
from service.tasks.tasks import Windowed, chat_template, name_of

tasks_router = APIRouter(tags=["tasks"], route_class=LateCheckedRoute)
admin_router = APIRouter(tags=["admin"], route_class=UniqueKeysRoute)
ops_router = APIRouter(tags=["operations"], route_class=UniqueKeysRoute)
T = TypeVar("T")


# the errors of any route that reads a body: one that is not JSON, one larger than the server's max_body_bytes, one
# sent as another media type than JSON
BODY_ERRORS = (400, 413, 415)
# the errors of registering an adapter (POST /adapters, and vLLM's POST /v1/load_lora_adapter)
LOAD_ERRORS = (*BODY_ERRORS, AdapterError, AdapterPathRefused, AdapterPathMissing, AdapterConflict,
               AdapterPathAmbiguous, NoRoomForAdapter)
# the body of a route that takes none, when none is sent. A body sent is validated as NoFields: an object without
# fields, ``{}``; any other JSON (null, [], 1, "x") is a 422, as on every route with a body (a default of None would
# take null for no body)
NO_BODY = NoFields()


def admin_replies(*errors: type[Exception] | int, shape: type = ErrorOut) -> dict:
    """The error replies of an admin route: ``errors`` and those of the ``admin`` dependency."""
    return error_replies(401, 403, 422, EngineStopped, *errors, shape=shape)


def serving_replies(*errors: type[Exception], shape: type = ErrorOut) -> dict:
    """The error replies of a route that serves a request through the engine (``inference``), and ``errors``."""
    return error_replies(*BODY_ERRORS, 401, 403, 422, UnknownAdapter, InputTooLong, QueueFull, EngineStopped, *errors,
                         shape=shape)


# The dependencies and the routes that do not block are coroutines: FastAPI runs a plain function on a thread of its
# pool, which blocking routes can fill (a review: /health waited 25 s behind 60 requests on threads).
async def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def accepting(rt: Runtime) -> Runtime:
    """``rt``; EngineStopped while it loads or drains, EngineFailed once it failed (``stopped``)."""
    if not rt.accepting:
        raise stopped(rt)
    return rt


def stopped(rt: Runtime) -> EngineStopped:
    """Why ``rt`` takes no request: EngineFailed once it failed to start or its engine died (it never will again:
    no Retry-After), StillLoading while it loads (code ``still_loading``, Retry-After 1), else EngineStopped: it
    drains (no Retry-After: the server is going away)."""
    if rt.failure is not None:
        return EngineFailed(rt.failure)
    if rt.draining:
        return EngineStopped("the service is shutting down: it drains, and takes no new requests")
    return StillLoading("the model is still loading")


# headers a request may send once (RFC 9110 5.3: neither is a list): Authorization defines one credential (11.6.2),
# Content-Type one media type (8.3); of two, the first decided here, where a proxy in front might read another
SINGLE_HEADERS = ("Authorization", "Content-Type")


async def single_headers(request: Request) -> None:
    """400 for a request that sends one of ``SINGLE_HEADERS`` more than once, whatever the values (an app-wide
    dependency: before any route reads one)."""
    for name in SINGLE_HEADERS:
        if len(request.headers.getlist(name)) > 1:
            raise HTTPException(400, f"{name} is sent more than once: send one")


# the app's own dependencies, which every route runs before its own, and the statuses each may answer: every route's
# OpenAPI entry lists them (``create_app``)
APP_DEPENDENCIES = {single_headers: (400,)}


async def keyed(request: Request, authorization: str | None = Header(None)) -> Runtime:
    """The runtime, for a route of OpenAI's under ``/v1`` that runs no model (the models' list): the API key as
    ``inference`` needs it (OpenAI and vLLM need it on every ``/v1`` route; a review: ``GET /v1/models`` answered
    without it), then as ``accepting``."""
    rt: Runtime = request.app.state.runtime
    check_api_key(rt, authorization, "OpenAI's routes")
    return accepting(rt)


async def inference(request: Request, authorization: str | None = Header(None)) -> Runtime:
    """The runtime, for a route that runs the model: the API key (``check_api_key``); then its caps set for the
    body's validation (``SERVER_CAPS``), and as ``accepting``."""
    rt: Runtime = request.app.state.runtime
    check_api_key(rt, authorization, "the routes that run the model")
    SERVER_CAPS.set(server_caps(rt))  # FastAPI validates the body after the dependencies, in this context
    return accepting(rt)


async def admin(request: Request, authorization: str | None = Header(None)) -> Runtime:
    """Admin routes need ``Authorization: Bearer <admin key>``; with no key configured they are refused."""
    rt: Runtime = request.app.state.runtime
    check_admin_key(rt, authorization)
    if not rt.ready.is_set():
        raise stopped(rt)  # loading, or failed to start (it said "still loading" then)
    return rt


def pick_adapter(rt: Runtime, request_body: AnswerIn | NliIn, default: str | None) -> AdapterWeights | None:
    """The weights of the adapter a request names (None: the bare base, also as "none" or "base"), or of the
    configured ``default`` when it names none (the bare base while no adapter of that name is registered);
    UnknownAdapter if it names one unknown."""
    if "adapter" in request_body.model_fields_set:
        return rt.registry.lookup(adapter_or_base(request_body.adapter))
    try:
        return rt.registry.lookup(default)
    except UnknownAdapter:
        return None


def bound(request: Request, adapter: AdapterWeights | None) -> AdapterWeights | None:
    """``adapter`` (None: the bare base), which the request is bound to (``Tasks``): its adapter label in the
    request-latency metric (``app.RequestMetrics``)."""
    request.state.adapter = name_of(adapter) or BASE_LABEL
    return adapter


async def disconnect(request: Request) -> None:
    """Return once the client has disconnected (its body is read already, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; should the client disconnect first, cancel it (the engine drops the request, queued or
    running) and raise ClientGone."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # nothing once done
    if task not in done:
        raise ClientGone()
    return task.result()


def new_seed() -> int:
    return random.getrandbits(63)


def token_budget(body: AnswerIn | OpenAIIn, rt: Runtime, default: int | None = None) -> int:
    """The most tokens a request may generate: what it asks for (``body.token_budget()``: its validation refused more
    than the server's ``max_new_tokens``, ``server_caps``), or when it names none ``default``, at most that cap
    (None: the cap itself)."""
    requested, cap = body.token_budget(), rt.settings.max_new_tokens
    if requested is None:
        return cap if default is None else min(default, cap)
    return requested


def server_caps(rt: Runtime) -> ServerCaps:
    """``rt``'s caps on request fields (``ServerCaps``), each said with its settings as ``rt.named`` names them."""
    settings = rt.settings  # n choices are queued and decoded together: never more than the queue or a batch holds
    return ServerCaps(
        tokens=(settings.max_new_tokens, rt.named("the most tokens this server generates for a request (its "
                                                  "max_new_tokens)")),
        choices=(min(settings.max_choices, settings.max_batch, settings.max_queue), rt.named(
            "the most choices this server generates for a request (the least of its max_choices, max_batch and "
            "max_queue)")))


async def prompt_style(request: Request, rt: Runtime, body: AnswerIn | NliIn, adapter: AdapterWeights | None) -> str:
    """A late check (``late_checks``): the request's ``prompt_style``, once the model can render it; a 422 naming the
    field for a chat style on a model without a chat template, where ``adapter``'s folder ships none either."""
    try:
        require_template(rt.tasks.tokenizer, body.prompt_style, chat_template(adapter))
    except ValueError as exc:
        raise refused("prompt_style", body.prompt_style, exc) from None
    return body.prompt_style


async def labels(request: Request, rt: Runtime, body: NliIn, adapter: AdapterWeights | None) -> None:
    """A late check: a 422 naming ``labels`` for labels the tokenizer cannot score (``labels.label_ids``: too many
    tokens, two alike once tokenized)."""
    if body.labels is not None:
        try:
            label_ids(rt.tasks.tokenizer, body.labels)
        except ValueError as exc:
            raise refused("labels", body.labels, exc) from None


async def styled_prompt(request: Request, rt: Runtime, body: AnswerIn | NliIn,
                        adapter: AdapterWeights | None) -> list[int] | None:
    """A late check: the prompt of a chat style (``Tasks.answer_ids``, ``Tasks.nli_ids``: the whole context's),
    rendered with ``adapter``'s chat template or the base's, a 422 naming ``prompt_style`` where the template refuses
    it (TemplateRefused, as ``prompt_styles.render_ids`` finds it); None for the adapter style, or where there is no
    template (``prompt_style`` names that)."""
    template = chat_template(adapter)
    try:
        require_template(rt.tasks.tokenizer, body.prompt_style, template)
    except ValueError:
        return None
    if body.prompt_style == ADAPTER_STYLE:
        return None
    if isinstance(body, AnswerIn):
        rendering = rt.tasks.answer_ids(body.prompt_style, body.context, body.question, template)
    else:
        rendering = rt.tasks.nli_ids(body.prompt_style, body.premise, body.hypothesis, body.labels or NLI_LABELS,
                                     template)
    try:
        return await unless_disconnected(request, rendering)
    except TemplateRefused as exc:
        raise template_refused("prompt_style", body.prompt_style, exc) from None


async def answer_prompts(request: Request, rt: Runtime, body: AnswerIn,
                         adapter: AdapterWeights | None) -> tuple[list[int] | None, Windowed | None]:
    """A late check: a chat style's prompt of the whole context (``styled_prompt``), and where the answer is
    extractive the windows of a context too long for one prompt and each one's prompt (``Tasks.window_prompts``), so
    that a template that refuses a window's prompt is named at ``prompt_style`` beside the field faults, in one 422
    (every window it refuses), before the request is served; (None, None) where ``styled_prompt`` renders nothing.
    Raises InputTooLong as ``Tasks.answer_windows``."""
    whole = await styled_prompt(request, rt, body, adapter)
    if whole is None or not body.extractive:
        return whole, None
    windowing = rt.tasks.window_prompts(body.context, body.question, body.prompt_style, chat_template(adapter), whole)
    try:
        return whole, await unless_disconnected(request, windowing)
    except TemplateRefused as exc:
        raise template_refused("prompt_style", body.prompt_style, exc) from None


STYLE_CHECK = (("adapter", "prompt_style"), prompt_style)
ANSWER_CHECKS = LateChecks(AnswerIn, "adapter", lambda rt, body: pick_adapter(rt, body, rt.settings.qa_adapter), (
    STYLE_CHECK, (("context", "question", "adapter", "extractive", "prompt_style"), answer_prompts)))
NLI_READ = ("premise", "hypothesis", "adapter", "labels", "prompt_style")  # what its prompt is made of
NLI_CHECKS = LateChecks(NliIn, "adapter", lambda rt, body: pick_adapter(rt, body, rt.settings.nli_adapter), (
    (("labels",), labels), STYLE_CHECK, (NLI_READ, styled_prompt)))


@tasks_router.post("/answer", response_model=AnswerOut, responses=serving_replies(RenderUnavailable))
@late(ANSWER_CHECKS)
async def answer(body: AnswerIn, request: Request, rt: Runtime = Depends(inference)) -> AnswerOut:
    adapter = bound(request, ANSWER_CHECKS.adapter(rt, body))
    style, (whole, windowed) = await ANSWER_CHECKS.run(request, rt, body, adapter)
    decoding = body.decoding.to_decoding(new_seed(), token_budget(body, rt, ANSWER_TOKENS))
    result = await unless_disconnected(request, rt.tasks.answer(
        body.context, body.question, adapter, decoding, body.extractive, style, whole, windowed))
    return AnswerOut(adapter=name_of(adapter), **result.__dict__)


@tasks_router.post("/nli", response_model=NliOut, responses=serving_replies(RenderUnavailable))
@late(NLI_CHECKS)
async def nli(body: NliIn, request: Request, rt: Runtime = Depends(inference)) -> NliOut:
    """The probabilities of the NLI labels, or of the request's own ``labels``, each scored over its whole
    tokenization (``Tasks.classify``: a 413 for labels that need more scoring requests than the queue holds)."""
    adapter = bound(request, NLI_CHECKS.adapter(rt, body))
    _, style, rendered = await NLI_CHECKS.run(request, rt, body, adapter)
    if body.labels is None:
        scoring = rt.tasks.nli(body.premise, body.hypothesis, adapter, style=style, rendered=rendered)
    else:
        scoring = rt.tasks.classify(body.premise, body.hypothesis, adapter, tuple(body.labels), style, rendered)
    probabilities = await unless_disconnected(request, scoring)
    return NliOut(label=max(probabilities, key=probabilities.get), probabilities=probabilities,
                  adapter=name_of(adapter))


# how long a merge lasts: the merge policy runs at every admission, admin merge or not (service/engine/merge_policy.py)
MERGE_LASTS = ("until the engine admits a request for other weights (another adapter or the bare base model), which "
               "unmerges it between two decoding steps, or an admin unmerges or deletes it")


def merge_state(merged: str | None) -> dict:
    """The adapter merged into the base weights (None: none), and how long such a merge lasts."""
    return {"merged": merged, "merged_until": MERGE_LASTS if merged is not None else None}


@admin_router.get("/adapters", responses=admin_replies())
async def list_adapters(rt: Runtime = Depends(runtime), authorization: str | None = Header(None)) -> dict:
    """Every adapter and the merge state; the adapters' file paths only with the admin key. The API key (which
    clients of the inference routes send everywhere): no paths; no key: no paths, but a 401 where an API key is
    configured (the names are what ``GET /v1/models`` lists, which needs it); any other key: 401 (``listing_key``).
    The key is checked first, as on every route, whatever the service's state; then as ``accepting`` (a review: no
    key or a wrong one was a 503 'still loading' while the model loaded)."""
    admin = listing_key(rt, authorization) == ADMIN_KEY
    accepting(rt)
    adapters = rt.registry.describe()
    if not admin:
        adapters = [{key: value for key, value in adapter.items() if key != "path"} for adapter in adapters]
    return {"adapters": adapters, **merge_state(rt.registry.merged)}


@admin_router.post("/adapters", status_code=201, responses=admin_replies(*LOAD_ERRORS))
async def load_adapter(body: AdapterIn, rt: Runtime = Depends(admin)) -> dict:
    return await run_in_threadpool(rt.load_adapter, body.name, body.path, body.replace)


@admin_router.delete("/adapters/{name}", responses=admin_replies(AdapterError, UnknownAdapter))
def unload_adapter(name: str, rt: Runtime = Depends(admin)) -> dict:
    """Unregister ``name`` (``Runtime.unload_adapter``): 422 for a name no adapter can have (the bare base's, in any
    case, or not a plain identifier), as ``POST /adapters`` refuses it; 404 for an unknown one."""
    rt.unload_adapter(name)
    return {"deleted": name}


@admin_router.post("/adapters/unmerge", responses=admin_replies(*BODY_ERRORS))
async def unmerge(body: NoFields = NO_BODY, rt: Runtime = Depends(admin)) -> dict:
    """Restore the base weights. Takes no body: none, or ``{}`` (``NO_BODY``)."""
    await run_in_threadpool(rt.engine.call(rt.registry.unmerge).result)
    return merge_state(None)


@admin_router.post("/adapters/{name}/merge",
                   responses=admin_replies(*BODY_ERRORS, AdapterError, UnknownAdapter, AdapterConflict))
async def merge(name: str, body: NoFields = NO_BODY, rt: Runtime = Depends(admin)) -> dict:
    """Merge ``name`` into the base weights. Takes no body: none, or ``{}`` (``NO_BODY``). AdapterError (422) for a
    name no adapter can have (``check_name``, as ``POST /adapters``), UnknownAdapter (404) for an unknown one,
    AdapterConflict (409) on a 4-bit base."""
    rt.registry.require(check_name(name))
    await run_in_threadpool(rt.engine.call(lambda: rt.registry.merge(name)).result)
    return merge_state(name)


@ops_router.get("/health", responses={503: {"description": "failed to start, or the engine thread died: a reason"}})
async def health(response: Response, rt: Runtime = Depends(runtime)) -> dict:
    """Liveness: ok while the process can serve (loading and draining included); 503 once it never can."""
    if rt.failure is not None:
        response.status_code = 503
        return {"status": "failed", "reason": rt.failure}
    return {"status": "ok"}


@ops_router.get("/ready", responses={503: {"description": "loading (with Retry-After: 1), draining or failed: ready "
                                                         "false and a reason"}})
async def ready(response: Response, rt: Runtime = Depends(runtime)) -> dict:
    """Readiness: 503 unless the service takes requests; while the model loads with Retry-After, in whole seconds, as
    the other 503s of a loading service (``StillLoading.retry_after``); none while it drains (it will not be ready
    again: Kubernetes and vLLM probe by the status alone) or once it failed (it never will by itself)."""
    if not rt.accepting:
        response.status_code = 503
        if rt.state == "loading":
            response.headers["Retry-After"] = str(StillLoading.retry_after)
        return {"ready": False, "reason": rt.state}
    return {"ready": True}


# Prometheus' text format; documented as text/plain, its errors as JSON (a PlainTextResponse route class documented
# every error reply as text/plain too)
METRICS_REPLY = {200: {"description": "The metrics, in Prometheus' text format",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}}


@ops_router.get("/metrics", response_class=Response, responses=METRICS_REPLY)
async def metrics_endpoint() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
