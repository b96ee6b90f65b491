"""``loraswap bench``: our engine against plain transformers and peft, on the same prompts, in one process.

Modes: ``hf_base`` (transformers ``generate``, bare base), ``base`` / ``single`` / ``mixed`` (our engine with no
adapter, one adapter, all adapters round-robin in each batch), ``merged`` (ours, one adapter merged into the base),
``peft_mixed`` (peft ``generate`` with ``adapter_names``) and ``peft_sequential`` (peft, one request at a time,
``set_adapter`` per request). Modes take turns batch by batch (in reverse order every other round), so drift in
the machine's speed falls on all alike. Each cell also reports the most the host's RSS rose during one of its batches
(its warm-up included). It also times adapter hot-loads and merges, runs the stall check (``loadtest.stall``) and
measures host memory with many adapters (``loadtest.host_memory``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loadtest.host_memory import PeakRss, check_registered_room, registered_memory
from loadtest.options import ALL_MODES
from loadtest.percentiles import percentiles
from loadtest.stall import measure_stall
from loadtest.timing import timed
from service.cli.command import UsageError, check_room_for_prompts, command_settings
from service.engine.requests import Generation, run_all
from service.engine.row_mapping import map_rows
from service.engine.sampling import Decoding
from service.engine.scheduler import Engine
from service.lora.registry import AdapterRegistry
from service.model.base_model import base_config, load_base, max_positions, pick_device, pick_dtype
from service.model.cpu_threads import on_passing_thread
from service.settings import Settings
from training.train import preset_mismatch, resolve_targets

ENGINE_MODES = {"base", "single", "merged", "mixed"}


def bench_settings(args: argparse.Namespace) -> Settings:
    """The engine's settings (``command_settings``): those bench's options give, those it sets itself (both declared
    in ``options.add_bench_options``, which names them), every other from its ``LORASWAP_`` variable, else its
    default."""
    return command_settings(args, max_resident=max(args.adapters, 2), max_batch=max(args.batch_sizes),
                            max_new_tokens=args.new_tokens)


def random_adapters(model, names: list[str], rank: int, targets: str, out_dir: Path, seed: int = 0) -> PeftModel:
    """Wrap ``model`` in peft with one LoRA per name on ``targets`` (a preset or module list, resolved as ``loraswap
    train`` resolves it: ``train.resolve_targets``), of ``rank`` and scale 2, every A (rank, in) and B (out, rank)
    drawn from N(0, 0.02^2) with ``seed`` (B non-zero, so each changes the outputs), saved under ``out_dir/name``;
    returns the peft model in eval mode. Raises UsageError for targets the model lacks."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=resolve_targets(targets, model),
                        fan_in_fan_out=model.config.model_type == "gpt2")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)  # A (r, in), B (out, r)
    peft_model.save_pretrained(out_dir, selected_adapters=names, save_embedding_layers=False)
    for name in names[1:]:  # peft saves non-default adapters in subfolders named after them
        assert (out_dir / name / "adapter_config.json").is_file()
    if names[0] != "default":
        (out_dir / names[0]).mkdir(exist_ok=True)
        for item in ("adapter_config.json", "adapter_model.safetensors"):
            if (out_dir / item).exists():
                (out_dir / item).rename(out_dir / names[0] / item)
    return peft_model.eval()


