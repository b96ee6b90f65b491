"""Streaming (server-sent events), stop strings, logprobs and n choices on /v1/completions and /v1/chat/completions,
in process on the tiny Llama: streamed text is the non-streamed text, chunk by chunk in OpenAI's shape, ending with
[DONE]; stop strings end the text across token and chunk boundaries; logprobs are transformers' log_softmax of the
raw logits; n choices are seeded apart."""
from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from peft import PeftModel
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from service.tasks.token_bytes import token_bytes
from tests.engine.engine_helpers import WatchedSteps, long_generation, paused
from tests.http.replies import error_message, settings_by_field
from tests.lora_helpers import RELATIVE_TOLERANCE
from tests.server_helpers import ADMIN, ready_client, settings_in, wait_until

CAP, MOST_CHOICES = 24, 4  # the server's max_new_tokens and max_choices
PROMPT = "The Normans gave their name to"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who were the Normans?"}]
ROUTES = {"/v1/completions": {"prompt": PROMPT}, "/v1/chat/completions": {"messages": MESSAGES}}
WAIT = 60


@pytest.fixture(scope="module")
def served(tiny_llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return settings_in(root, tiny_llama_dir, llama_adapters, max_new_tokens=CAP, max_choices=MOST_CHOICES)


@pytest.fixture(scope="module")
def client(served):
    with ready_client(served) as client:
        yield client


def post(client, route: str, status: int = 200, **fields):
    body = {"model": "one", "temperature": 0, **ROUTES[route], **fields}
    reply = client.post(route, json=body)
    assert reply.status_code == status, reply.text
    return reply


def chunks(reply) -> list[dict]:
    """The chunks of a streamed reply, after checking its framing: events of one ``data:`` line each, the last
    ``data: [DONE]``."""
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["cache-control"] == "no-cache"
    events = reply.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-2])
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def joined(parts: list[dict], route: str) -> dict[int, tuple[str, str | None]]:
    """{choice index: (its text, its finish reason)} of stream chunks (each choice's last chunk has the reason)."""
    texts, reasons = {}, {}
    for chunk in parts:
        for choice in chunk["choices"]:
            index = choice["index"]
            assert reasons.get(index) is None, f"choice {index} went on after its finish reason"
            text = choice["text"] if route == "/v1/completions" else choice["delta"].get("content", "")
            texts[index] = texts.get(index, "") + text
            reasons[index] = choice["finish_reason"]
    return {index: (texts[index], reasons[index]) for index in texts}


def whole(reply: dict, route: str) -> dict[int, tuple[str, str]]:
    return {choice["index"]: (choice["text"] if route == "/v1/completions" else choice["message"]["content"],
                              choice["finish_reason"]) for choice in reply["choices"]}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_choices_waiting_for_each_other_past_max_queue_wait_are_all_served(served, route, stream):
    """Three choices beside a running request: the batch (max_batch 3) takes two, and the third waits while their
    decoding is held past ``max_queue_wait``; it is served all the same (a 429, or an error event mid-stream, once:
    the request was shed by its own choices)."""
    with ready_client(served.model_copy(update={"max_queue_wait": 0.2, "max_batch": 3})) as client, \
            ThreadPoolExecutor(1) as pool:
        expected = whole(post(client, route, n=3, max_tokens=4).json(), route)
        engine = client.app.state.runtime.engine
        engine.decoder = steps = WatchedSteps(engine.decoder, hold_at=2)
        with paused(engine):
            running = engine.submit(long_generation(random.Random(3), None, 16))
            pending = pool.submit(post, client, route, n=3, max_tokens=4, stream=stream)
            wait_until(lambda: engine.queue_depth == 4, "the choices queued")
        assert steps.holding.wait(WAIT)
        time.sleep(0.4)  # past the bound while the running request and two choices fill the batch
        steps.release.set()
        reply = pending.result(WAIT)
        assert (joined(chunks(reply), route) if stream else whole(reply.json(), route)) == expected
        assert len(running.result(WAIT).token_ids) == 16


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("model", ["one", "base"])
def test_streamed_is_the_non_streamed_reply(client, route, model):
    reply = post(client, route, model=model, max_tokens=CAP).json()
    stream = chunks(post(client, route, model=model, max_tokens=CAP, stream=True))
    assert joined(stream, route) == whole(reply, route)
    assert all(chunk["id"] == stream[0]["id"] and chunk["model"] == model and "usage" not in chunk for chunk in stream)
    kind = "text_completion" if route == "/v1/completions" else "chat.completion.chunk"
    assert {chunk["object"] for chunk in stream} == {kind}
    if route == "/v1/chat/completions":  # the first chunk gives the role
        assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in chunk["choices"][0]["delta"] for chunk in stream[1:])
    assert len(stream) > 3, "the text came in one piece: nothing was streamed"


