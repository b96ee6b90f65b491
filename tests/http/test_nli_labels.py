"""/nli's label probabilities held to stock transformers + peft on the same prompts: the default labels scored by their
first tokens with the temperature of the adapter's card, and a request's own labels scored over their whole
tokenization (labels that share a first token included), refused with a 422 naming ``labels`` when they cannot be."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from service.lora.card import CALIBRATION_FIELD, CARD_FILE
from service.tasks.labels import MOST_LABEL_CHARACTERS, MOST_LABEL_TOKENS, MOST_LABELS
from service.tasks.prompts import NLI_LABELS, encode_text, label_target, nli_prompt
from tests.http.api_helpers import Tiny, assert_close
from tests.http.replies import error_message, settings_by_field
from tests.http.test_api import Reference
from tests.server_helpers import ADMIN, ready_client

TEMPERATURE = 2.5
PREMISE, HYPOTHESIS = "A dog runs in the park.", "An animal is outside."
# in the tiny tokenizer " not sure" and " not likely" begin with " not", " the man" and " the woman" with " the"
SHARED_FIRST_TOKEN = ["not sure", "not likely", "the man", "the woman"]


@pytest.fixture(scope="module")
def reference(tiny: Tiny) -> Reference:
    return Reference(tiny)


@pytest.fixture(scope="module")
def calibrated(client, tiny: Tiny) -> str:
    """Adapter ``calibrated``: the weights of ``two`` with a card that holds T = 2.5 for the NLI labels, registered."""
    folder = tiny.extra / "calibrated"
    shutil.copytree(tiny.adapters["two"], folder)
    card = {"name": "calibrated", CALIBRATION_FIELD: {"temperature": TEMPERATURE, "labels": list(NLI_LABELS)}}
    (folder / CARD_FILE).write_text(json.dumps(card))
    reply = client.post("/adapters", json={"name": "calibrated", "path": str(folder)}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    return "two"  # the reference model with the same weights


@torch.no_grad()
def whole_label_probabilities(reference: Reference, adapter: str | None, labels: list[str]) -> dict[str, float]:
    """softmax over the labels of log P(label completion | prompt), each summed token by token from one forward pass
    of the reference model over prompt + completion."""
    prompt = encode_text(reference.tokenizer, nli_prompt(PREMISE, HYPOTHESIS))
    totals = []
    for label in labels:
        completion = encode_text(reference.tokenizer, label_target(label))
        logprobs = reference.models[adapter](torch.tensor([prompt + completion])).logits[0].double().log_softmax(-1)
        totals.append(sum(logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(completion)))
    return dict(zip(labels, torch.tensor(totals).softmax(-1).tolist()))


def first_token_probabilities(reference: Reference, adapter: str | None, temperature: float) -> dict[str, float]:
    """softmax(z / T) over the NLI labels' first-token logits z after the prompt (T = 1: the reference's ``nli``)."""
    plain = reference.nli(adapter, PREMISE, HYPOTHESIS, plain=True)
    logs = torch.tensor([math.log(plain[label]) for label in NLI_LABELS], dtype=torch.float64)
    return dict(zip(NLI_LABELS, (logs / temperature).softmax(-1).tolist()))


def assert_relatively_close(got: dict[str, float], want: dict[str, float]) -> None:
    """Each probability within 0.1% of its reference (a multi-token label's can be tiny: an absolute tolerance would
    let any pass)."""
    assert list(got) == list(want)
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-3, abs=1e-30), (got, want)


def nli(client, adapter: str | None, labels: list[str] | None = None, status: int = 200) -> dict:
    body = {"premise": PREMISE, "hypothesis": HYPOTHESIS, "adapter": adapter}
    reply = client.post("/nli", json=body if labels is None else {**body, "labels": labels})
    assert reply.status_code == status, reply.text
    return reply.json() if status == 200 else {"message": error_message(reply)}


def test_the_default_labels_take_the_temperature_of_the_adapters_card(client, reference, calibrated):
    got = nli(client, "calibrated")
    assert_close(got["probabilities"], first_token_probabilities(reference, calibrated, TEMPERATURE))
    uncalibrated = nli(client, "two")["probabilities"]  # the same weights, no card: T = 1
    assert_close(uncalibrated, first_token_probabilities(reference, calibrated, 1.0))
    assert max(abs(got["probabilities"][k] - uncalibrated[k]) for k in NLI_LABELS) > 1e-3
    assert got["label"] == max(uncalibrated, key=uncalibrated.get)  # a temperature changes no prediction


@pytest.mark.parametrize("adapter", [None, "one", "calibrated"])
def test_own_labels_are_scored_over_their_whole_tokenization(client, reference, calibrated, adapter):
    """Labels that share their first token get the probabilities of their whole completions (no temperature, even
    for a calibrated adapter: it holds for its own label set)."""
    tokens = [encode_text(reference.tokenizer, label_target(label)) for label in SHARED_FIRST_TOKEN]
    assert tokens[0][0] == tokens[1][0] and tokens[2][0] == tokens[3][0] and len(set(map(tuple, tokens))) == 4
    got = nli(client, adapter, SHARED_FIRST_TOKEN)
    want = whole_label_probabilities(reference, calibrated if adapter == "calibrated" else adapter, SHARED_FIRST_TOKEN)
    assert list(got["probabilities"]) == SHARED_FIRST_TOKEN
    assert_relatively_close(got["probabilities"], want)
    assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert got["label"] == max(want, key=want.get) and got["adapter"] == adapter
    for first, second in (("not sure", "not likely"), ("the man", "the woman")):  # first tokens alike, not whole
        assert not math.isclose(got["probabilities"][first], got["probabilities"][second], rel_tol=0.01)


def test_a_label_that_begins_another_and_the_default_labels_named_are_scored_whole(client, reference):
    labels = ["not", "not sure", *NLI_LABELS]
    got = nli(client, "one", labels)
    assert_relatively_close(got["probabilities"], whole_label_probabilities(reference, "one", labels))


@pytest.mark.parametrize("labels, why", [
    (["yes"], "at least 2"),
    ([f"label {i}" for i in range(MOST_LABELS + 1)], f"at most {MOST_LABELS}"),
    (["yes", "no", "yes"], "distinct"),
    (["yes", ""], "at least 1 character"),
    (["yes", "   "], "blank"),
    (["yes", "x" * (MOST_LABEL_CHARACTERS + 1)], f"at most {MOST_LABEL_CHARACTERS} characters"),
    (["yes", "\u3041" * (MOST_LABEL_TOKENS // 3 + 1)], f"at most {MOST_LABEL_TOKENS} are scored"),
    (["yes", 3], "valid string"),
    ("yes,no", "valid list"),
])
def test_labels_that_cannot_be_scored_are_refused_naming_the_field(client, labels, why):
    message = nli(client, "one", labels, status=422)["message"]
    assert "labels" in message and why in message, message


def test_labels_that_need_more_scoring_requests_than_the_queue_holds_are_413_as_a_long_context_is(tiny: Tiny):
    """Their scoring requests queue together, all or none (``Engine.submit_together``): more than ``--max-queue`` never
    fit, so the request is too large for this server (413 naming the queue), as a context of too many windows is;
    as many as the queue holds are scored."""
    labels = ["yes", "no"], ["not sure at all", "not likely"]
    with ready_client(tiny.settings(max_queue=2)) as client:
        assert sum(nli(client, None, labels[0])["probabilities"].values()) == pytest.approx(1.0)
        message = nli(client, None, labels[1], status=413)["message"]
    assert "scoring requests" in message and "(its LORASWAP_MAX_QUEUE)" in message, message  # was its field
    assert settings_by_field(message) == [], message
