"""The HTTP API in process (FastAPI TestClient) on the tiny GPT-2 and Llama bases.

Outputs are held to stock transformers + peft run on the same prompt template; per-request adapters,
seeded sampling, offsets, admin routes (load, unload, LRU, merge/unmerge, auth) and error replies.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.http.app import create_app
from service.runtime import Runtime
from service.tasks.prompts import NLI_LABELS, answer_prompt, label_target, nli_prompt
from tests.http.replies import error_message
from tests.server_helpers import (
    ADMIN,
    SERVER_CAP,
    SQUAD_CONTEXT,
    SQUAD_QUESTION,
    ask,
    classify,
    copy_adapters,
    listed,
    ready_client,
    scrape,
    tiny_settings,
    value,
)
from tests.tiny_models import LINEAR_TARGETS, build_gpt2, make_adapter

ARCHS = {"gpt2": ("tiny_gpt2_dir", "gpt2_adapters"), "llama": ("tiny_llama_dir", "llama_adapters")}
QUESTIONS = (SQUAD_QUESTION, "Where was the game played?", "Who lost?", "When was the game played?")
PROBABILITY_TOLERANCE = 1e-4


class Tiny:
    """One architecture's tiny base, its adapters, and a folder of extra adapters inside the roots."""

    def __init__(self, arch: str, base_dir: Path, adapters: dict[str, Path], root: Path):
        self.arch, self.base_dir, self.adapters, self.root = arch, base_dir, adapters, root
        self.adapters_dir = copy_adapters(adapters, root / "served")
        self.extra = root / "extra"
        self.extra_adapters = {"three": make_adapter(base_dir, self.extra / "three", seed=2),
                               "four": make_adapter(base_dir, self.extra / "four", seed=3, r=2, alpha=4)}

    def settings(self, **overrides):
        return tiny_settings(self.base_dir, self.adapters_dir, self.root / "cache",
                             adapter_roots=[self.extra], **overrides)


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory) -> Tiny:
    base_fixture, adapters_fixture = ARCHS[request.param]
    return Tiny(request.param, request.getfixturevalue(base_fixture), request.getfixturevalue(adapters_fixture),
                tmp_path_factory.mktemp(f"api_{request.param}"))


@pytest.fixture(scope="module")
def client(tiny: Tiny):
    """The main server: adapters one and two, /answer defaults to one and /nli to two."""
    with ready_client(tiny.settings(qa_adapter="one", nli_adapter="two")) as client:
        yield client


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


def assert_close(got: dict[str, float], want: dict[str, float], tolerance: float = PROBABILITY_TOLERANCE) -> None:
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= tolerance for k in want), (got, want)


def nli_probabilities(client, adapter: str | None) -> dict[str, float]:
    return classify(client, adapter)["probabilities"]


# ---- tasks --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", ["none", "base"])
def test_none_and_base_name_the_bare_base_model_on_every_route(client, name):
    bare, named = ask(client, None), ask(client, name)
    assert named["adapter"] is None and {**named, "latency_ms": 0} == {**bare, "latency_ms": 0}
    assert classify(client, name) == classify(client, None)
    body = {"prompt": "The Normans gave their name to", "max_tokens": 4, "temperature": 0}
    completions = [client.post("/v1/completions", json={**body, "model": model}).json() for model in (name, "base")]
    assert completions[0]["choices"] == completions[1]["choices"]


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
    top_1 = ask(client, adapter, strategy="top_k", top_k=1, temperature=3.0, seed=1, max_new_tokens=8)
    assert top_1["answer"] == greedy
    assert ask(client, adapter, strategy="nucleus", top_p=1e-6, temperature=3.0, seed=2,
               max_new_tokens=8)["answer"] == greedy
    assert ask(client, adapter, strategy="temperature", temperature=3.0, seed=3, max_new_tokens=8)["answer"] != greedy


