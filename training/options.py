"""The command-line options of ``loraswap train``, ``sweep``, ``merge`` and ``eval``.

Light on purpose (no torch, transformers or peft): ``loraswap`` builds its parser from here, so that
``--help`` and usage errors answer at once. An option whose default is None says in its help what unset means;
``loraswap`` appends every other default.
"""
from __future__ import annotations

import argparse
import typing

from service.cli.command import (
    SERVING_VARIABLES,
    Command,
    SettingDefault,
    UsageError,
    bounded,
    comma_list,
    device,
    flag,
    input_name,
    input_path,
    new_folder,
    nonnegative,
    output_file,
    positive,
    report_folder,
    sets_settings,
)
from service.engine.strategies import MAX_TEMPERATURE, SAMPLING_DEFAULTS, Strategy, unread, unread_reason
from service.engine.strategies import SEED as DRAW_SEED
from service.settings import INT64, Settings, setting, variable
from service.tasks.prompt_styles import ADAPTER_STYLE, PROMPT_STYLES

TASKS = ("squad", "nli", "rte")
TASK_DEFAULT_LENGTH = {"squad": 512, "nli": 256, "rte": 384}  # tokens per training example
SEEDS = 2**32  # transformers' set_seed seeds numpy with it, whose seeds are 0 to 2**32 - 1 (a ValueError otherwise)
SEED = bounded(int, lambda value: 0 <= value < SEEDS, f"in 0..{SEEDS - 1}", "seed")
# the Trainer's eval_steps: a share of all steps below 1, else a whole number of steps (a ValueError otherwise, raised
# once the base's weights had loaded)
EVAL_EVERY = bounded(float, lambda value: 0 < value < 1 or (value >= 1 and value.is_integer()),
                     "in (0, 1) (a share of all steps) or a whole number of steps (1, 2, ...)", "steps")
# the Trainer's warmup_steps: the same, 0 too (no warmup); a fraction above 1 was cut to whole steps (1.5 to 1)
WARMUP = bounded(float, lambda value: value >= 0 and (value < 1 or value.is_integer()),
                 "in [0, 1) (a share of all steps) or a whole number of steps (1, 2, ...)", "steps")


def evaluation_queue(args: argparse.Namespace) -> int:
    """The engine's max_queue in eval and calibrate: room for every window of 4 batches' answers (``--max-batch``
    times ``max_answer_windows``, its variable alone read: a review, eval read every variable once more for it, and an
    invalid LORASWAP_MAX_BATCH was blamed on ``--max-batch 4``), within 64 bits. A bound, it allocates nothing: a
    ``--max-batch`` too large for it is refused by its own allocation (``check_settings_fit``), not as a max_queue past
    64 bits the user never gave."""
    return min(4 * args.max_batch * setting("max_answer_windows"), INT64 - 1)