@pytest.mark.parametrize("route", ROUTES)
def test_include_usage_ends_with_a_usage_chunk(client, route):
    reply = post(client, route, max_tokens=10).json()
    stream = chunks(post(client, route, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(chunk["usage"] is None for chunk in stream[:-1])
    assert stream[-1]["choices"] == [] and stream[-1]["usage"] == reply["usage"]
    assert joined(stream, route) == whole(reply, route)
    assert "stream_options is only allowed with stream true" in error_message(
        post(client, route, 422, stream_options={"include_usage": True}))


def chunk_texts(parts: list[dict], route: str) -> list[str]:
    return [choice["text"] if route == "/v1/completions" else choice["delta"].get("content", "")
            for chunk in parts for choice in chunk["choices"]]


def spanning_stop(parts: list[str]) -> tuple[str, int]:
    """A stop string made of the last character of one of ``parts`` (a stream's chunk texts, none empty) past the
    first and the first of the next (so of two tokens), met there first in their text, and where it starts."""
    text = "".join(parts)
    ends = [len("".join(parts[:k + 1])) for k in range(len(parts) - 1)]  # where each chunk ends in the text
    return next((text[end - 1:end + 1], end - 1) for end in ends[1:] if text.find(text[end - 1:end + 1]) == end - 1
                and "\ufffd" not in text[end - 1:end + 1])


def cut(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest of ``stops``."""
    return text[:min(at for at in (text.find(stop) for stop in stops) if at >= 0)]


@pytest.mark.parametrize("route", ROUTES)
def test_stop_strings_across_token_and_chunk_boundaries(client, route):
    """A stop string made of the last character of one streamed chunk and the first of the next (so of two tokens),
    met there first: the text ends before it, streamed or not, alone or among others."""
    parts = [part for part in chunk_texts(chunks(post(client, route, max_tokens=CAP, stream=True)), route) if part]
    text = "".join(parts)
    stop, at = spanning_stop(parts)
    for streamed in (False, True):
        for stops in ([stop], stop, ["never met", stop], [text[at + 1:at + 3], "x" * 30, stop, text[at - 1:at + 1]]):
            listed = [stops] if isinstance(stops, str) else stops
            reply = post(client, route, max_tokens=CAP, stop=stops, stream=streamed)
            got = joined(chunks(reply), route) if streamed else whole(reply.json(), route)
            assert got == {0: (cut(text, listed), "stop")}, (stops, streamed)
    pieces = chunk_texts(chunks(post(client, route, max_tokens=CAP, stop=stop, stream=True)), route)
    assert not any(stop in piece for piece in pieces) and "".join(pieces) == text[:at]
    for refused in (["a", "b", "c", "d", "e"], "", ["a", ""]):
        assert "body.stop" in error_message(post(client, route, 422, stop=refused))


@torch.no_grad()
def reference(served, adapter: str | None, prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor, float]:
    """Greedy tokens of stock transformers (peft), the log_softmax of the raw logits that picked each, and the
    logits' scale."""
    model = AutoModelForCausalLM.from_pretrained(served.base_model).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, served.adapters_dir / adapter).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    logits = torch.cat(out.logits)
    return out.sequences[0, len(prompt_ids):].tolist(), logits.log_softmax(-1), logits.abs().max().item()


def prompt_ids(tokenizer, route: str) -> list[int]:
    """The token ids a request of ``route`` (its ROUTES fields) prompts the bare base with."""
    if route == "/v1/completions":
        return tokenizer.encode(PROMPT, add_special_tokens=False)
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)


def legacy_name(tokenizer) -> Callable[[int], str]:
    """A token id's name in legacy completions' logprobs: its text, or ``bytes:\\xNN...`` for part of a character."""
    pieces = token_bytes(tokenizer)

    def name(token: int) -> str:
        piece = pieces[token]
        if piece is not None:
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)
        return tokenizer.decode([token])
    return name