def test_max_new_tokens_is_capped_by_the_server(client):
    """/answer cuts its max_new_tokens at the server's cap; /v1/completions refuses a max_tokens above it (422 naming
    the cap) and generates up to the cap when it names none."""
    assert all(ask(client, a, question=q, max_new_tokens=3)["tokens"] <= 3 for a in ("one", None) for q in QUESTIONS)
    capped = [ask(client, a, question=q, max_new_tokens=4096)["tokens"] for a in ("one", None) for q in QUESTIONS]
    assert max(capped) == SERVER_CAP and all(t <= SERVER_CAP for t in capped), capped
    body = {"model": "two", "prompt": "Super Bowl", "temperature": 0}
    refused = client.post("/v1/completions", json={**body, "max_tokens": SERVER_CAP + 1})
    assert refused.status_code == 422 and f"less than or equal to {SERVER_CAP}" in error_message(refused)
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


def forced_token_model(tiny_tokenizer_dir: Path, out_dir: Path, text: str) -> Path:
    """A GPT-2 whose every next token is ``text``'s token: ln_f emits its (enlarged) embedding whatever the input."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(build_gpt2(tiny_tokenizer_dir, out_dir))
    with torch.no_grad():
        embedding = model.transformer.wte.weight
        embedding[token] *= 4 * embedding.norm(dim=-1).max() / embedding[token].norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(embedding[token])  # logits = wte @ wte[token]: largest at ``token``
    model.save_pretrained(out_dir)
    return out_dir


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
        reply = ask(client, None, max_new_tokens=10)
        assert (reply["answer"], reply["start"], reply["end"]) == ("", None, None)
        assert reply["tokens"] <= 1
        completion = client.post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 5,
                                                          "temperature": 0}).json()["choices"][0]
    if stopper == "\n":  # completions do not stop at newlines
        assert (completion["text"], completion["finish_reason"]) == ("\n" * 5, "length")
    else:
        assert (completion["text"], completion["finish_reason"]) == ("", "stop")


def test_extractive_answers_take_the_contexts_spelling(tiny_tokenizer_dir, tmp_path):
    """The model says "the"; the context has only "The": extractive answers give the context's span,
    non-extractive ones the model's text, with offsets only where that text occurs as it is."""
    context = "  The Normans came to Normandy."
    with forced_token_server(tiny_tokenizer_dir, tmp_path, " the") as client:
        snapped = ask(client, None, context=context, max_new_tokens=1)
        raw = ask(client, None, context=context, max_new_tokens=1, extractive=False)
        absent = ask(client, None, context=context, max_new_tokens=2)
    assert (snapped["answer"], snapped["start"], snapped["end"]) == ("The", 2, 5)
    assert (raw["answer"], raw["start"], raw["end"]) == ("the", None, None)
    assert (absent["answer"], absent["start"], absent["end"]) == ("the the", None, None)


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


# ---- admin routes -------------------------------------------------------------------------------


def test_list_adapters_describes_each_one(client, tiny):
    adapters = listed(client)
    assert set(adapters) == {"one", "two"}
    for name, path in tiny.adapters.items():
        adapter = adapters[name]
        assert (adapter["rank"], adapter["alpha"]) == (4, 8)
        assert sorted(adapter["target_modules"]) == sorted(LINEAR_TARGETS[tiny.arch])
        stored = load_file(path / "adapter_model.safetensors")
        assert adapter["size_bytes"] == sum(t.numel() * 4 for t in stored.values())  # fp32 A and B
        assert adapter["state"] in ("loaded", "resident")
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} == {"base", "one", "two"}


