"""The task routes of the HTTP API in process (FastAPI TestClient) on the tiny GPT-2 and Llama bases.

/answer, /nli and /v1/completions are held to stock transformers + peft run on the same prompt templates, per
adapter and for the bare base: omitted and bare-base adapter names, control tokens spelled in a field, seeded and
degenerate sampling, the server's cap on new tokens, answer offsets and extractive spans, stopping at a newline or
end of text, and concurrent requests across adapters each getting what its adapter gives alone.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.http.schemas import DecodingIn
from service.tasks.prompts import NLI_LABELS, answer_prompt, label_target, nli_prompt
from tests.http.api_helpers import PROBABILITY_TOLERANCE, Tiny, assert_close
from tests.http.replies import error_message
from tests.server_helpers import SERVER_CAP, SQUAD_CONTEXT, SQUAD_QUESTION, ask, classify, ready_client, tiny_settings
from tests.tiny_models import forced_token_model

QUESTIONS = (SQUAD_QUESTION, "Where was the game played?", "Who lost?", "When was the game played?")


class Reference:
    """Stock transformers (+ peft) on the same prompts: what the service must reproduce."""

    def __init__(self, tiny: Tiny):
        self.tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)
        self.models = {None: AutoModelForCausalLM.from_pretrained(tiny.base_dir).eval()}
        for name, path in tiny.adapters.items():
            base = AutoModelForCausalLM.from_pretrained(tiny.base_dir)
            self.models[name] = PeftModel.from_pretrained(base, path).eval()

    def _ids(self, prompt: str, plain: bool = False) -> torch.Tensor:
        """``plain``: text that spells a special token stays text (as the task routes encode their fields)."""
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False,
                              split_special_tokens=plain).input_ids

    @torch.no_grad()
    def generate(self, adapter: str | None, prompt: str, max_new_tokens: int, plain: bool = False) -> str:
        ids = self._ids(prompt, plain)
        out = self.models[adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def nli(self, adapter: str | None, premise: str, hypothesis: str, plain: bool = False) -> dict[str, float]:
        logits = self.models[adapter](self._ids(nli_prompt(premise, hypothesis), plain)).logits[0, -1]
        firsts = [self.tokenizer.encode(label_target(label), add_special_tokens=False)[0] for label in NLI_LABELS]
        return dict(zip(NLI_LABELS, logits[firsts].softmax(-1).tolist()))


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Reference:
    return Reference(tiny)


@pytest.mark.parametrize("adapter", [None, "one", "two"])
def test_answer_and_nli_match_transformers_on_the_shared_templates(client, reference, adapter):
    """Greedy /answer is transformers' greedy generation of answer_prompt, cut at the newline;
    /nli is the softmax over the labels' first tokens after nli_prompt; /v1/completions runs on past newlines."""
    for question in QUESTIONS[:2]:
        want = reference.generate(adapter, answer_prompt(SQUAD_CONTEXT, question), SERVER_CAP)
        got = ask(client, adapter, question=question, extractive=False)
        assert got["adapter"] == adapter
        assert got["answer"] == want.split("\n", 1)[0].strip()

    premise, hypothesis = "A dog runs in the park.", "An animal is outside."
    got = classify(client, adapter, premise=premise, hypothesis=hypothesis)
    assert got["adapter"] == adapter
    assert_close(got["probabilities"], reference.nli(adapter, premise, hypothesis))

    prompt = "The Normans gave their name to"
    reply = client.post("/v1/completions", json={"model": adapter or "base", "prompt": prompt, "max_tokens": 6,
                                                 "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == reference.generate(adapter, prompt, 6)


def test_nli_label_is_the_most_probable_of_three_summing_to_one(client):
    pairs = [("A man sleeps.", "Nobody sleeps."), ("Two kids play football.", "Children are outside."),
             ("The cat is black.", "The cat is on the mat.")]
    for adapter in (None, "one", "two"):
        for premise, hypothesis in pairs:
            reply = classify(client, adapter, premise=premise, hypothesis=hypothesis)
            probabilities = reply["probabilities"]
            assert set(probabilities) == set(NLI_LABELS)
            assert all(0.0 <= p <= 1.0 for p in probabilities.values())
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert reply["label"] == max(probabilities, key=probabilities.get)


def test_omitted_adapter_means_the_configured_task_adapter_and_null_the_bare_base(client):
    named, omitted = ask(client, "one"), client.post("/answer", json={"context": SQUAD_CONTEXT,
                                                                        "question": SQUAD_QUESTION}).json()
    assert omitted["adapter"] == "one" and omitted["answer"] == named["answer"]
    assert ask(client, None)["adapter"] is None
    nli = client.post("/nli", json={"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."}).json()
    assert nli["adapter"] == "two"
    assert nli["probabilities"] == classify(client, "two", premise="A man sleeps.",
                                            hypothesis="Nobody sleeps.")["probabilities"]


def test_null_for_a_field_with_a_default_is_that_default_and_null_adapter_the_bare_base(client):
    """Clients send None as null: /answer's and /nli's optional fields (and decoding's) take their defaults, as on
    OpenAI's routes (they were a 422); ``adapter`` null keeps its meaning, the bare base."""
    question = {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION}
    nulls = {"extractive": None, "decoding": None, "prompt_style": None}
    absent = client.post("/answer", json=question).json()
    for body in ({**question, **nulls}, {**question, "decoding": dict.fromkeys(DecodingIn.model_fields)}):
        reply = client.post("/answer", json=body)
        assert reply.status_code == 200, reply.text
        assert {**reply.json(), "latency_ms": 0, "score": 0} == {**absent, "latency_ms": 0, "score": 0}
        assert reply.json()["score"] == pytest.approx(absent["score"], rel=1e-5) and absent["adapter"] == "one"
    assert client.post("/answer", json={**question, **nulls, "adapter": None}).json()["adapter"] is None
    pair = {"premise": "A man sleeps.", "hypothesis": "Nobody sleeps."}
    default = client.post("/nli", json=pair).json()
    nulled = client.post("/nli", json={**pair, "labels": None, "prompt_style": None})
    assert nulled.status_code == 200 and nulled.json()["adapter"] == default["adapter"] == "two"
    assert_close(nulled.json()["probabilities"], default["probabilities"], 1e-5)
    assert client.post("/nli", json={**pair, "labels": None, "adapter": None}).json()["adapter"] is None
    greedy_top_k = client.post("/answer", json={**question, "decoding": {"strategy": "greedy", "top_k": 5}})
    assert greedy_top_k.status_code == 422  # a value the strategy does not read is still refused; null is not one


@pytest.mark.parametrize("name", ["none", "base", "None", "BASE", "Base"])
def test_none_and_base_name_the_bare_base_model_on_every_route(client, name):
    """The same requests under each name; the second of each pair reuses the first's cached prompt, so its numbers
    agree to float32 rounding (README, prefix caching)."""
    bare, named = ask(client, None), ask(client, name)
    assert named["adapter"] is None and {**named, "latency_ms": 0, "score": 0} == {**bare, "latency_ms": 0, "score": 0}
    assert named["score"] == pytest.approx(bare["score"], rel=1e-5)
    named_nli, bare_nli = classify(client, name), classify(client, None)
    assert {**named_nli, "probabilities": 0} == {**bare_nli, "probabilities": 0}
    assert_close(named_nli["probabilities"], bare_nli["probabilities"], 1e-5)
    body = {"prompt": "The Normans gave their name to", "max_tokens": 4, "temperature": 0}
    completions = [client.post("/v1/completions", json={**body, "model": model}).json() for model in (name, "base")]
    assert completions[0]["choices"] == completions[1]["choices"]


@pytest.mark.parametrize("name", ["none", "base", "NONE", "Base"])
def test_the_bare_base_model_is_listed_once_and_described_as_listed_by_either_name(client, name):
    listed = [model["id"] for model in client.get("/v1/models").json()["data"]]
    assert listed.count("base") == 1 and "none" not in listed
    assert client.get(f"/v1/models/{name}").json()["id"] == "base"


@pytest.mark.parametrize("route,body", [("/answer", {"context": "A b c.", "question": "B?"}),
                                        ("/nli", {"premise": "A b.", "hypothesis": "C d."})])
@pytest.mark.parametrize("name", ["", " ", "a b", "one ", "../one", "1abc", "é", "a" * 65, "x-y"])
def test_an_adapter_no_adapter_could_be_named_is_422_naming_the_field(client, route, body, name):
    reply = client.post(route, json={**body, "adapter": name})
    assert reply.status_code == 422, reply.text
    assert [problem["loc"] for problem in reply.json()["detail"]] == [["body", "adapter"]]
    assert "plain identifier" in reply.json()["detail"][0]["msg"]


def test_text_that_spells_a_special_token_is_plain_text_on_the_task_routes(client, reference):
    """A field of /answer or /nli that spells a control token (here the tiny tokenizer's end of text) is encoded
    as the characters it is; a raw /v1/completions prompt keeps the usual contract (the token is parsed)."""
    special = reference.tokenizer.eos_token
    premise, hypothesis = f"A dog {special} runs in the park.", f"{special}An animal is outside."
    got = classify(client, "two", premise=premise, hypothesis=hypothesis)["probabilities"]
    assert_close(got, reference.nli("two", premise, hypothesis, plain=True))
    parsed = reference.nli("two", premise, hypothesis)
    assert max(abs(got[label] - parsed[label]) for label in got) > 10 * PROBABILITY_TOLERANCE, "no difference to see"
    context = SQUAD_CONTEXT.replace("Denver", f"{special}Denver")
    want = reference.generate("one", answer_prompt(context, SQUAD_QUESTION), SERVER_CAP, plain=True)
    assert ask(client, "one", context=context, extractive=False)["answer"] == want.split("\n", 1)[0].strip()
    prompt = f"A story{special}:"
    reply = client.post("/v1/completions", json={"model": "one", "prompt": prompt, "max_tokens": 1})
    assert reply.json()["usage"]["prompt_tokens"] == len(reference.tokenizer.encode(prompt, add_special_tokens=False))


@pytest.mark.parametrize("strategy,parameters", [("top_k", {"top_k": 20}), ("nucleus", {"top_p": 0.95}),
                                                 ("temperature", {"temperature": 1.5})])
def test_a_seed_makes_sampling_reproducible(client, strategy, parameters):
    decoding = dict(strategy=strategy, max_new_tokens=6, **parameters)
    first = ask(client, "one", seed=7, **decoding)
    again = ask(client, "one", seed=7, **decoding)
    assert (again["answer"], again["tokens"]) == (first["answer"], first["tokens"])
    with ThreadPoolExecutor(max_workers=8) as pool:  # batched with other adapters and seeds: the same draws
        crowd = [(adapter, pool.submit(ask, client, adapter, seed=7 if adapter == "one" else 8, **decoding))
                 for adapter in ("one", "two", None, "one") * 2]
        assert all(reply.result()["answer"] == first["answer"] for adapter, reply in crowd if adapter == "one")
    answers = {ask(client, "one", seed=seed, **decoding)["answer"] for seed in range(6)}
    assert len(answers) > 1, f"six seeds of {strategy} sampling all gave {answers}"


@pytest.mark.parametrize("adapter", [None, "two"])
def test_degenerate_sampling_parameters_pick_the_greedy_token(client, adapter):
    """top_k=1 and a tiny top_p keep only the most likely token: the parameters reach the sampler."""
    greedy = ask(client, adapter, strategy="greedy", max_new_tokens=8)["answer"]
    top_1 = ask(client, adapter, strategy="top_k", top_k=1, temperature=2.0, seed=1, max_new_tokens=8)
    assert top_1["answer"] == greedy
    assert ask(client, adapter, strategy="nucleus", top_p=1e-6, temperature=2.0, seed=2,
               max_new_tokens=8)["answer"] == greedy
    assert ask(client, adapter, strategy="temperature", temperature=2.0, seed=3, max_new_tokens=8)["answer"] != greedy


def test_a_token_budget_past_the_servers_cap_is_refused_on_every_route(client):
    """/answer refuses a max_new_tokens above the server's cap, as /v1/completions refuses such a max_tokens (422
    naming the field and the cap; /answer cut it to the cap without a word), and generates up to its default of 32,
    at most the cap, when it names none; /v1/completions up to the cap."""
    for extractive in (True, False):
        assert all(ask(client, a, question=q, max_new_tokens=3, extractive=extractive)["tokens"] <= 3
                   for a in ("one", None) for q in QUESTIONS)
        for too_many in (SERVER_CAP + 1, 4096, 4097, 2**200):  # the cap named, whatever the number (4097 named 4096)
            refused = ask(client, "one", max_new_tokens=too_many, extractive=extractive, status=422)
            assert refused["detail"][0]["loc"] == ["body", "decoding", "max_new_tokens"], refused
            assert refused["error"].startswith("invalid request: body.decoding.max_new_tokens: Input should be less "
                                               f"than or equal to {SERVER_CAP}, the most tokens this server generates "
                                               "for a request (its LORASWAP_MAX_NEW_TOKENS)"), refused
        assert ask(client, "one", max_new_tokens=SERVER_CAP, extractive=extractive)["tokens"] <= SERVER_CAP
    defaulted = [ask(client, a, question=q, extractive=False)["tokens"] for a in ("one", None) for q in QUESTIONS]
    assert max(defaulted) == SERVER_CAP and all(t <= SERVER_CAP for t in defaulted), defaulted
    body = {"model": "two", "prompt": "Super Bowl", "temperature": 0}
    refused = client.post("/v1/completions", json={**body, "max_tokens": SERVER_CAP + 1})
    assert refused.status_code == 422 and f"less than or equal to {SERVER_CAP}" in error_message(refused)
    assert "(its LORASWAP_MAX_NEW_TOKENS)" in error_message(refused)  # it said max_new_tokens, the setting's field
    for reply in (client.post("/v1/completions", json=body).json(),
                  client.post("/v1/completions", json={**body, "max_tokens": SERVER_CAP}).json()):
        choice, usage = reply["choices"][0], reply["usage"]
        assert usage["completion_tokens"] <= SERVER_CAP
        assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == SERVER_CAP)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("adapter", [None, "one", "two"])
def test_offsets_index_the_answer_in_the_context_or_are_null(client, adapter):
    """Grow the context with the model's own answer until it occurs there: then context[start:end] == answer."""
    context = "  The Normans gave their name to Normandy, a region in France."  # leading blanks: raw offsets
    for _ in range(20):
        reply = ask(client, adapter, context=context, question="Who gave their name to Normandy?", max_new_tokens=1)
        if reply["start"] is not None:
            break
        assert reply["end"] is None
        assert reply["answer"].lower() not in context.lower() or not reply["answer"]
        context += " " + (reply["answer"] or "x")
    assert reply["start"] is not None, f"no answer of the model occurred in {context!r}"
    assert reply["answer"] and context[reply["start"]:reply["end"]] == reply["answer"]


@contextmanager
def forced_token_server(tiny_tokenizer_dir: Path, root: Path, text: str):
    """A server (no adapters) on a GPT-2 that always generates ``text``'s token."""
    base = forced_token_model(tiny_tokenizer_dir, root / "forced", text)
    (root / "none").mkdir()
    with ready_client(tiny_settings(base, root / "none", root / "cache")) as client:
        yield client


@pytest.mark.parametrize("stopper", ["\n", "<|endoftext|>"])
def test_answers_stop_at_newline_or_eos(stopper, tiny_tokenizer_dir, tmp_path):
    with forced_token_server(tiny_tokenizer_dir, tmp_path, stopper) as client:
        reply = ask(client, None, max_new_tokens=10, extractive=False)
        assert (reply["answer"], reply["start"], reply["end"]) == ("", None, None)
        assert reply["tokens"] <= 1
        spanned = ask(client, None, max_new_tokens=10)  # an extractive answer cannot end before it begins
        assert spanned["answer"] and SQUAD_CONTEXT[spanned["start"]:spanned["end"]] == spanned["answer"]
        completion = client.post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 5,
                                                          "temperature": 0}).json()["choices"][0]
    if stopper == "\n":  # completions do not stop at newlines
        assert (completion["text"], completion["finish_reason"]) == ("\n" * 5, "length")
    else:
        assert (completion["text"], completion["finish_reason"]) == ("", "stop")