# the engine settings eval and calibrate set themselves (evaluate.runtime_settings): no option or variable gives them;
# max_queue_wait 0: the evaluation keeps max_queue requests in flight, which wait their turn, however long
ENGINE_SETS = {"auto_merge": False, "batch_window_ms": 20, "max_queue": evaluation_queue, "max_queue_wait": 0}
BASE_HELP = (f"'smollm2' (the embedded SmolLM2-135M-Instruct, converted once into ${variable('cache_dir')}, else "
             "~/.cache/loraswap) or a Hugging Face model directory")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``sweep``: task, base, data budget and optimisation."""
    parser.add_argument("--task", required=True, choices=TASKS, help="SQuAD v1.1 extractive QA, NLI (3 labels) or RTE")
    parser.add_argument("--base-model", type=input_name, default="smollm2", help=BASE_HELP)
    parser.add_argument("--data-dir", type=input_path, help="task data (default: $LORASWAP_DATA_DIR, else shared/data "
                        "beside the repository)")
    parser.add_argument("--alpha", type=positive(float), help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--dropout", type=bounded(float, lambda value: 0 <= value < 1, "in [0, 1)", "probability"),
                        default=0.05, help="LoRA dropout")
    parser.add_argument("--epochs", type=positive(float), default=1.0, help="passes over the training examples")
    parser.add_argument("--max-examples", type=positive(int), help="train on at most this many examples (default: all)")
    parser.add_argument("--eval-examples", type=nonnegative(int), default=200,
                        help="examples held out for the validation loss (0: none)")
    parser.add_argument("--eval-every", type=EVAL_EVERY, default=0.1,
                        help="validate every N optimizer steps, a whole number (<1: a share of all steps)")
    parser.add_argument("--batch-size", type=positive(int), default=8, help="examples per device per forward pass")
    parser.add_argument("--grad-accum", type=positive(int), default=1, help="forward passes per optimizer step")
    parser.add_argument("--max-length", type=positive(int), help="tokens per example; longer SQuAD contexts are cut "
                        "around the answer, longer NLI pairs dropped (default: " +
                        ", ".join(f"{task} {length}" for task, length in TASK_DEFAULT_LENGTH.items()) + ")")
    parser.add_argument("--warmup", type=WARMUP, default=0.03,
                        help="learning-rate warmup steps, a whole number (<1: a share of all steps, rounded up); "
                        "refused in a run of one step, whose warmup step is at learning rate 0")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of the shuffle, the validation split and the LoRA initialisation "
                        f"(0 to {SEEDS - 1})")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: QLoRA on a 4-bit base")
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                        help="train in bf16 (auto: on a GPU that supports it)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, slower")
    # the base's (train.base_settings), on the device the trainer uses (auto: CUDA where present), whatever
    # LORASWAP_DEVICE says for serving
    sets_settings(parser, itself={"device": "auto"}, by={"dtype": "--bf16"})


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap train``: the shared ones, the adapter folder, the step budget and the LoRA."""
    add_run_options(parser)
    parser.add_argument("--out", required=True, type=new_folder,
                        help="adapter folder to make, e.g. adapters/NAME: new or empty (never written over)")
    parser.add_argument("--max-steps", type=positive(int),
                        help="stop after this many optimizer steps (default: every epoch of --epochs)")
    parser.add_argument("--rank", type=positive(int), default=16, help="LoRA rank")
    parser.add_argument("--lr", type=positive(float), default=2e-4, help="peak learning rate (cosine schedule)")
    parser.add_argument("--target-modules", default="all_linear",
                        help="'attention', 'attention_mlp', 'all_linear' or a comma list of module names")


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap sweep``: the shared ones, the output folder, the steps per run and the grid."""
    add_run_options(parser)
    parser.add_argument("--out", required=True, type=report_folder,
                        help="folder for the runs (OUT/RUN, each a loraswap train adapter) and the tables; a sweep "
                        "resumes in it: a run whose card.json records the settings this sweep trains it with is read "
                        "back, not trained again, one without a card.json (cut off) is trained again, and one whose "
                        "card records other settings is a usage error (name a new folder); never an adapter folder. "
                        "A run that diverges (its training loss or weights not finite) writes no adapter, is a row of "
                        "the tables saying at which step (column diverged; trained again when the sweep resumes), and "
                        "the sweep goes on; exit status 2 only when every run diverged")
    parser.add_argument("--max-steps", type=positive(int), default=200, help="optimizer steps per run")
    parser.add_argument("--ranks", type=comma_list(positive(int)), default="4,8,16,32,64",
                        help="comma list of LoRA ranks")
    parser.add_argument("--lrs", type=comma_list(positive(float)), default="7e-5,2e-4,1e-3",
                        help="comma list of learning rates")
    parser.add_argument("--targets", type=comma_list(), default="attention,attention_mlp,all_linear",
                        help="comma list of target presets (or module lists joined with '+', e.g. c_attn+mlp.c_proj)")


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap merge``: the adapter, the output folder and the base."""
    parser.add_argument("--adapter", required=True, type=input_name,
                        help="adapter folder, or the name of one in --adapters-dir (a relative path that names an "
                        "adapter in both is refused: give the absolute path of the one meant)")
    parser.add_argument("--adapters-dir", type=input_path, default=SettingDefault("adapters_dir"),
                        help="where --adapter NAME is looked up")
    parser.add_argument("--out", required=True, type=new_folder, help="folder for the merged model, new or empty")
    parser.add_argument("--base-model", type=input_name,
                        help=BASE_HELP + " (default: the adapter's base_model_name_or_path: that model folder, "
                        "else smollm2 where it names it as the server takes it, as "
                        "HuggingFaceTB/SmolLM2-135M-Instruct)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap eval``: task, adapter, data and sample, decoding, outputs and the engine's setup."""
    parser.add_argument("--task", choices=TASKS, required=True, help="SQuAD v1.1 extractive QA, NLI (3 labels) or RTE")
    parser.add_argument("--adapter", required=True, type=input_name,  # 'none' is adapter_files.BASE_LABEL (torch)
                        help="an adapter in --adapters-dir, an adapter folder, or 'none' (or 'base') for the bare "
                        "base model (a relative path that names an adapter in both is refused: give the absolute path "
                        "of the one meant)")
    parser.add_argument("--data", type=input_path, help="evaluation file (default: the task's dev set in the data "
                        "folder, $LORASWAP_DATA_DIR, else shared/data beside the repository; for nli the MNLI "
                        "dev_matched split)")
    parser.add_argument("--limit", type=positive(int), help="evaluate a random sample of N examples, drawn with "
                        "--sample-seed; for nli and rte it holds every label (default: every example)")
    parser.add_argument("--sample-seed", type=nonnegative(int), default=0, help="seed of the --limit sample")
    parser.add_argument("--strategy", choices=typing.get_args(Strategy), default="greedy",
                        help="how SQuAD answers are decoded (nli and rte score each label instead); a sampling "
                        "option the strategy does not read is a usage error, as in /answer (greedy reads none, but "
                        "--temperature 0)")
    parser.add_argument("--top-k", type=positive(int), help="top_k: sample among the k likeliest tokens "
                        f"(default: {SAMPLING_DEFAULTS['top_k']})")
    parser.add_argument("--top-p", type=bounded(float, lambda value: 0 < value <= 1, "in (0, 1]", "probability"),
                        help="nucleus: sample among the likeliest tokens whose probabilities add up to p "
                        f"(default: {SAMPLING_DEFAULTS['top_p']})")
    parser.add_argument("--temperature", type=bounded(float, lambda value: 0 <= value <= MAX_TEMPERATURE,
                                                      f"in [0, {MAX_TEMPERATURE:g}]", "temperature"),
                        help=f"softmax temperature of the sampling strategies, 0 to {MAX_TEMPERATURE:g} as in "
                        f"/answer; 0 is greedy (default: {SAMPLING_DEFAULTS['temperature']})")
    parser.add_argument("--seed", type=nonnegative(int), help="sampling seed, as /answer's (0 to 2**63 - 1): the "
                        "example at index i of the data file (from 0, whatever --limit draws) samples with seed + i "
                        "(default: 0 with a strategy that samples; greedy draws nothing and refuses it)")
    parser.add_argument("--max-new-tokens", type=positive(int), default=32, help="most tokens generated per answer")
    parser.add_argument("--extractive", action=argparse.BooleanOptionalAction, default=True,
                        help="SQuAD answers decoded under the span constraint, as /answer's default; "
                        "--no-extractive: decoded freely, the model's own text")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default=ADAPTER_STYLE,
                        help="how each example is asked, as /answer's and /nli's prompt_style: 'adapter', the template "
                        "the adapters are trained on; 'zero_shot', an instruction in the model's chat template; "
                        "'one_shot', the same with one worked example from the training split")
    parser.add_argument("--distractors", type=nonnegative(int), default=0,
                        help="SQuAD: hide each question's paragraph among this many paragraphs of other articles, "
                        "drawn with --sample-seed, in one long context")
    parser.add_argument("--predictions", type=output_file,
                        help="write the predictions here in the data file's order: SQuAD as the official {id: answer}, "
                        "nli and rte as {index: label}, index the row's place among the file's rows from 0 (of an "
                        "MNLI file, among its dev_matched rows) (default: not written)")
    parser.add_argument("--json", type=output_file, help="also write the metrics here (default: printed only)")
    add_engine_options(parser)


