"""``loraswap bench``: our engine against plain transformers and peft, on the same prompts, in one process.

Modes: ``hf_base`` (transformers ``generate``, bare base), ``base`` / ``single`` / ``mixed`` (our engine with no
adapter, one adapter, all adapters round-robin in each batch), ``merged`` (ours, one adapter merged into the base),
``peft_mixed`` (peft ``generate`` with ``adapter_names``) and ``peft_sequential`` (peft, one request at a time,
``set_adapter`` per request). Modes take turns batch by batch (in reverse order every other round), so drift in
the machine's speed falls on all alike. Each cell also reports the most the host's RSS rose during one of its batches
(its warm-up included). It also times adapter hot-loads and measures host memory with many adapters.
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Self

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loadtest.options import ALL_MODES, TARGET_SETS
from service.engine.requests import Generation
from service.engine.row_mapping import map_rows
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from service.lora.registry import AdapterRegistry
from service.model.base_model import load_base, pick_device
from service.settings import Settings

ENGINE_MODES = {"base", "single", "merged", "mixed"}


def random_adapters(model, names: list[str], rank: int, targets: list[str], out_dir: Path, seed: int = 0) -> PeftModel:
    """Wrap ``model`` in peft with one random LoRA per name (B non-zero), saved under ``out_dir/name``."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[t for t in targets if t in present],
                        fan_in_fan_out=model.config.model_type == "gpt2")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out_dir, selected_adapters=names, save_embedding_layers=False)
    for name in names[1:]:  # peft saves non-default adapters in subfolders named after them
        assert (out_dir / name / "adapter_config.json").is_file()
    if names[0] != "default":
        (out_dir / names[0]).mkdir(exist_ok=True)
        for item in ("adapter_config.json", "adapter_model.safetensors"):
            if (out_dir / item).exists():
                (out_dir / item).rename(out_dir / names[0] / item)
    return peft_model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


class Stamped:
    """A callable of the engine (its decoding step, the registry's activation) that also notes when each call
    starts and ends, the device's queued work included (the stall check; a CUDA graph replay runs no module
    hooks, so the steps are stamped here). Other attributes pass through to the wrapped object."""

    def __init__(self, wrapped, stamps: list[tuple[float, float]], device: torch.device):
        self.wrapped, self.stamps, self.device = wrapped, stamps, device

    def __call__(self, *args):
        started = time.perf_counter()
        result = self.wrapped(*args)
        sync(self.device)
        self.stamps.append((started, time.perf_counter()))
        return result

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


