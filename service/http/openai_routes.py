"""OpenAI's routes (models, completions, chat completions) and vLLM's runtime adapter routes, under ``/v1``; their
errors take OpenAI's shape (``service.http.app.error``)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.errors import (
    AdapterConflict,
    AdapterError,
    AdapterNameRefused,
    AdapterPathAmbiguous,
    EngineStopped,
    RenderUnavailable,
    UnknownAdapter,
)
from service.http.chat import chat_prompt
from service.http.errors import blaming, error_replies
from service.http.late_checks import LateCheckedRoute, LateChecks, late
from service.http.openai_replies import ChatReplies, CompletionReplies, Replies, events
from service.http.routes import (
    BODY_ERRORS,
    LOAD_ERRORS,
    admin,
    admin_replies,
    bound,
    inference,
    keyed,
    new_seed,
    serving_replies,
    token_budget,
    unless_disconnected,
)
from service.http.schemas import ChatCompletionIn, CompletionIn, LoraAdapterIn, LoraNameIn, OpenAIErrorOut, OpenAIIn
from service.lora.adapter_files import BASE_MODEL_ID, AdapterWeights, adapter_or_base
from service.runtime import Runtime
from service.tasks.tasks import chat_template, name_of

openai_router = APIRouter(prefix="/v1", tags=["openai"], route_class=LateCheckedRoute)
# one server-sent event of a stream, as FastAPI documents its own streams' events (itemSchema: each event, not the
# whole stream): its data only
STREAM_EVENT = {"type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": "a chunk's JSON, or [DONE] last"}}}
STREAMED = {200: {"description": "The reply (JSON); with stream true, server-sent events of its chunks, each "
                  "`data: <chunk JSON>`, then `data: [DONE]`",
                  "content": {"text/event-stream": {"itemSchema": STREAM_EVENT}}}}
OPENAI_SERVING = {**STREAMED, **serving_replies(shape=OpenAIErrorOut)}
OPENAI_CHAT = {**STREAMED, **serving_replies(RenderUnavailable, shape=OpenAIErrorOut)}  # it renders a chat template
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy holds the events back
# the request field each refusal of vLLM's adapter routes is the fault of (``blaming``): the name (one no adapter can
# have, taken, unknown) or the path (everything else about the folder it names, one relative path in two roots too)
LOAD_FIELDS = {AdapterNameRefused: "lora_name", AdapterPathAmbiguous: "lora_path", AdapterConflict: "lora_name",
               AdapterError: "lora_path"}
UNLOAD_FIELDS = {AdapterError: "lora_name"}
# vLLM's adapter routes answer a line of text, their errors JSON (documented as such: the routes' class, Response,
# names no media type of its own)
# the models' ``created`` (Unix seconds): when this server's process set up its routes, as it started. vLLM gives the
# time of the reply, which changes from one listing to the next; this one stays as long as the server serves
SERVED_SINCE = int(time.time())
VLLMS_REPLY = {200: {"description": "Success: LoRA adapter '<name>' added (or removed) successfully.",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}}


def model_id(adapter: str | None) -> str:
    """The OpenAI model id of ``adapter`` as /v1/models lists it: its name, or ``BASE_MODEL_ID`` for the bare base."""
    return adapter or BASE_MODEL_ID


def model_weights(rt: Runtime, body: OpenAIIn) -> AdapterWeights | None:
    """The weights of the adapter ``model`` names (None: the bare base model, as "base" or "none"); UnknownAdapter if
    unknown."""
    return rt.registry.lookup(adapter_or_base(body.model))


async def chat_prompt_ids(request: Request, rt: Runtime, body: ChatCompletionIn,
                          adapter: AdapterWeights | None) -> list[int]:
    """A late check (``late_checks``): the prompt's token ids, ``body``'s messages rendered with ``adapter``'s chat
    template (``chat_prompt``: a 422 for the messages the template refuses, or for no template); a client gone
    withdraws its render."""
    messages = [message.to_template() for message in body.messages]
    return await unless_disconnected(request, chat_prompt(rt.tasks.tokenizer, messages, chat_template(adapter),
                                                          rt.tasks.max_prompt))


CHAT_CHECKS = LateChecks(ChatCompletionIn, "model", model_weights, ((("model", "messages"), chat_prompt_ids),))


async def reply(rt: Runtime, request: Request, body: OpenAIIn, prompt: str | list[int], adapter: AdapterWeights | None,
                replies: Replies, logprobs: int | None) -> dict | EventSourceResponse:
    """The completion of ``prompt`` (raw text, or a chat template's token ids) as ``body`` asks: whole, or streamed as
    server-sent events. Everything that can refuse the request (the caps, InputTooLong, QueueFull, and QueueTimeout
    or UnknownAdapter while it waits in the queue) does so before any of it is sent: a stream's reply begins with its
    first text."""
    decoding = body.to_decoding(new_seed(), token_budget(body, rt))
    options = {"stop": body.stop, "logprobs": logprobs, "n": body.n}  # n within the server's caps (``server_caps``)
    if body.stream:
        stream = await rt.tasks.stream(prompt, adapter, decoding, **options)
        try:
            await unless_disconnected(request, stream.begun())
        except BaseException:
            stream.close()
            raise
        return EventSourceResponse(events(replies, stream, body.include_usage, rt.named), headers=STREAM_HEADERS,
                                   background=BackgroundTask(stream.close))  # closed even if never iterated
    return replies.whole(await unless_disconnected(request, rt.tasks.complete(prompt, adapter, decoding, **options)))


def model_card(model_id: str) -> dict:
    """A model of ``GET /v1/models``; ``created``: ``SERVED_SINCE`` (OpenAI: a Unix time, when the model was made; it
    was 0, 1970)."""
    return {"id": model_id, "object": "model", "created": SERVED_SINCE, "owned_by": "loraswap"}


@openai_router.get("/models", responses=error_replies(401, 403, 422, EngineStopped, shape=OpenAIErrorOut))
async def models(rt: Runtime = Depends(keyed)) -> dict:
    """The bare base (``base``) and every registered adapter."""
    return {"object": "list", "data": [model_card(i) for i in (BASE_MODEL_ID, *rt.registry.names())]}


@openai_router.get("/models/{model}", responses=error_replies(401, 403, 422, UnknownAdapter, EngineStopped,
                                                             shape=OpenAIErrorOut))
async def model(model: str, rt: Runtime = Depends(keyed)) -> dict:
    """One model of ``GET /v1/models``: an adapter, or ``base`` (also asked for as ``none``); 404 for an unknown
    adapter."""
    adapter = adapter_or_base(model)
    with blaming({UnknownAdapter: "model"}, rt.named):
        rt.registry.require(adapter)
    return model_card(model_id(adapter))


@openai_router.post("/completions", responses=OPENAI_SERVING)
async def completions(body: CompletionIn, request: Request, rt: Runtime = Depends(inference)) -> dict:
    """OpenAI's completions: the prompt is raw text (special tokens spelled in it are parsed)."""
    with blaming(CompletionReplies.fields, rt.named):
        adapter = bound(request, model_weights(rt, body))
        replies = CompletionReplies(model_id(name_of(adapter)), echo=body.prompt if body.echo else "")
        return await reply(rt, request, body, body.prompt, adapter, replies, body.logprobs)


@openai_router.post("/chat/completions", responses=OPENAI_CHAT)
@late(CHAT_CHECKS)
async def chat_completions(body: ChatCompletionIn, request: Request, rt: Runtime = Depends(inference)) -> dict:
    """OpenAI's chat completions: the messages rendered with the chat template of the adapter's folder, else the base
    tokenizer's (see ``chat_prompt``); each choice is the assistant's next message."""
    with blaming(ChatReplies.fields, rt.named):
        adapter = bound(request, model_weights(rt, body))
        [prompt_ids] = await CHAT_CHECKS.run(request, rt, body, adapter)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await reply(rt, request, body, prompt_ids, adapter, ChatReplies(model_id(name_of(adapter))), logprobs)


@openai_router.post("/load_lora_adapter", response_class=Response,
                    responses={**VLLMS_REPLY, **admin_replies(*LOAD_ERRORS, shape=OpenAIErrorOut)})
async def load_lora_adapter(body: LoraAdapterIn, rt: Runtime = Depends(admin)) -> PlainTextResponse:
    """vLLM's route: what POST /adapters does (same checks, same errors), answered as vLLM answers (200, text)."""
    with blaming(LOAD_FIELDS, rt.named):
        await run_in_threadpool(rt.load_adapter, body.lora_name, body.lora_path, body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@openai_router.post("/unload_lora_adapter", response_class=Response,
                    responses={**VLLMS_REPLY, **admin_replies(*BODY_ERRORS, AdapterError, UnknownAdapter,
                                                             shape=OpenAIErrorOut)})
def unload_lora_adapter(body: LoraNameIn, rt: Runtime = Depends(admin)) -> PlainTextResponse:
    """vLLM's route: what DELETE /adapters/{name} does (same checks, same errors), answered as vLLM answers."""
    with blaming(UNLOAD_FIELDS, rt.named):
        rt.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