class Bench:
    """Holds the prompts, the three copies of the base (plain, peft, ours) and the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = bench_settings(args)
        self.device = pick_device(args.device)
        # a size the engine could not allocate, before the base loads (a review: --adapters 2**62 ran out of memory)
        check_room_for_prompts(self.settings)  # named as bench gives them (options.add_bench_options)
        check_registered_room(args.registered, base_config(self.settings), args.rank,
                              pick_dtype(args.dtype, self.device))
        self.plain, self.tokenizer = load_base(self.settings)
        positions = max_positions(self.plain)
        if args.prompt_tokens + args.new_tokens > positions:
            raise UsageError(f"--prompt-tokens {args.prompt_tokens} and --new-tokens {args.new_tokens} need more "
                             f"positions than the base model's {positions}")
        mismatch = args.targets != "all_linear" and preset_mismatch(args.targets, self.plain)
        if mismatch:  # found before any work, not as peft's traceback when the adapters are made
            raise UsageError(f"--targets {args.targets}: {mismatch}: bench it with --targets all_linear")
        generator = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), self.plain.config.vocab_size)
        self.prompts = torch.randint(100, vocab, (max(self.batch_sizes), args.prompt_tokens),
                                     generator=generator)  # (largest batch, prompt tokens) token ids
        self.workdir = Path(tempfile.mkdtemp(prefix="loraswap-bench-"))
        self.names = [f"bench{i}" for i in range(args.adapters)]
        self.results: list[dict] = []
        self.merges_ms: list[float] = []  # merging the ``merged`` mode's adapter into the base

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes of ``--batch-sizes`` (requests per batch), in its order."""
        return list(self.args.batch_sizes)

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

    def hf_generate(self, model: torch.nn.Module, batch: int, **kwargs) -> None:
        """Generate ``--new-tokens`` tokens, greedy, for the first ``batch`` prompts with transformers' ``generate`` on
        ``model`` (plain or peft; ``kwargs`` go to ``generate``)."""
        ids = self.prompts[:batch].to(self.device)  # (batch, prompt tokens)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.new_tokens,
                       min_new_tokens=self.args.new_tokens, do_sample=False,
                       pad_token_id=self.tokenizer.pad_token_id, **kwargs)

    def build(self, modes: set[str]) -> None:
        """The three copies of the base: plain (hf_base), peft with the adapters, ours with its registry."""
        self.peft_model = random_adapters(copy.deepcopy(self.plain), self.names, self.args.rank,
                                          self.args.targets, self.workdir)
        model = copy.deepcopy(self.plain)
        self.registry = AdapterRegistry(model, [self.workdir], self.settings.max_resident, self.settings.max_rank)
        for name in self.names:
            self.registry.register(name, self.workdir / name)
        self.engine = None  # one engine serves every engine mode: each engine thread would keep an OpenMP team
        if ENGINE_MODES & modes:
            self.engine = Engine(model, self.tokenizer, self.registry, self.settings.model_copy())
            self.engine.start()

    def runner(self, mode: str, batch: int) -> Callable[[], object] | None:
        """A callable that serves one batch of ``batch`` requests in ``mode`` (None: mode not run at this size)."""
        # transformers and peft run on threads that end with their batch (service.model.cpu_threads)
        if mode == "hf_base":
            return lambda: on_passing_thread(self.hf_generate, self.plain, batch)
        if mode == "peft_mixed":
            rows = [self.names[i % len(self.names)] for i in range(batch)]
            return lambda: on_passing_thread(lambda: self.hf_generate(self.peft_model, batch, adapter_names=rows))
        if mode == "peft_sequential":
            return (lambda: on_passing_thread(self.sequential)) if batch == 1 else None
        adapters = {"base": [None], "single": self.names[:1], "merged": self.names[:1], "mixed": self.names}[mode]
        works = [Generation(self.prompts[i].tolist(), adapters[i % len(adapters)],
                            Decoding(max_new_tokens=self.args.new_tokens), stop_at_newline=False, ignore_eos=True)
                 for i in range(batch)]
        engine = self.engine
        engine.settings.max_batch = batch
        return lambda: run_all(engine, works)

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

    def serve(self, mode: str, run: Callable[[], object]) -> float:
        """Serve one batch of ``mode``; returns its seconds, and notes for the mode's cell how far the RSS rose."""
        with PeakRss() as rss:
            seconds = timed(run, self.device)
        self.rss_rise[mode] = max(self.rss_rise[mode], rss.rise)
        return seconds

    def hot_load(self) -> dict:
        """Time hot-loads of an r=16 all-linear adapter from local disk: register (file to host, on the caller's
        thread) and activate (host to a device slot, on the engine thread between decoding steps); and unloads
        (unregister, then the engine clearing the slot at its next activation). Returns the adapter's rank and
        targets, the loads timed, and the median and 95th percentile of a load, an activation and an unload (ms)."""
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
            random_adapters(copy.deepcopy(self.plain), ["hot"], 16, "all_linear", root, seed=1)
            self.registry.roots.append(root)
        return root / "hot"


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


def run(args: argparse.Namespace) -> dict:
    """``loraswap bench``: measure (see ``measured``) under ``torch.no_grad`` and return the report."""
    with torch.no_grad():
        return measured(args)


def measured(args: argparse.Namespace) -> dict:
    """Time every mode at every batch size, then (as ``--hot-loads`` and ``--registered`` ask) the merges, hot-loads,
    the stall check and the memory check; print each part and the table, write ``--json`` if given, and return the
    report: ``results`` a row per cell (seconds, requests and tokens per second, bytes of RSS rise) and a dict per
    check (milliseconds, bytes). Raises FileNotFoundError when ``--base-model`` is no model directory, UsageError
    for prompts longer than its positions."""
    modes = set(args.modes)
    bench = on_passing_thread(Bench, args)  # no thread but the engine's keeps an OpenMP team while modes are timed
    for _ in range(3):  # warm the process (allocator, kernels) before any mode is timed, so the first is not penalised
        on_passing_thread(bench.hf_generate, bench.plain, 1)
    on_passing_thread(bench.build, modes)
    bench.measure([mode for mode in ALL_MODES if mode in modes])
    stall = measure_stall(bench) if args.hot_loads and "mixed" in modes else None
    if bench.engine is not None:
        bench.engine.stop()
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
        report["memory"] = registered_memory(bench.registry, bench.names[0], bench.workdir / bench.names[0],
                                             args.registered, bench.device)
        print(json.dumps(report["memory"]), flush=True)
    print(markdown_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report
