"""The requests a load test sends, and what a reply answers. Each ``Ask`` is one request of one endpoint (``/answer``,
``/nli`` or ``/v1/completions``), sent to any adapter: a SQuAD dev question (greedy, under the span constraint), an
NLI pair, or a SQuAD question's prompt completed greedily. Its right answer per adapter comes from the answer key
(``answer_key``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loadtest.workload import nli_items, squad_items

ENDPOINTS = ("/answer", "/nli", "/v1/completions")


@dataclass(frozen=True)
class Ask:
    """One request: its ``endpoint`` (one of ENDPOINTS) and its body's fields but the adapter."""

    endpoint: str
    fields: dict

    def body(self, adapter: str) -> dict:
        """The JSON body that asks ``adapter``: ``model`` on /v1, ``adapter`` elsewhere."""
        return {**self.fields, ("model" if self.endpoint.startswith("/v1/") else "adapter"): adapter}


def asks(squad: Path, nli: tuple[Path, tuple[str, ...] | None], count: int, new_tokens: int) -> list[Ask]:
    """``count`` requests, the endpoints taking turns (ENDPOINTS' order): /answer and /v1/completions on the first
    SQuAD dev questions of ``squad``, /nli on the first pairs of ``nli`` (a file and the MNLI splits it keeps, None:
    all), every answer greedy and at most ``new_tokens`` tokens. Raises FileNotFoundError for an absent file."""
    per_endpoint = -(-count // len(ENDPOINTS))
    questions = iter(squad_items(squad, 2 * per_endpoint))
    pairs = iter(nli_items(nli[0], nli[1], per_endpoint))
    made = []
    for i in range(count):
        endpoint = ENDPOINTS[i % len(ENDPOINTS)]
        if endpoint == "/nli":
            made.append(Ask(endpoint, next(pairs).fields))
        elif endpoint == "/answer":
            made.append(Ask(endpoint, {**next(questions).fields, "extractive": True,
                                       "decoding": {"strategy": "greedy", "max_new_tokens": new_tokens}}))
        else:
            made.append(Ask(endpoint, {"prompt": next(questions).prompt, "max_tokens": new_tokens,
                                       "temperature": 0}))
    return made


def answer_of(endpoint: str, reply: dict) -> dict:
    """What a 200 reply of ``endpoint`` answers, with the adapter it says it used: /answer's answer and offsets,
    /nli's label and probabilities, /v1's first choice's text. KeyError (or IndexError) for a reply of another
    shape."""
    if endpoint == "/answer":
        return {"adapter": reply["adapter"], "answer": reply["answer"], "start": reply["start"], "end": reply["end"]}
    if endpoint == "/nli":
        return {"adapter": reply["adapter"], "label": reply["label"], "probabilities": reply["probabilities"]}
    return {"adapter": reply["model"], "text": reply["choices"][0]["text"]}


def same(got: dict, want: dict, tolerance: float) -> bool:
    """Whether two answers (``answer_of``) agree: equal, but for probabilities, which may differ by ``tolerance``
    each (batching changes float rounding)."""
    if got.keys() != want.keys():
        return False
    for field, value in want.items():
        if field == "probabilities":
            if value.keys() != got[field].keys() or any(abs(got[field][k] - v) > tolerance for k, v in value.items()):
                return False
        elif got[field] != value:
            return False
    return True