@pytest.mark.parametrize("route", ROUTES)
def test_logprobs_are_transformers_log_softmax_of_the_raw_logits(client, served, route):
    tokenizer = AutoTokenizer.from_pretrained(served.base_model)
    if route == "/v1/completions":
        reply = post(client, route, max_tokens=8, logprobs=3).json()
        logprobs = reply["choices"][0]["logprobs"]
        tokens, chosen, tops = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
        offsets = logprobs["text_offset"]
        whole_characters = next((i for i, token in enumerate(tokens) if token.startswith("bytes:")), len(tokens))
        assert offsets == sorted(offsets) and offsets[:whole_characters] == [
            len("".join(tokens[:i])) for i in range(whole_characters)]  # after a split character: see TokenLogprob
    else:
        reply = post(client, route, max_tokens=8, logprobs=True, top_logprobs=3).json()
        content = reply["choices"][0]["logprobs"]["content"]
        tokens, chosen = [entry["token"] for entry in content], [entry["logprob"] for entry in content]
        tops = [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in content]
        assert all(len(entry["top_logprobs"]) == 3 for entry in content)
    ids, expected, scale = reference(served, "one", prompt_ids(tokenizer, route), len(tokens))
    if route != "/v1/completions":  # each token's bytes, those of part of a character included (special: its text)
        pieces = token_bytes(tokenizer)
        assert [entry["bytes"] for entry in content] == [list(pieces[i] or tokenizer.decode([i]).encode()) for i in ids]
    tolerance = 4 * RELATIVE_TOLERANCE["none"] * scale  # as the engine's own logprob test argues
    name = legacy_name(tokenizer) if route == "/v1/completions" else lambda i: tokenizer.decode([i])
    assert tokens == [name(token) for token in ids]
    assert whole(reply, route)[0][0] == tokenizer.decode(ids, skip_special_tokens=True)
    for step, token in enumerate(ids):
        assert chosen[step] == pytest.approx(expected[step, token].item(), abs=tolerance)
        top = expected[step].topk(3)
        want = {name(i): value for i, value in zip(top.indices.tolist(), top.values.tolist())}
        if route == "/v1/completions":  # OpenAI's legacy format: the k most likely and the token itself
            want[tokens[step]] = expected[step, token].item()
        assert tops[step] == pytest.approx(want, abs=tolerance)
    streamed = chunks(post(client, route, max_tokens=8, stream=True, **(
        {"logprobs": 3} if route == "/v1/completions" else {"logprobs": True, "top_logprobs": 3})))
    pieces = [choice["logprobs"] for chunk in streamed for choice in chunk["choices"] if choice["logprobs"]]
    if route == "/v1/completions":
        assert [token for piece in pieces for token in piece["tokens"]] == tokens
        assert [offset for piece in pieces for offset in piece["text_offset"]] == logprobs["text_offset"]
    else:  # the same tokens; their logprobs within the tolerance (the second request's prompt may come from the
        # prefix cache, its keys and values computed in another pass than the first's)
        entries = [entry for piece in pieces for entry in piece["content"]]
        assert [named_entry(entry) for entry in entries] == [named_entry(entry) for entry in content]
        assert [logprob for entry in entries for logprob in entry_logprobs(entry)] == pytest.approx(
            [logprob for entry in content for logprob in entry_logprobs(entry)], abs=tolerance)


def named_entry(entry: dict) -> tuple:
    """A chat logprobs entry's token, bytes and top tokens."""
    return entry["token"], entry["bytes"], [(top["token"], top["bytes"]) for top in entry["top_logprobs"]]


def entry_logprobs(entry: dict) -> list[float]:
    """A chat logprobs entry's logprob, then its top tokens'."""
    return [entry["logprob"], *(top["logprob"] for top in entry["top_logprobs"])]


@pytest.fixture(scope="module")
def ending(tiny_llama_dir, tmp_path_factory):
    """A server on a copy of the tiny Llama whose generation config makes a token of each route's greedy reply (the
    first from the fourth on not seen before it) an end-of-text token: its settings and client."""
    root = tmp_path_factory.mktemp("ending")
    base = Path(shutil.copytree(tiny_llama_dir, root / "base"))
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    ends = [tokenizer.eos_token_id]
    for route in ROUTES:
        ids = torch.tensor([prompt_ids(tokenizer, route)])
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=CAP,
                                do_sample=False)[0, ids.shape[1]:].tolist()
        ends.append(next(token for k, token in enumerate(tokens) if k >= 3 and token not in tokens[:k]))
    config = GenerationConfig.from_pretrained(base)
    config.eos_token_id = ends
    config.save_pretrained(base)
    settings = settings_in(root, base, {}, max_new_tokens=CAP, max_choices=MOST_CHOICES)
    with ready_client(settings) as client:
        yield settings, client


