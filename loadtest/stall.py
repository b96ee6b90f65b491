"""The stall check of ``loraswap bench``: how much requests that join a running batch, and adapters hot-loaded for
them, delay the batch's decoding steps."""
from __future__ import annotations

import itertools
import math
import statistics
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Self

from loadtest.timing import Stamped
from service.engine.requests import Generation
from service.engine.sampling import Decoding

if TYPE_CHECKING:
    from loadtest.bench import Bench

KINDS = ("quiet", "join", "load")  # the batch alone; with requests joining; with requests for new adapters joining


def measure_stall(bench: Bench, batch: int = 64, new_tokens: int = 64) -> dict:
    """Decoding steps of a running mixed batch of ``batch`` requests of ``new_tokens`` tokens each, on the bench's
    ``mixed`` engine: alone (``quiet``); while one-token requests with the bench's prompts, for adapters already
    resident, join it (``join``); and while a thread hot-loads new adapters and sends one such request for each, so
    the engine activates them between steps (``load``). Reports the gaps between step starts and the pauses between
    steps (engine time spent between the end of one step and the start of the next: joiners' prompt chunks,
    activations), against the quiet step, and the longest activation in a pause, all in milliseconds.
    Every kind runs once as a warm-up first (graph captures, first-use kernels, and the first adapters of a
    larger rank or new target modules widening the banks, which makes the engine re-capture its CUDA
    graphs); that warm-up load is reported as ``first_load``."""
    with StallCheck(bench, batch, new_tokens) as check:
        warm_up = {kind: check.steps(kind, "warm") for kind in KINDS}
        runs = {"first_load": warm_up["load"], **{kind: check.steps(kind, "timed") for kind in KINDS}}
    report = {"batch": batch, "new_tokens": new_tokens, "joining_requests": check.joiners,
              "joining_prompt_tokens": bench.args.prompt_tokens, "prefill_chunk": check.engine.prefill_chunk}
    for kind, figures in runs.items():
        report |= {f"{kind}_{name}": value for name, value in figures.items()}
    return report


class StallCheck:
    """The running batch and its joiners on the bench's ``mixed`` engine. While entered, the engine's decoding steps
    and the registry's placing of adapters (activations) are stamped (``Stamped``); at exit they are unwrapped and
    the adapters the check hot-loaded are unregistered."""

    def __init__(self, bench: Bench, batch: int, new_tokens: int):
        self.engine, self.registry, self.device = bench.engine, bench.registry, bench.device
        self.source, self.names = bench.hot_adapter(), bench.names
        self.joiners = self.registry.max_resident // 2  # the running batch uses the other slots
        self.running = bench.names[: self.registry.max_resident - self.joiners]
        self.engine.settings.max_batch, self.engine.settings.max_new_tokens = batch + self.joiners, new_tokens
        # the whole batch is admitted in one prefill pass, so that its steps are the batch alone (on the CPU a budget
        # of prefill tokens would have the batch itself join over several pauses)
        self.engine.prefill_tokens = math.inf
        self.stamps: list[tuple[float, float]] = []  # (start, end) of each decoding step (one new token per row)
        self.activations: list[tuple[float, float]] = []  # of each activation: adapters made resident, rows mapped
        self.works = [Generation(bench.prompts[i % len(bench.prompts)].tolist(), self.running[i % len(self.running)],
                                 Decoding(max_new_tokens=new_tokens), stop_at_newline=False, ignore_eos=True)
                      for i in range(batch)]

    def __enter__(self) -> Self:
        self.engine.decoder = Stamped(self.engine.decoder, self.stamps, self.device)  # prompt passes are not stamped
        self.registry.place = Stamped(self.registry.place, self.activations, self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.decoder = self.engine.decoder.wrapped
        del self.registry.place
        for name in {entry["name"] for entry in self.registry.describe()} - set(self.names):
            self.registry.unregister(name)

    def steps(self, kind: str, round_: str) -> dict[str, float]:
        """Run the batch once, with the joiners of ``kind`` (one of ``KINDS``); returns the median and longest gap
        between step starts, the longest pause between steps and the longest activation in one, in milliseconds
        rounded to 0.01. ``round_`` names the adapters a ``load`` registers."""
        self.stamps.clear()
        self.activations.clear()
        futures = [self.engine.submit(work) for work in self.works]
        futures += self.join(kind, round_, futures[0])
        for future in futures:
            future.result()
        gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(self.stamps)]
        pauses = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(self.stamps)]
        between = [end - start for start, end in self.activations
                   if self.stamps[0][1] <= start and end <= self.stamps[-1][0]]
        activate = max(between, default=0.0) * 1000  # the longest activation between two of the batch's steps
        return {"step_p50_ms": round(statistics.median(gaps), 2), "step_max_ms": round(max(gaps), 2),
                "pause_max_ms": round(max(pauses), 2), "activate_max_ms": round(activate, 2)}

    def join(self, kind: str, round_: str, first: Future) -> list[Future]:
        """Once the batch has made three decoding steps (or its ``first`` request is done), submit the one-token
        joiners of ``kind``: none when ``quiet``, for the running adapters when ``join``, for newly registered ones
        when ``load``. Returns their futures."""
        if kind == "quiet":
            return []
        while len(self.stamps) < 3 and not first.done():  # let the batch start decoding
            time.sleep(0.001)
        joined = []
        for i in range(self.joiners):
            adapter = f"{round_}_{kind}{i}" if kind == "load" else self.running[i % len(self.running)]
            if kind == "load":
                self.registry.register(adapter, self.source)
            joined.append(self.engine.submit(Generation(self.works[-1 - i].prompt_ids, adapter,
                                                        Decoding(max_new_tokens=1), stop_at_newline=False)))
        return joined
