"""The command-line options of ``loraswap bench``, with its modes and adapter target sets.

Light on purpose (no torch, transformers or peft): ``loraswap`` builds its parser from here, so that
``--help`` and usage errors answer at once. An option whose default is None says in its help what unset means;
``loraswap`` appends every other default.
"""
from __future__ import annotations

import argparse

from service.cli.command import (
    SERVING_VARIABLES,
    Command,
    SettingDefault,
    bounded,
    comma_list,
    device,
    input_name,
    input_path,
    nonnegative,
    output_file,
    positive,
    sets_settings,
)

MOST_BENCH_BATCH, MOST_BENCH_RANK = 4096, 64  # the benchmark engine's max_queue and max_rank (bench.Bench)
ALL_MODES = ("hf_base", "base", "single", "merged", "mixed", "peft_mixed", "peft_sequential")
# the modules a benchmark adapter adapts: train's target presets (training.train.resolve_targets)
BENCH_TARGETS = ("all_linear", "attention")


def at_most(most: int):
    """An argparse type: a whole number from 1 to ``most``."""
    return bounded(int, lambda value: 1 <= value <= most, f"from 1 to {most}", f"1-{most}")


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap bench``: the base and device, the grid of modes and batch sizes, the adapters, the
    request shape (tokens), and the hot-load, stall and memory checks."""
    parser.add_argument("--device", type=device, default="auto",
                        help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' (GPU N)")
    parser.add_argument("--base-model", type=input_name, default="smollm2",
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a Hugging Face model directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--batch-sizes", type=comma_list(at_most(MOST_BENCH_BATCH)), default="1,16,64,256",
                        help=f"comma-separated batch sizes, each 1 to {MOST_BENCH_BATCH} (the engine's queue)")
    parser.add_argument("--adapters", type=positive(int), default=16, help="adapters in the mixed modes")
    parser.add_argument("--rank", type=at_most(MOST_BENCH_RANK), default=8,
                        help=f"rank of the benchmark adapters, 1 to {MOST_BENCH_RANK} (the engine's slots)")
    parser.add_argument("--targets", choices=BENCH_TARGETS, default="attention",
                        help="the modules the benchmark adapters adapt, as loraswap train's --target-modules preset "
                        "of that name (attention: GPT-2 and Llama-family bases only)")
    parser.add_argument("--prompt-tokens", type=positive(int), default=192, help="tokens in each prompt")
    parser.add_argument("--new-tokens", type=positive(int), default=16, help="tokens generated per request")
    parser.add_argument("--min-requests", type=positive(int), default=8,
                        help="requests timed per mode and batch size (at least one batch)")
    parser.add_argument("--rounds", type=positive(int), help="timed rounds per batch size, whatever --min-requests "
                        "says (default: enough for --min-requests)")
    parser.add_argument("--modes", type=comma_list(choices=ALL_MODES), default=",".join(ALL_MODES),
                        help="comma-separated modes to time")
    parser.add_argument("--hot-loads", type=nonnegative(int), default=20,
                        help="timed hot-loads of an r=16 all-linear adapter (0 skips them and the stall check)")
    parser.add_argument("--registered", type=nonnegative(int), default=1000,
                        help="adapters registered for the memory check (0 skips it); more than the host's RAM and "
                        "swap can hold, found from the base's config, is a usage error before the base loads")
    parser.add_argument("--prefill-chunk", type=nonnegative(int), default=SettingDefault("prefill_chunk"),
                        help="the engine's --prefill-chunk (0: whole prompts; unset: the engine's default, 512 on the "
                        "CPU and 0 on a GPU)")
    parser.add_argument("--cache-dir", type=input_path, default=SettingDefault("cache_dir"),
                        help="where the converted base model is cached")
    parser.add_argument("--json", type=output_file, help="write the results here (default: printed only)")
    # the engine's settings (bench.bench_settings), named by the option that gives each, or as bench's own: no prefix
    # cache, as every batch repeats its prompts, which the engine would then take from the cache while transformers
    # and peft compute them; no draft tokens, as they decode a token a step; a measured burst waits its turn, however
    # long (max_queue_wait 0)
    sets_settings(parser, itself={"auto_merge": False, "batch_window_ms": 200, "draft_tokens": 0,
                                  "max_queue": MOST_BENCH_BATCH, "max_queue_wait": 0, "max_rank": MOST_BENCH_RANK,
                                  "prefix_cache_bytes": 0},
                  by={"max_batch": "--batch-sizes", "max_new_tokens": "--new-tokens", "max_resident": "--adapters"})


def run_bench(args: argparse.Namespace) -> None:
    """Run ``loraswap bench`` (``loadtest.bench.run``; imported here, so that the parser stays light). The folder of
    ``--json`` is made first: one that cannot be made (FileNotFoundError, a usage error) is found before the run."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    from loadtest.bench import run

    run(args)


# the subcommand this package declares in pyproject.toml ([project.entry-points."loraswap.commands"])
BENCH = Command("throughput of the engine against transformers and peft", add_bench_options, run_bench,
                SERVING_VARIABLES)