def close(got, want) -> bool:
    """Whether two JSON values are equal but for numbers that are not integers, within 1e-4 (logprobs of the same
    tokens computed in other batches)."""
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= 1e-4
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    return got == want


@pytest.mark.parametrize("route", ROUTES)
def test_a_choice_the_model_ends_has_a_logprobs_entry_for_each_token_usage_counts(ending, route):
    """vLLM keeps the end-of-text token that ended a choice in its ``token_ids`` and ``logprobs`` (its detokenizer
    leaves it out of the text only), so usage.completion_tokens is each choice's logprobs entries: the last one names
    that token by its own text, at the end of the text (``text_offset``), with its bytes (chat) and transformers'
    logprob, and comes in the choice's chunk with the finish reason; streamed or not, each of n choices."""
    settings, client = ending
    tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
    ids, expected, scale = reference(settings, None, prompt_ids(tokenizer, route), CAP)
    assert 1 < len(ids) < CAP and ids[-1] in GenerationConfig.from_pretrained(settings.base_model).eos_token_id
    text, last = tokenizer.decode(ids[:-1], skip_special_tokens=True), ids[-1]
    asked = {"logprobs": 2} if route == "/v1/completions" else {"logprobs": True, "top_logprobs": 2}
    reply = post(client, route, model="base", n=2, **asked).json()
    stream = chunks(post(client, route, model="base", n=2, stream=True, stream_options={"include_usage": True},
                         **asked))
    assert reply["usage"]["completion_tokens"] == 2 * len(ids) and stream[-1]["usage"] == reply["usage"]
    assert whole(reply, route) == joined(stream, route) == {0: (text, "stop"), 1: (text, "stop")}
    name = legacy_name(tokenizer) if route == "/v1/completions" else lambda i: tokenizer.decode([i])
    for choice in reply["choices"]:
        logprobs = choice["logprobs"]
        if route == "/v1/completions":
            tokens, chosen = logprobs["tokens"], logprobs["token_logprobs"]
            assert logprobs["text_offset"][-1] == len(text)
        else:
            tokens, chosen = [entry["token"] for entry in logprobs["content"]], [
                entry["logprob"] for entry in logprobs["content"]]
            assert logprobs["content"][-1]["bytes"] == list(name(last).encode())
        assert tokens == [name(token) for token in ids]
        assert chosen[-1] == pytest.approx(expected[-1, last].item(), abs=4 * RELATIVE_TOLERANCE["none"] * scale)
        parts = [part for chunk in stream for part in chunk["choices"] if part["index"] == choice["index"]]
        pieces = [part["logprobs"] for part in parts if part["logprobs"]]
        if route == "/v1/completions":
            streamed = {key: [value for piece in pieces for value in piece[key]] for key in logprobs}
            ending_piece = parts[-1]["logprobs"]["tokens"]
        else:
            streamed = {"content": [entry for piece in pieces for entry in piece["content"]], "refusal": None}
            ending_piece = [entry["token"] for entry in parts[-1]["logprobs"]["content"]]
        assert close(streamed, logprobs) and parts[-1]["finish_reason"] == "stop" and ending_piece[-1] == name(last)


def entry_names(logprobs: dict, route: str) -> list[str]:
    """The tokens' names in a choice's logprobs, in order."""
    return logprobs["tokens"] if route == "/v1/completions" else [entry["token"] for entry in logprobs["content"]]