def add_engine_options(parser: argparse.ArgumentParser, itself: dict[str, object] | None = None) -> None:
    """The options of the engine ``eval`` and ``calibrate`` run: base model, adapters folder, device, dtype, batch;
    ``itself``: the engine settings the command sets besides ``ENGINE_SETS``, by their values (``sets_settings``).
    The adapter roots are the folder of the adapter ``--adapter`` names as a path (``evaluate.runtime_settings``)."""
    parser.add_argument("--base-model", type=input_name, default="smollm2", help=BASE_HELP)
    parser.add_argument("--adapters-dir", type=input_path, default=SettingDefault("adapters_dir"),
                        help="where --adapter NAME is looked up")
    parser.add_argument("--device", type=device, default="auto",
                        help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N' (GPU N)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"], help="nf4: a 4-bit NF4 base")
    parser.add_argument("--max-batch", type=positive(int), default=64, help="most requests the engine runs at once")
    sets_settings(parser, itself={**ENGINE_SETS, **(itself or {})}, by={"adapter_roots": "--adapter"})


def add_calibrate_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``loraswap calibrate``: the adapter, the data, what to write, and the engine's setup."""
    parser.add_argument("--adapter", required=True, type=input_path,
                        help="an NLI adapter folder, or the name of one in --adapters-dir, with the card.json "
                        "loraswap train wrote (its seed and validation count tell which training rows were held out; "
                        "no default); always a folder: one named none or base is that folder, never the bare base; a "
                        "relative path that names an adapter in both is refused")
    parser.add_argument("--data-dir", type=input_path, help="the data folder (default: $LORASWAP_DATA_DIR, else "
                        "shared/data beside the repository)")
    parser.add_argument("--write-card", action="store_true",
                        help="store the fitted temperature in the adapter's card.json (label_calibration)")
    parser.add_argument("--diagram", type=output_file,
                        help="draw the reliability diagram on MNLI dev_matched here (PNG; default: none drawn)")
    parser.add_argument("--json", type=output_file, help="also write the report, with the reliability bins and every "
                        "row's scores, here (default: printed only)")
    add_engine_options(parser, itself={"max_new_tokens": 1})  # the engine generates nothing: labels are scored


def run_train(args: argparse.Namespace) -> None:
    """Run ``loraswap train`` (``training.train.run``; imported here, so that the parser stays light)."""
    from training.train import run

    run(args)


def run_sweep(args: argparse.Namespace) -> None:
    """Run ``loraswap sweep`` (``training.sweep.run``; imported here, so that the parser stays light)."""
    from training.sweep import run

    run(args)


def run_merge(args: argparse.Namespace) -> None:
    """Run ``loraswap merge`` (``training.merge.run``; imported here, so that the parser stays light)."""
    from training.merge import run

    run(args)


def sampling_options(args: argparse.Namespace) -> None:
    """Refuse the sampling options given that ``args.strategy`` does not read (UsageError naming the first, as /answer
    refuses them: ``strategies.reads``; ``--seed`` with greedy, which draws nothing, too: a review, it was taken and
    left unread, a given seed not told from the default), and any decoding option for a task that scores labels (nli,
    rte), then give those not given their defaults (``SAMPLING_DEFAULTS``; the seed 0)."""
    given = [name for name in (*SAMPLING_DEFAULTS, DRAW_SEED) if getattr(args, name) is not None]
    if args.task != "squad" and (args.strategy != "greedy" or given):
        decoding = ["--strategy"] * (args.strategy != "greedy") + [flag(name) for name in given]
        raise UsageError(f"{decoding[0]} decodes SQuAD answers: --task {args.task} scores each label instead")
    names = unread(args.strategy, given, args.temperature)
    if names:
        raise UsageError(f"{flag(names[0])} {unread_reason(args.strategy, flag, names[0])}")
    for name, default in SAMPLING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.seed is None:  # read only where the strategy samples (greedy's is Decoding's own default, unread)
        args.seed = 0


def run_eval(args: argparse.Namespace) -> None:
    """Run ``loraswap eval`` (``training.evaluate.run``; imported here, so that the parser stays light) once its
    sampling options are checked (``sampling_options``: UsageError)."""
    sampling_options(args)
    from training.evaluate import run

    run(args)


# the subcommands this package declares in pyproject.toml ([project.entry-points."loraswap.commands"])
def run_calibrate(args: argparse.Namespace) -> None:
    """Run ``loraswap calibrate`` (``training.calibrate.run``; imported here, so that the parser stays light)."""
    from training.calibrate import run

    run(args)


TRAIN = Command("train a LoRA adapter on SQuAD, NLI or RTE", add_train_options, run_train, SERVING_VARIABLES)
EVAL = Command("evaluate an adapter through the serving engine", add_eval_options, run_eval, SERVING_VARIABLES)
SWEEP = Command("grid over rank, learning rate and target modules", add_sweep_options, run_sweep, SERVING_VARIABLES)
MERGE = Command("write a full model with one adapter merged in", add_merge_options, run_merge,
                "An adapter the server would refuse is refused, at the server's largest rank "
                f"(${variable('max_rank')}, else {Settings.model_fields['max_rank'].default}).")
CALIBRATE = Command("fit the temperature of an NLI adapter's label probabilities; measure their calibration",
                    add_calibrate_options, run_calibrate, SERVING_VARIABLES)
