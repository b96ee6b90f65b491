"""The harness of the engine tests: engines over the tiny bases, requests built from a seeded generator, and ways to
hold or watch the engine thread between batches and steps (the ``engines`` fixture is in conftest.py)."""
from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.engine.requests import Generation, GenerationResult
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from service.lora.registry import AdapterRegistry
from service.model.base_model import load_base
from service.settings import Settings
from tests.lora_helpers import BASES, make_ranked_adapters

WAIT = 60  # seconds any single future may take before the test fails instead of hanging


class Engines:
    """Engines over the tiny bases: one shared reference engine per architecture, and fresh ones on demand."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
        self.request, self.tmp_path_factory = request, tmp_path_factory
        self.adapters: dict[str, tuple[Path, dict[str, Path]]] = {}
        self.shared_engines: dict[str, Engine] = {}
        self.started: list[Engine] = []

    def base(self, arch: str) -> tuple[Path, dict[str, Path]]:
        if arch not in self.adapters:
            base_dir = self.request.getfixturevalue(BASES[arch])
            root = self.tmp_path_factory.mktemp(f"engine_{arch}")
            self.adapters[arch] = base_dir, make_ranked_adapters(base_dir, root, arch)
        return self.adapters[arch]

    def fresh(self, arch: str = "llama", before_engine=None, **overrides) -> Engine:
        """A started engine on its own copy of the base, with r2, r4 and r8 registered."""
        base_dir, adapters = self.base(arch)
        options = {"auto_merge": False, "batch_window_ms": 5, "max_batch": 16, "max_queue": 256, "max_new_tokens": 32}
        settings = Settings(base_model=str(base_dir), device="cpu", **{**options, **overrides})
        model, tokenizer = load_base(settings)
        registry = AdapterRegistry(model, roots=[next(iter(adapters.values())).parent],
                                   max_resident=settings.max_resident, max_rank=settings.max_rank)
        for name, path in adapters.items():
            registry.register(name, path)
        if before_engine is not None:
            before_engine(model)
        engine = Engine(model, tokenizer, registry, settings)
        engine.start()
        self.started.append(engine)
        return engine

    def shared(self, arch: str = "llama") -> Engine:
        """The reference engine of ``arch`` (never merges)."""
        if arch not in self.shared_engines:
            self.shared_engines[arch] = self.fresh(arch)
        return self.shared_engines[arch]

    def close(self) -> None:
        for engine in self.started:
            engine.stop(timeout=WAIT)


def alone(engine: Engine, work):
    return engine.submit(work).result(WAIT)


def results(futures: list[Future]) -> list:
    return [future.result(WAIT) for future in futures]


@contextmanager
def paused(engine: Engine):
    """Hold the engine thread between batches, so that everything submitted meanwhile is batched together."""
    holding, release = threading.Event(), threading.Event()
    held = engine.call(lambda: (holding.set(), release.wait(WAIT)))
    assert holding.wait(WAIT), "the engine thread never ran the control call"
    try:
        yield
    finally:
        release.set()
        held.result(WAIT)


def prompt(rng: random.Random, shortest: int = 2, longest: int = 24) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(rng.randint(shortest, longest))]


def greedy(rng: random.Random, adapter: str | None, max_new_tokens: int = 10, stop_at_newline=False) -> Generation:
    return Generation(prompt(rng), adapter, Decoding(max_new_tokens=max_new_tokens), stop_at_newline=stop_at_newline)


def same_output(got: GenerationResult, expected: GenerationResult) -> bool:
    return (got.token_ids, got.text, got.finish_reason) == (expected.token_ids, expected.text, expected.finish_reason)


def assert_same_outputs(got: list[GenerationResult], expected: list[GenerationResult], works: list[Generation]):
    wrong = [(row, work.adapter) for row, (a, b, work) in enumerate(zip(got, expected, works)) if not same_output(a, b)]
    assert not wrong, f"rows (index, adapter) that differ from the request run alone: {wrong}"


class WatchedSteps:
    """The engine's decoder, noting ``note(tokens)`` at every step; with ``hold_at``, it holds the engine thread
    before that step until ``release`` is set."""

    def __init__(self, decoder, note: Callable = len, hold_at: int | None = None):
        self.decoder, self.note, self.hold_at = decoder, note, hold_at
        self.notes: list = []
        self.holding, self.release = threading.Event(), threading.Event()

    def __call__(self, tokens, positions):
        self.notes.append(self.note(tokens))
        if len(self.notes) == self.hold_at:
            self.holding.set()
            self.release.wait(WAIT)
        return self.decoder(tokens, positions)

    def __getattr__(self, name):
        return getattr(self.decoder, name)


def long_generation(rng: random.Random, adapter: str | None, tokens: int) -> Generation:
    return Generation(prompt(rng), adapter, Decoding(max_new_tokens=tokens), False, ignore_eos=True)