class Bench:
    """Holds the prompts, the three copies of the base (plain, peft, ours) and the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = Settings(base_model=args.base_model, device=args.device, dtype=args.dtype,
                                 cache_dir=args.cache_dir, max_resident=max(args.adapters, 2), max_rank=64,
                                 max_batch=max(self.batch_sizes), batch_window_ms=200, max_queue=4096,
                                 max_new_tokens=args.new_tokens, auto_merge=False, prefill_chunk=args.prefill_chunk)
        self.device = pick_device(args.device)
        self.plain, self.tokenizer = load_base(self.settings)
        generator = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), self.plain.config.vocab_size)
        self.prompts = torch.randint(100, vocab, (max(self.batch_sizes), args.prompt_tokens), generator=generator)
        self.workdir = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
        self.names = [f"bench{i}" for i in range(args.adapters)]
        self.results: list[dict] = []
        self.merges_ms: list[float] = []  # merging the ``merged`` mode's adapter into the base

    @property
    def batch_sizes(self) -> list[int]:
        return [int(b) for b in self.args.batch_sizes.split(",")]

    def record(self, mode: str, batch: int, batch_seconds: list[float], rss_rise: int) -> None:
        """One cell: its timed batches together, each batch's own time (the spread between rounds), and the most
        the RSS rose over its start during one of the cell's batches (bytes)."""
        requests, seconds = len(batch_seconds) * batch, sum(batch_seconds)
        row = {"mode": mode, "batch_size": batch, "requests": requests, "seconds": round(seconds, 4),
               "batch_seconds": [round(value, 4) for value in batch_seconds],
               "req_per_s": round(requests / seconds, 3),
               "tokens_per_s": round(requests * self.args.new_tokens / seconds, 1), "peak_rss_rise_bytes": rss_rise}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def hf_generate(self, model, batch: int, **kwargs) -> None:
        ids = self.prompts[:batch].to(self.device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.new_tokens,
                       min_new_tokens=self.args.new_tokens, do_sample=False,
                       pad_token_id=self.tokenizer.pad_token_id, **kwargs)

    def build(self, modes: set[str]) -> None:
        """The three copies of the base: plain (hf_base), peft with the adapters, ours with its registry."""
        self.peft_model = random_adapters(copy.deepcopy(self.plain), self.names, self.args.rank,
                                          TARGET_SETS[self.args.targets], self.workdir)
        model = copy.deepcopy(self.plain)
        self.registry = AdapterRegistry(model, [self.workdir], self.settings.max_resident, self.settings.max_rank)
        for name in self.names:
            self.registry.register(name, self.workdir / name)
        self.engines = {}
        for mode in ENGINE_MODES & modes:
            self.engines[mode] = Engine(model, self.tokenizer, self.registry, self.settings.model_copy())
            self.engines[mode].start()

    def runner(self, mode: str, batch: int):
        """A callable that serves one batch of ``batch`` requests in ``mode`` (None: mode not run at this size)."""
        if mode == "hf_base":
            return lambda: self.hf_generate(self.plain, batch)
        if mode == "peft_mixed":
            rows = [self.names[i % len(self.names)] for i in range(batch)]
            return lambda: self.hf_generate(self.peft_model, batch, adapter_names=rows)
        if mode == "peft_sequential":
            return self.sequential if batch == 1 else None
        adapters = {"base": [None], "single": self.names[:1], "merged": self.names[:1], "mixed": self.names}[mode]
        works = [Generation(self.prompts[i].tolist(), adapters[i % len(adapters)],
                            Decoding(max_new_tokens=self.args.new_tokens), stop_at_newline=False, ignore_eos=True)
                 for i in range(batch)]
        engine = self.engines[mode]
        engine.settings.max_batch = batch
        return lambda: engine.run_all(works)

    def set_weights(self, mode: str) -> None:
        """Untimed, before each batch: ``merged`` serves with its adapter merged into the base (each merge is
        timed apart, in ``merges_ms``), every other mode with the base unmerged; so ``merged`` measures
        serving, not switching."""
        if mode != "merged":
            self.registry.unmerge()
        elif self.registry.merged is None:
            self.merges_ms.append(timed(lambda: self.registry.merge(self.names[0]), self.device) * 1000)

    def sequential(self) -> None:
        """peft one request at a time, switching adapters per request."""
        self.turn = getattr(self, "turn", -1) + 1
        self.peft_model.set_adapter(self.names[self.turn % len(self.names)])
        self.hf_generate(self.peft_model, 1)

    def measure(self, modes: list[str]) -> None:
        """Per batch size: a warm-up batch per mode, then rounds in which every mode serves one batch in turn, in
        reverse order every other round, so that drift in the machine's speed falls on all modes alike."""
        for batch in self.batch_sizes:
            runners = {mode: run for mode in modes if (run := self.runner(mode, batch)) is not None}
            self.rss_rise = dict.fromkeys(runners, 0)
            for mode, run in runners.items():
                self.set_weights(mode)
                self.serve(mode, run)  # the warm-up: not timed, but its RSS counts
            rounds = self.args.rounds or max(1, -(-self.args.min_requests // batch))
            seconds: dict[str, list[float]] = {mode: [] for mode in runners}
            turns = list(runners.items())
            for round_ in range(rounds):
                for mode, run in turns if round_ % 2 == 0 else reversed(turns):
                    self.set_weights(mode)
                    seconds[mode].append(self.serve(mode, run))
            for mode in runners:
                self.record(mode, batch, seconds[mode], self.rss_rise[mode])

    def serve(self, mode: str, run) -> float:
        """Serve one batch of ``mode``; returns its seconds, and notes for the mode's cell how far the RSS rose."""
        with PeakRss() as rss:
            seconds = timed(run, self.device)
        self.rss_rise[mode] = max(self.rss_rise[mode], rss.rise)
        return seconds

    def hot_load(self) -> dict:
        """Time hot-loads of an r=16 all-linear adapter from local disk: register (file to host, on the caller's
        thread) and activate (host to a device slot, on the engine thread between decoding steps); and unloads
        (unregister, then the engine clearing the slot at its next activation)."""
        source = self.hot_adapter()
        registry = self.registry
        loads, activations, unloads = [], [], []
        with torch.inference_mode():  # activation runs in inference mode on the engine thread
            for i in range(self.args.hot_loads):
                name = f"hot{i}"
                register = timed(lambda name=name: registry.register(name, source), self.device)
                activate = timed(lambda name=name: map_rows(registry, [registry.lookup(name)]), self.device)
                loads.append((register + activate) * 1000)
                activations.append(activate * 1000)
                unload = timed(lambda name=name: (registry.unregister(name), map_rows(registry, [])), self.device)
                unloads.append(unload * 1000)
        return {"rank": 16, "targets": "all_linear", "loads": len(loads), **percentiles("", loads),
                **percentiles("activate_", activations), **percentiles("unload_", unloads)}

    def hot_adapter(self) -> Path:
        """An r=16 all-linear adapter on local disk, made once."""
        root = self.workdir / "hotload"
        if not root.exists():
            random_adapters(copy.deepcopy(self.plain), ["hot"], 16, TARGET_SETS["all_linear"], root, seed=1)
            self.registry.roots.append(root)
        return root / "hot"

    def stall(self, batch: int = 64, new_tokens: int = 64) -> dict:
        """Decoding steps of a running mixed batch: alone (``quiet``); while one-token requests with the bench's
        prompts, for adapters already resident, join it (``join``); and while a thread hot-loads new adapters
        and sends one such request for each, so the engine activates them between steps (``load``). Reports
        the gaps between step starts and the pauses between steps (engine time spent between the end of one
        step and the start of the next: joiners' prompt chunks, activations), against the quiet step.
        Every kind runs once as a warm-up first (graph captures, first-use kernels, and the first adapters of a
        larger rank or new target modules widening the banks, which makes the engine re-capture its CUDA
        graphs); that warm-up load is reported as ``first_load``."""
        engine, source = self.engines["mixed"], self.hot_adapter()
        loads = self.registry.max_resident // 2  # the running batch uses the other slots
        running = self.names[: self.registry.max_resident - loads]
        engine.settings.max_batch, engine.settings.max_new_tokens = batch + loads, new_tokens
        stamps: list[tuple[float, float]] = []  # (start, end) of each decoding step (one new token per row)
        activations: list[tuple[float, float]] = []  # of each activation: adapters made resident, rows mapped
        engine.decoder = Stamped(engine.decoder, stamps, self.device)  # steps only: prompt passes are not stamped
        self.registry.place = Stamped(self.registry.place, activations, self.device)
        works = [Generation(self.prompts[i % len(self.prompts)].tolist(), running[i % len(running)],
                            Decoding(max_new_tokens=new_tokens), stop_at_newline=False, ignore_eos=True)
                 for i in range(batch)]

        def steps(kind: str, round_: str) -> dict:
            stamps.clear()
            activations.clear()
            futures = [engine.submit(work) for work in works]
            while kind != "quiet" and len(stamps) < 3 and not futures[0].done():  # let the batch start decoding
                time.sleep(0.001)
            for i in range(loads if kind != "quiet" else 0):
                adapter = f"{round_}_{kind}{i}" if kind == "load" else running[i % len(running)]
                if kind == "load":
                    self.registry.register(adapter, source)
                futures.append(engine.submit(Generation(works[-1 - i].prompt_ids, adapter, Decoding(max_new_tokens=1),
                                                        stop_at_newline=False)))
            for future in futures:
                future.result()
            gaps = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(stamps)]
            pauses = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(stamps)]
            between = [end - start for start, end in activations if stamps[0][1] <= start and end <= stamps[-1][0]]
            activate = max(between, default=0.0) * 1000  # the longest activation between two of the batch's steps
            return {"step_p50_ms": round(statistics.median(gaps), 2), "step_max_ms": round(max(gaps), 2),
                    "pause_max_ms": round(max(pauses), 2), "activate_max_ms": round(activate, 2)}

        try:
            kinds = ("quiet", "join", "load")
            warm_up = {kind: steps(kind, "warm") for kind in kinds}
            runs = {"first_load": warm_up["load"], **{kind: steps(kind, "timed") for kind in kinds}}
        finally:
            engine.decoder = engine.decoder.wrapped
            del self.registry.place
            for name in {entry["name"] for entry in self.registry.describe()} - set(self.names):
                self.registry.unregister(name)
        report = {"batch": batch, "new_tokens": new_tokens, "joining_requests": loads,
                  "joining_prompt_tokens": self.args.prompt_tokens, "prefill_chunk": engine.prefill_chunk}
        for kind, figures in runs.items():
            report |= {f"{kind}_{name}": value for name, value in figures.items()}
        return report

    def memory(self) -> dict:
        """Host RSS with many adapters registered, and after they are all unloaded."""
        registry, count = self.registry, self.args.registered
        source = self.workdir / self.names[0]
        gc.collect()
        baseline = rss_bytes()
        checkpoints = {}
        for i in range(count):
            registry.register(f"mem{i}", source)
            if (i + 1) in (count // 4, count // 2, count):
                checkpoints[i + 1] = rss_bytes() - baseline
        for i in range(count):
            registry.unregister(f"mem{i}")
        gc.collect()
        after = rss_bytes() - baseline
        adapter_bytes = sum(a["size_bytes"] for a in registry.describe() if a["name"] == self.names[0])
        report = {"registered": count, "adapter_bytes": adapter_bytes,
                  "rss_growth_bytes": {str(k): v for k, v in checkpoints.items()}, "rss_after_unload_bytes": after}
        if self.device.type == "cuda":
            report["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
        return report


def markdown_table(report: dict) -> str:
    """Requests/s per mode and batch size, with mixed's ratios to bare (the faster of hf_base and base) and peft,
    and the largest RSS rise among the modes at that batch size."""
    rate = {(r["mode"], r["batch_size"]): r["req_per_s"] for r in report["results"]}
    rise = {(r["mode"], r["batch_size"]): r["peak_rss_rise_bytes"] for r in report["results"]}
    modes = [m for m in ALL_MODES if any(mode == m for mode, _ in rate)]
    lines = ["| batch | " + " | ".join(modes) + " | mixed / bare | mixed / peft_mixed | largest RSS rise |",
             "|---:|" + "---:|" * (len(modes) + 3)]
    for batch in sorted({b for _, b in rate}):
        cells = [f"{rate[(m, batch)]:.2f}" if (m, batch) in rate else "" for m in modes]
        bare = max(rate.get(("hf_base", batch), 0), rate.get(("base", batch), 0))
        mixed, peft = rate.get(("mixed", batch)), rate.get(("peft_mixed", batch))
        ratios = [f"{mixed / bare:.2f}x" if mixed and bare else "", f"{mixed / peft:.1f}x" if mixed and peft else ""]
        top = max((m for m in modes if (m, batch) in rise), key=lambda m: rise[(m, batch)])
        lines.append(f"| {batch} | " + " | ".join(cells + ratios) + f" | {rise[(top, batch)] / 2**20:.0f} MB ({top}) |")
    return "\n".join(lines)


def percentiles(prefix: str, millis: list[float]) -> dict:
    ordered = sorted(millis)
    return {f"{prefix}p50_ms": round(statistics.median(ordered), 2),
            f"{prefix}p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2)}


class PeakRss:
    """How far the process's resident set rose while entered, over its size at entry (``rise``, bytes): Linux's
    high-water mark (VmHWM), reset to the current size at entry (writing 5 to /proc/self/clear_refs)."""

    def __enter__(self) -> Self:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self.start, self.rise = rss_bytes(), 0
        return self

    def __exit__(self, *exc) -> None:
        self.rise = max(0, proc_status("VmHWM") - self.start)


def rss_bytes() -> int:
    return proc_status("VmRSS")


def proc_status(field: str) -> int:
    """A size from /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run(args: argparse.Namespace) -> dict:
    modes = set(args.modes.split(","))
    unknown = modes - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"unknown modes: {', '.join(sorted(unknown))}")
    with torch.no_grad():
        return measured(args)


def measured(args: argparse.Namespace) -> dict:
    modes = set(args.modes.split(","))
    bench = Bench(args)
    for _ in range(3):  # warm the process (allocator, kernels) before any mode is timed, so the first is not penalised
        bench.hf_generate(bench.plain, 1)
    bench.build(modes)
    bench.measure([mode for mode in ALL_MODES if mode in modes])
    stall = bench.stall() if args.hot_loads and "mixed" in modes else None
    for engine in bench.engines.values():
        engine.stop()
    bench.registry.unmerge()
    device = torch.cuda.get_device_name() if bench.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    report = {"device": device, "config": {k: str(v) for k, v in vars(args).items() if k not in ("func", "module")},
              "results": bench.results}
    if bench.merges_ms:
        report["merge"] = {"merges": len(bench.merges_ms), **percentiles("", bench.merges_ms)}
        print(json.dumps(report["merge"]), flush=True)
    if args.hot_loads:
        report["hot_load"] = bench.hot_load()
        print(json.dumps(report["hot_load"]), flush=True)
    if stall:
        report["stall"] = stall
        print(json.dumps(stall), flush=True)
    if args.registered:
        report["memory"] = bench.memory()
        print(json.dumps(report["memory"]), flush=True)
    print(markdown_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report
