"""Helpers for the HTTP-level tests: tiny-model settings, a ready in-process app, metric scrapes."""
from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.http.app import create_app
from service.settings import Settings

ADMIN_KEY = "k"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SERVER_CAP = 12  # max_new_tokens of the tiny test servers: short answers keep the suite fast

# a SQuAD v1.1 dev paragraph (Super Bowl 50), shortened
SQUAD_CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "(NFL) for the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the "
    "National Football Conference (NFC) champion Carolina Panthers 24-10 to earn their third Super Bowl title. "
    "The game was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, "
    "California."
)
SQUAD_QUESTION = "Which NFL team won Super Bowl 50?"


def free_port() -> int:
    """A port nothing listens on at the moment (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_adapters(adapters: dict[str, Path], folder: Path) -> Path:
    """A folder holding a copy of each adapter under its name (copies: symlinks would resolve outside roots)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in adapters.items():
        shutil.copytree(path, folder / name)
    return folder


def tiny_settings(base_dir: Path, adapters_dir: Path, cache_dir: Path, **overrides) -> Settings:
    """Settings for a tiny test server on the CPU: admin key ``k``, no auto-merge, short answers."""
    fields = {
        "base_model": str(base_dir), "adapters_dir": adapters_dir, "device": "cpu", "admin_key": ADMIN_KEY,
        "cache_dir": cache_dir, "auto_merge": False, "max_new_tokens": SERVER_CAP,
    }
    return Settings(**{**fields, **overrides})


def settings_in(root: Path, base_dir: Path, adapters: dict[str, Path], **overrides) -> Settings:
    """``tiny_settings`` for a server of its own under ``root``: a copy of ``adapters`` and a model cache there."""
    return tiny_settings(base_dir, copy_adapters(adapters, root / "adapters"), root / "cache", **overrides)


def wait_ready(get: Callable[[str], httpx.Response], timeout: float = 120.0) -> None:
    """Poll GET /ready until it answers 200; fail with the reason the service gives otherwise."""
    deadline = time.monotonic() + timeout
    reply = None
    while time.monotonic() < deadline:
        try:
            reply = get("/ready")
        except httpx.TransportError:  # a live server not listening yet
            reply = None
        if reply is not None and reply.status_code == 200:
            return
        if reply is not None and reply.json().get("reason", "loading") not in ("loading",):
            raise AssertionError(f"the service failed to start: {reply.json()}")
        time.sleep(0.05)
    raise AssertionError(f"the service was not ready within {timeout} s: {reply and reply.json()}")


@contextmanager
def ready_client(settings: Settings) -> Iterator[TestClient]:
    """An in-process client of ``create_app(settings)`` once its model is loaded."""
    with TestClient(create_app(settings)) as client:
        wait_ready(client.get)
        yield client


def ask(client, adapter: str | None = None, *, context: str = SQUAD_CONTEXT, question: str = SQUAD_QUESTION,
        extractive: bool = True, status: int = 200, **decoding) -> dict:
    """POST /answer (``adapter`` None asks the bare base) and check the status; returns the JSON reply."""
    body = {"context": context, "question": question, "adapter": adapter, "extractive": extractive,
            "decoding": decoding}
    reply = client.post("/answer", json=body)
    assert reply.status_code == status, reply.text
    if status == 200:
        assert set(reply.json()) == {"answer", "start", "end", "adapter", "tokens", "score", "latency_ms"}
        assert "\n" not in reply.json()["answer"]
    return reply.json()


def classify(client, adapter: str | None = None, *, premise: str = "A man plays a guitar on stage.",
             hypothesis: str = "A person is making music.", status: int = 200) -> dict:
    """POST /nli and check the status; returns the JSON reply."""
    reply = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": adapter})
    assert reply.status_code == status, reply.text
    return reply.json()


def listed(client) -> dict[str, dict]:
    """GET /adapters as {name: description}."""
    reply = client.get("/adapters")
    assert reply.status_code == 200, reply.text
    return {adapter["name"]: adapter for adapter in reply.json()["adapters"]}


Samples = dict[tuple[str, frozenset], float]


def scrape(client) -> Samples:
    """GET /metrics parsed with prometheus_client: {(sample name, frozenset(labels.items())): value}."""
    reply = client.get("/metrics")
    assert reply.status_code == 200, reply.text
    return samples_of(reply.text)


def samples_of(text: str) -> Samples:
    """A scrape's text (Prometheus' text format) parsed as ``scrape`` parses it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, label: str) -> set[str]:
    """Every value ``label`` takes across all loraswap_ series."""
    return {dict(labels)[label] for name, labels in samples if name.startswith("loraswap_") and label in dict(labels)}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail the test saying ``what`` did not happen within ``timeout``
    seconds (a bound, so that a test fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)
