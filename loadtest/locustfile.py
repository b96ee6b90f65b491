"""Locust scenario: /answer and /nli requests mixed across adapters and decoding strategies.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Questions and NLI pairs come from the real data (``$LORASWAP_DATA_DIR`` or ``shared/data``).
Adapters: ``$LORASWAP_LOADTEST_ADAPTERS`` (comma-separated, used by both endpoints), else the
ones ``GET /adapters`` lists, else ``squad`` for /answer and ``nli`` for /nli. Every request sends the server's API key,
``$LORASWAP_API_KEY``, where it is set (as ``loraswap loadtest`` and ``side-by-side`` send it).
"""
from __future__ import annotations

import os
import random
from functools import cache

from locust import HttpUser, between, task

from loadtest.endpoints import bearer
from service.settings import LOADTEST_ADAPTERS_VARIABLE, variable
from training.data import data_dir, naming_default_data, read_nli, read_squad

DECODINGS = (
    {"strategy": "greedy"},
    {"strategy": "top_k", "top_k": 20},
    {"strategy": "nucleus", "top_p": 0.9},
    {"strategy": "temperature", "temperature": 0.7},
)


@cache
def squad_rows() -> list[dict]:
    """The SQuAD dev questions (``read_squad`` rows), read once. Raises UsageError naming LORASWAP_DATA_DIR when the
    file is absent (``naming_default_data``; a review: FileNotFoundError named neither)."""
    with naming_default_data({}):
        return read_squad(data_dir() / "squad" / "dev-v1.1.json.gz")


@cache
def nli_rows() -> list[dict]:
    """The MNLI pairs, all splits (``read_nli`` rows), read once. Raises UsageError naming LORASWAP_DATA_DIR when the
    file is absent (``naming_default_data``)."""
    with naming_default_data({}):
        return read_nli(data_dir() / "nli" / "mnli.jsonl.gz")


def adapter_names(payload) -> list[str]:
    """Names from a ``GET /adapters`` body: a list (or ``{"adapters": [...]}``) of names or dicts."""
    items = payload.get("adapters", []) if isinstance(payload, dict) else payload
    return [item["name"] if isinstance(item, dict) else str(item) for item in items]


class LoraswapUser(HttpUser):
    """A client that sends /answer and /nli requests (3 to 2) to random adapters, waiting 0.05 to 0.5 s between."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        """Read the data (an absent file fails the user at its start, naming LORASWAP_DATA_DIR, not each of its
        tasks), then pick the adapters this user sends to: the environment's, else the server's, else the defaults."""
        squad_rows(), nli_rows()
        self.client.headers.update(bearer(os.environ.get(variable("api_key"))))
        names = [n.strip() for n in os.environ.get(LOADTEST_ADAPTERS_VARIABLE, "").split(",") if n.strip()]
        if not names:
            with self.client.get("/adapters", name="/adapters", catch_response=True) as response:
                names = adapter_names(response.json()) if response.ok else []
                response.success()  # discovery is optional; fall back to the defaults
        self.qa_adapters = names or ["squad"]
        self.nli_adapters = names or ["nli"]

    @task(3)
    def answer(self) -> None:
        """POST /answer: a random SQuAD question, adapter and decoding strategy, at most 24 new tokens."""
        row = random.choice(squad_rows())
        decoding = {**random.choice(DECODINGS), "max_new_tokens": 24}
        if decoding["strategy"] != "greedy":  # greedy draws nothing: a seed with it is refused
            decoding["seed"] = random.randrange(2**31)
        body = {"context": row["context"], "question": row["question"], "adapter": random.choice(self.qa_adapters)}
        self.client.post("/answer", json={**body, "decoding": decoding}, name="/answer")

    @task(2)
    def nli(self) -> None:
        """POST /nli: a random MNLI pair scored with a random adapter."""
        row = random.choice(nli_rows())
        body = {"premise": row["premise"], "hypothesis": row["hypothesis"], "adapter": random.choice(self.nli_adapters)}
        self.client.post("/nli", json=body, name="/nli")