@pytest.mark.parametrize("route", ROUTES)
def test_a_choice_cut_at_a_stop_string_has_a_logprobs_entry_for_each_token_usage_counts(client, route):
    """vLLM cuts a choice's text at a stop string, not its ``token_ids`` and ``logprobs``: every token usage counts,
    up to the one that completed the stop string, has an entry, the uncut choice's, also those whose text the cut left
    out (``text_offset`` where it starts in the uncut text, past the cut), streamed or not."""
    asked = {"logprobs": 0} if route == "/v1/completions" else {"logprobs": True}
    uncut = post(client, route, max_tokens=CAP, **asked).json()["choices"][0]
    names = entry_names(uncut["logprobs"], route)
    text = whole({"choices": [uncut]}, route)[0][0]
    stop, at = spanning_stop([part for part in chunk_texts(chunks(post(client, route, max_tokens=CAP, stream=True)),
                                                           route) if part])
    reply = post(client, route, max_tokens=CAP, stop=stop, **asked).json()
    stream = chunks(post(client, route, max_tokens=CAP, stop=stop, stream=True, stream_options={"include_usage": True},
                         **asked))
    counted = reply["usage"]["completion_tokens"]
    assert whole(reply, route) == joined(stream, route) == {0: (text[:at], "stop")}
    assert stream[-1]["usage"] == reply["usage"] and counted < len(names)
    assert entry_names(reply["choices"][0]["logprobs"], route) == names[:counted] == [
        name for chunk in stream for part in chunk["choices"] if part["logprobs"]
        for name in entry_names(part["logprobs"], route)]
    if route == "/v1/completions":
        assert reply["choices"][0]["logprobs"]["text_offset"] == uncut["logprobs"]["text_offset"][:counted]
        assert reply["choices"][0]["logprobs"]["text_offset"][-1] > at


@pytest.mark.parametrize("route", ROUTES)
def test_logprobs_bounds(client, route):
    if route == "/v1/completions":
        assert "body.logprobs" in error_message(post(client, route, 422, logprobs=6))
        assert "logprobs with echo is not supported" in error_message(post(client, route, 422, logprobs=1, echo=True))
        assert post(client, route, max_tokens=3, logprobs=0).json()["choices"][0]["logprobs"]["top_logprobs"][0]
    else:
        assert "top_logprobs needs logprobs true" in error_message(post(client, route, 422, top_logprobs=2))
        assert "body.top_logprobs" in error_message(post(client, route, 422, logprobs=True, top_logprobs=21))
        entry = post(client, route, max_tokens=3, logprobs=True).json()["choices"][0]["logprobs"]["content"][0]
        assert entry["top_logprobs"] == []  # logprobs without top_logprobs: the token's own only


def token_count(choice: dict, route: str) -> int:
    logprobs = choice["logprobs"]
    return len(logprobs["tokens"] if route == "/v1/completions" else logprobs["content"])


@pytest.mark.parametrize("route", ROUTES)
def test_n_choices_are_seeded_apart_and_reproducible(client, route):
    sampled = {"temperature": 2.0, "max_tokens": 10, "seed": 11,
               "logprobs": 0 if route == "/v1/completions" else True}
    reply = post(client, route, n=MOST_CHOICES, **sampled).json()
    choices = whole(reply, route)
    assert sorted(choices) == list(range(MOST_CHOICES)) and len({text for text, _ in choices.values()}) > 1
    assert whole(post(client, route, n=MOST_CHOICES, **sampled).json(), route) == choices
    assert whole(post(client, route, **sampled).json(), route) == {0: choices[0]}  # choice 0 samples with the seed
    # a logprobs entry for each token counted, the end-of-text token of each choice the model ended included
    assert any(choice["finish_reason"] == "stop" for choice in reply["choices"])
    assert reply["usage"]["completion_tokens"] == sum(token_count(choice, route) for choice in reply["choices"])
    streamed = chunks(post(client, route, n=MOST_CHOICES, stream=True, **sampled))
    assert joined(streamed, route) == choices
    assert len({chunk["choices"][0]["index"] for chunk in streamed}) == MOST_CHOICES
    message = error_message(post(client, route, 422, n=MOST_CHOICES + 1))
    assert f"body.n: Input should be less than or equal to {MOST_CHOICES}" in message
    assert "LORASWAP_MAX_CHOICES, LORASWAP_MAX_BATCH and LORASWAP_MAX_QUEUE" in message  # were the settings' fields
    assert settings_by_field(message) == [], message


def test_best_of_n_and_echo(client):
    route = "/v1/completions"
    plain = whole(post(client, route, n=2, max_tokens=6).json(), route)
    assert whole(post(client, route, n=2, best_of=2, max_tokens=6).json(), route) == plain
    assert "best_of other than n is not supported" in error_message(post(client, route, 422, n=2, best_of=3))
    echoed = post(client, route, max_tokens=6, echo=True, stream=True)
    assert joined(chunks(echoed), route) == {0: (PROMPT + plain[0][0], plain[0][1])}
    assert chunks(echoed)[0]["choices"][0]["text"] == PROMPT