def test_load_and_unload_at_run_time(client, tiny):
    before = listed(client)
    reply = client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert reply.json()["name"] == "three" and reply.json()["rank"] == 4
    assert listed(client).keys() == before.keys() | {"three"}
    three = ask(client, "three")
    assert three["adapter"] == "three" and three["answer"] != ask(client, "one")["answer"]
    assert "three" in {m["id"] for m in client.get("/v1/models").json()["data"]}

    reply = client.delete("/adapters/three", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert listed(client).keys() == before.keys()
    assert "three" in ask(client, "three", status=404)["error"]
    assert classify(client, "three", status=404)["error"]
    assert client.post("/v1/completions", json={"model": "three", "prompt": "Hi"}).status_code == 404
    assert client.delete("/adapters/three", headers=ADMIN).status_code == 404


def test_merge_then_unmerge_restores_outputs(client):
    before = {a: (nli_probabilities(client, a), ask(client, a)["answer"]) for a in ("one", "two", None)}

    reply = client.post("/adapters/one/merge", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert listed(client)["one"]["state"] == "merged" and client.get("/adapters").json()["merged"] == "one"
    for _ in range(2):  # merged weights give the adapter's outputs
        assert_close(nli_probabilities(client, "one"), before["one"][0])
        assert ask(client, "one")["answer"] == before["one"][1]

    reply = client.post("/adapters/unmerge", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert client.get("/adapters").json()["merged"] is None and listed(client)["one"]["state"] != "merged"
    for adapter, (probabilities, answer) in before.items():
        assert_close(nli_probabilities(client, adapter), probabilities, tolerance=1e-6)
        assert ask(client, adapter)["answer"] == answer


def test_deleting_the_merged_adapter_restores_the_base_first(client, tiny):
    before = {a: (nli_probabilities(client, a), ask(client, a)["answer"]) for a in ("two", None)}
    reply = client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert client.post("/adapters/three/merge", headers=ADMIN).json()["merged"] == "three"
    reply = client.delete("/adapters/three", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    assert client.get("/adapters").json()["merged"] is None and "three" not in listed(client)
    for adapter, (probabilities, answer) in before.items():
        assert_close(nli_probabilities(client, adapter), probabilities, tolerance=1e-6)
        assert ask(client, adapter)["answer"] == answer
    assert "three" in ask(client, "three", status=404)["error"]


@pytest.mark.parametrize("other", [None, "two"])
def test_requests_for_other_weights_while_merged_get_their_own(client, other):
    """A request for the bare base or another adapter never runs on the merged weights."""
    want = (nli_probabilities(client, other), ask(client, other)["answer"])
    assert client.post("/adapters/one/merge", headers=ADMIN).status_code == 200
    assert_close(nli_probabilities(client, other), want[0])
    assert ask(client, other)["answer"] == want[1]
    assert client.post("/adapters/unmerge", headers=ADMIN).status_code == 200


def test_lru_keeps_a_bounded_number_resident(tiny):
    """max_resident=2 with four adapters in turn: two resident, the least recently used evicted, outputs unchanged."""
    with ready_client(tiny.settings(max_resident=2)) as client:
        for name, path in tiny.extra_adapters.items():
            assert client.post("/adapters", json={"name": name, "path": str(path)}, headers=ADMIN).status_code == 201
        first = {name: ask(client, name, max_new_tokens=4)["answer"] for name in ("one", "two", "three", "four")}
        states = {name: adapter["state"] for name, adapter in listed(client).items()}
        assert states == {"one": "loaded", "two": "loaded", "three": "resident", "four": "resident"}
        assert value(scrape(client), "loraswap_adapters_resident") == 2
        assert ask(client, "one", max_new_tokens=4)["answer"] == first["one"]  # evicts three, the LRU
        states = {name: adapter["state"] for name, adapter in listed(client).items()}
        assert states == {"one": "resident", "two": "loaded", "three": "loaded", "four": "resident"}
        for name in ("two", "three", "four", "one"):
            assert ask(client, name, max_new_tokens=4)["answer"] == first[name]
        assert value(scrape(client), "loraswap_adapters_resident") == 2


def test_a_batch_over_more_adapters_than_slots_still_succeeds(tiny):
    """Concurrent requests for three adapters with two slots: every one answers, with its own adapter's output."""
    with ready_client(tiny.settings(max_resident=2, batch_window_ms=200)) as client:
        assert client.post("/adapters", json={"name": "three", "path": str(tiny.extra / "three")},
                           headers=ADMIN).status_code == 201
        alone = {name: ask(client, name, max_new_tokens=4)["answer"] for name in ("one", "two", "three")}
        with ThreadPoolExecutor(max_workers=9) as pool:
            futures = {pool.submit(ask, client, name, max_new_tokens=4): name for name in ("one", "two", "three") * 3}
            assert all(future.result()["answer"] == alone[name] for future, name in futures.items())


def test_an_unregistered_default_adapter_falls_back_to_the_bare_base(tiny):
    with ready_client(tiny.settings(qa_adapter="squad", nli_adapter="nli")) as client:
        reply = client.post("/answer", json={"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION})
        assert reply.status_code == 200 and reply.json()["adapter"] is None
        assert reply.json()["answer"] == ask(client, None)["answer"]
        assert client.post("/nli", json={"premise": "A b.", "hypothesis": "C d."}).json()["adapter"] is None


ADMIN_CALLS = [("post", "/adapters", {"name": "x", "path": "/tmp"}), ("delete", "/adapters/one", None),
               ("post", "/adapters/one/merge", None), ("post", "/adapters/unmerge", None)]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_admin_routes_need_the_key(client, method, path, body):
    before = client.get("/adapters").json()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        reply = client.request(method, path, json=body, headers=headers)
        assert reply.status_code == 401, reply.text
        assert "Bearer" in reply.json()["error"] and reply.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/adapters").json() == before


def test_admin_routes_are_refused_without_a_configured_key(tiny):
    with ready_client(tiny.settings(admin_key=None)) as client:
        for method, path, body in ADMIN_CALLS:
            for headers in ({}, ADMIN, {"Authorization": "Bearer None"}):
                reply = client.request(method, path, json=body, headers=headers)
                assert reply.status_code == 403, reply.text
                assert "no admin key" in reply.json()["error"]
        assert set(listed(client)) == {"one", "two"}


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", [
    ("post", "/answer", {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "nope"}),
    ("post", "/nli", {"premise": "A b.", "hypothesis": "C d.", "adapter": "nope"}),
    ("post", "/v1/completions", {"model": "nope", "prompt": "Hello"}),
    ("delete", "/adapters/nope", None),
    ("post", "/adapters/nope/merge", None),
])
def test_unknown_adapter_is_404(client, method, path, body):
    reply = client.request(method, path, json=body, headers=ADMIN)
    assert reply.status_code == 404, reply.text
    assert "'nope'" in error_message(reply)


@pytest.mark.parametrize("method,path,route,body,headers,status", [
    ("post", "/answer", "/answer", {"context": "x", "question": "y", "adapter": "nope"}, {}, 404),
    ("post", "/nli", "/nli", {"premise": "A man sleeps in a chair. " * 200, "hypothesis": "x"}, {}, 413),
    ("post", "/v1/completions", "/v1/completions", b"1\xff\xff", {"content-type": "application/json"}, 400),
    ("post", "/adapters", "/adapters", {"name": "one", "path": "."}, {}, 401),
    ("post", "/adapters", "/adapters", {"name": "x", "path": "/etc"}, ADMIN, 403),
    ("delete", "/adapters/nope", "/adapters/{name}", None, ADMIN, 404),
    ("post", "/adapters/nope/merge", "/adapters/{name}/merge", None, ADMIN, 404),
])
def test_error_replies_are_documented_in_the_api_schema(client, method, path, route, body, headers, status):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = client.request(method, path, headers=headers, **sent)
    assert reply.status_code == status and error_message(reply), reply.text
    documented = client.get("/openapi.json").json()["paths"][route][method]["responses"]
    shape = "OpenAIErrorOut" if route.startswith("/v1/") else "ErrorOut"
    assert documented[str(status)]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}


GOOD = {"context": SQUAD_CONTEXT, "question": SQUAD_QUESTION, "adapter": "one"}


@pytest.mark.parametrize("body,field", [
    ({**GOOD, "decoding": {"strategy": "beam"}}, "strategy"),
    ({**GOOD, "decoding": {"strategy": "temperature", "temperature": -1}}, "temperature"),
    ({**GOOD, "decoding": {"temperature": 0}}, "temperature"),
    ({**GOOD, "decoding": {"top_p": 1.5}}, "top_p"),
    ({**GOOD, "decoding": {"top_k": 0}}, "top_k"),
    ({**GOOD, "decoding": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({**GOOD, "decoding": {"seed": -1}}, "seed"),
    ({**GOOD, "decoding": {"beams": 4}}, "beams"),
    ({**GOOD, "question": ""}, "question"),
    ({**GOOD, "question": "   "}, "blank"),
    ({**GOOD, "colour": "red"}, "colour"),
    ({"question": SQUAD_QUESTION}, "context"),
    ({**GOOD, "adapter": 3}, "adapter"),
    ({**GOOD, "decoding": {"seed": False}}, "seed"),  # no coercion: a boolean is not a seed...
    ({**GOOD, "decoding": {"top_k": "5"}}, "top_k"),  # ...nor a string a number
])
def test_invalid_answer_input_is_422(client, body, field):
    reply = client.post("/answer", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"].startswith("invalid request") and field in reply.json()["error"]


@pytest.mark.parametrize("path,body", [
    ("/nli", {"premise": "", "hypothesis": "x"}),
    ("/nli", {"premise": "x", "hypothesis": "y", "extra": 1}),
    ("/v1/completions", {"model": "one", "prompt": "x", "n": 0}),
    ("/v1/completions", {"model": "one", "prompt": "x", "temperature": -0.5}),
    ("/v1/completions", {"model": "one", "prompt": "x", "max_tokens": "3"}),
    ("/adapters", {"name": "x"}),
])
def test_invalid_input_elsewhere_is_422(client, path, body):
    reply = client.post(path, json=body, headers=ADMIN)
    assert reply.status_code == 422, reply.text
    assert error_message(reply).startswith("invalid request")


@pytest.mark.parametrize("path,body", [
    ("/answer", {"context": "Normandy is a region in France. " * 200, "question": SQUAD_QUESTION}),
    ("/nli", {"premise": "A man sleeps in a chair. " * 200, "hypothesis": "Nobody sleeps."}),
    ("/v1/completions", {"model": "base", "prompt": "Once upon a time " * 300}),
])
def test_input_too_long_is_413(client, path, body):
    reply = client.post(path, json=body)
    assert reply.status_code == 413, reply.text
    assert "tokens" in error_message(reply)


def test_max_input_tokens_is_the_longest_prompt_accepted(tiny):
    """A prompt of exactly max_input_tokens tokens is served; a longer one is 413."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)

    def prompt_tokens(context: str) -> int:
        return len(tokenizer.encode(answer_prompt(context, SQUAD_QUESTION), add_special_tokens=False))

    words = SQUAD_CONTEXT.split()
    n = max(n for n in range(1, len(words)) if prompt_tokens(" ".join(words[:n])) <= 40)
    fits, over = " ".join(words[:n]), " ".join(words[:n + 1])
    limit = prompt_tokens(fits)
    assert prompt_tokens(over) > limit
    with ready_client(tiny.settings(max_input_tokens=limit)) as client:
        assert ask(client, None, context=fits, max_new_tokens=1)["tokens"] == 1
        too_long = ask(client, None, context=over, status=413)
    assert f"at most {limit}" in too_long["error"]


def test_a_full_queue_answers_429_with_retry_after(tiny):
    """max_queue=1 and a long batch window: the first request waits in the queue for the window, so the
    others find the queue full at once; they get 429 with Retry-After and the first one its answer."""
    with (ready_client(tiny.settings(max_queue=1, batch_window_ms=1500)) as client,
          ThreadPoolExecutor(max_workers=6) as pool):
        replies = list(pool.map(lambda _: client.post("/answer", json={**GOOD, "decoding": {"max_new_tokens": 2}}),
                                range(6)))
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200] + [429] * 5, statuses
    for reply in replies:
        if reply.status_code == 429:
            assert int(reply.headers["Retry-After"]) >= 1
            assert "queue is full" in reply.json()["error"]


def test_503_until_the_model_is_loaded(tiny):
    """Without the lifespan the runtime never starts: task routes answer 503 with Retry-After, /health 200."""
    client = TestClient(create_app(rt=Runtime(tiny.settings())))  # no `with`: startup never runs
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 503 and client.get("/ready").json()["reason"] == "loading"
    for method, path, body in [("post", "/answer", GOOD), ("post", "/nli", {"premise": "a", "hypothesis": "b"}),
                               ("post", "/v1/completions", {"model": "base", "prompt": "x"}),
                               ("get", "/v1/models", None), ("get", "/adapters", None), *ADMIN_CALLS]:
        reply = client.request(method, path, json=body, headers=ADMIN)
        assert reply.status_code == 503, (path, reply.text)
        assert "loading" in error_message(reply) and reply.headers["Retry-After"]


def test_a_failed_start_is_reported_by_ready(tiny, tmp_path):
    with TestClient(create_app(tiny.settings(base_model=str(tmp_path / "missing")))) as client:
        for _ in range(200):
            reply = client.get("/ready")
            if reply.json()["reason"] != "loading":
                break
            time.sleep(0.05)
        assert reply.status_code == 503 and "no Hugging Face model directory" in reply.json()["reason"]
        assert client.post("/answer", json=GOOD).status_code == 503