def test_extractive_answers_are_spans_where_the_model_would_say_otherwise(tiny_tokenizer_dir, tmp_path):
    """The model says "the"; the context has only "The": an extractive answer is a span of the context all the same,
    a non-extractive one the model's text, with offsets only where that text occurs as it is."""
    context = "  The Normans came to Normandy."
    with forced_token_server(tiny_tokenizer_dir, tmp_path, " the") as client:
        raw = ask(client, None, context=context, max_new_tokens=1, extractive=False)
        spans = [ask(client, None, context=context, max_new_tokens=n) for n in (1, 2, 12)]
    assert (raw["answer"], raw["start"], raw["end"]) == ("the", None, None)
    for span in spans:
        assert span["answer"] and context[span["start"]:span["end"]] == span["answer"]


def test_concurrent_mixed_adapter_requests_match_each_adapter_alone(client):
    """40 greedy answers and 12 NLI requests over one, two and the bare base, all at once: each reply is
    what its adapter gives when asked alone."""
    adapters = ("one", "two", None)
    answers = [(adapters[i % 3], QUESTIONS[i % 4]) for i in range(40)]
    pairs = [(adapters[i % 3], f"Premise number {i % 4} is about football.") for i in range(12)]
    alone = {job: ask(client, job[0], question=job[1]) for job in set(answers)}
    alone_nli = {job: classify(client, job[0], premise=job[1]) for job in set(pairs)}
    for question in QUESTIONS:  # the adapters have visibly different effects
        assert len({alone[(adapter, question)]["answer"] for adapter in adapters}) == 3

    with ThreadPoolExecutor(max_workers=len(answers) + len(pairs)) as pool:
        together = [pool.submit(ask, client, adapter, question=question) for adapter, question in answers]
        together_nli = [pool.submit(classify, client, adapter, premise=premise) for adapter, premise in pairs]
        for job, future in zip(answers, together):
            reply = future.result()
            assert (reply["adapter"], reply["answer"], reply["tokens"]) == (
                job[0], alone[job]["answer"], alone[job]["tokens"]), job
        for job, future in zip(pairs, together_nli):
            assert_close(future.result()["probabilities"], alone_nli[job]["probabilities"])


def test_each_model_is_listed_with_a_unix_time(client):
    """A review: ``created`` was 0 (1970); it is when the server started, in Unix seconds, the same in every listing
    (two listings of the same models are equal)."""
    listed = client.get("/v1/models").json()["data"] + [client.get("/v1/models/base").json()]
    assert all(0 < model["created"] <= time.time() for model in listed), listed
    assert client.get("/v1/models").json()["data"] == listed[:-1]