def test_the_openai_client_streams(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    whole_text = api.completions.create(model="one", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    pieces = [chunk.choices[0].text for chunk in api.completions.create(
        model="one", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == whole_text and len(pieces) > 1
    reply = api.chat.completions.create(model="one", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = list(api.chat.completions.create(model="one", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == \
        reply.choices[0].message.content
    assert stream[-1].usage == reply.usage and stream[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_an_adapter_unregistered_while_the_streamed_request_queued_is_404_before_the_stream_begins(client, served):
    """The adapter is unregistered while the request waits in the queue: nothing was sent yet (a stream begins with
    its first text), so the reply is the 404 a request sent after the unregistration gets, not a 200 stream."""
    engine = client.app.state.runtime.engine
    holding, release = threading.Event(), threading.Event()
    held = engine.call(lambda: (holding.set(), release.wait(WAIT)))  # the engine thread waits between batches
    assert holding.wait(WAIT)
    with ThreadPoolExecutor(1) as pool:
        try:
            reply = pool.submit(post, client, "/v1/chat/completions", status=404, model="two", stream=True)
            wait_until(lambda: engine.queue_depth == 1, "the request queued")
            assert client.delete("/adapters/two", headers=ADMIN).status_code == 200
        finally:
            release.set()
        held.result(WAIT)
        gone = "adapter 'two' was unloaded after the request arrived, before it ran"
        assert reply.result(WAIT).json()["error"] == {"message": gone, "type": "invalid_request_error",
                                                      "param": "model", "code": "model_not_found"}
    assert client.post("/adapters", json={"name": "two", "path": str(served.adapters_dir / "two")},
                       headers=ADMIN).status_code == 201


class FaultAfterFirstText:
    """The engine's decoder, raising at its second decoding step once the stream's first text was handed out (the
    time to first token of adapter ``one`` counted): the reply has begun when its batch fails. With ``overflow``, the
    step's logits are NaN instead (as an adapter whose weights overflow gives): the request alone fails."""

    def __init__(self, decoder, overflow: bool = False):
        self.decoder, self.steps, self.overflow = decoder, 0, overflow
        self.first_texts = first_texts_handed_out()

    def __call__(self, tokens, positions):
        self.steps += 1
        if self.steps == 2:
            wait_until(lambda: first_texts_handed_out() > self.first_texts, "the first text handed out")
            if self.overflow:
                return self.decoder(tokens, positions).fill_(float("nan"))
            raise RuntimeError("injected decoding fault")
        return self.decoder(tokens, positions)

    def __getattr__(self, name):
        return getattr(self.decoder, name)


def first_texts_handed_out() -> float:
    return REGISTRY.get_sample_value("loraswap_time_to_first_token_seconds_count", {"adapter": "one"}) or 0.0


@pytest.mark.parametrize("route", ROUTES)
def test_a_fault_after_the_stream_began_is_its_last_event_then_done(client, route):
    """A fault that fails the batch mid-stream (not a domain error): the text sent so far, then an error event in
    OpenAI's shape (server_error; the traceback goes to the server's log), then [DONE]; the server serves on."""
    engine = client.app.state.runtime.engine
    decoder = engine.decoder
    engine.decoder = FaultAfterFirstText(decoder)
    try:
        stream = chunks(post(client, route, stream=True, max_tokens=CAP))
    finally:
        engine.decoder = decoder
    assert stream[-1] == {"error": {"message": "internal server error: the request's batch failed",
                                    "type": "server_error", "param": None, "code": "internal_error"}}
    assert joined(stream[:-1], route)[0][0], "the text handed out before the fault"
    assert post(client, route).json()["choices"][0]["finish_reason"] in {"stop", "length"}


@pytest.mark.parametrize("route", ROUTES)
def test_logits_that_overflow_after_the_stream_began_are_its_last_event_naming_model(client, route):
    """The domain error's event names the field at fault, as its reply before the stream began does (a review: the
    event said param null)."""
    engine = client.app.state.runtime.engine
    decoder = engine.decoder
    engine.decoder = FaultAfterFirstText(decoder, overflow=True)
    try:
        stream = chunks(post(client, route, stream=True, max_tokens=CAP))
    finally:
        engine.decoder = decoder
    assert stream[-1]["error"] == {"message": "adapter 'one' gave NaN or infinite logits for this request (weights "
                                   "that overflow in the forward pass): no answer can be computed from them",
                                   "type": "invalid_request_error", "param": "model", "code": "non_finite_logits"}
    assert joined(stream[:-1], route)[0][0], "the text handed out before the overflow"
