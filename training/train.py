"""``loraswap train``: a LoRA (or QLoRA) adapter for one task, with transformers' Trainer.

The Trainer brings the progress bar, mixed precision and multi-GPU runs through
``accelerate launch`` / ``torchrun``. Beside the adapter (PEFT format, safetensors) it writes
``loss.png`` (train and validation loss) and ``card.json`` (how the adapter was made).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from service.cli.command import UsageError, command_settings
from service.lora.layers import lora_targets
from service.model.cpu_threads import on_passing_thread
from service.settings import Settings
from training.data import TASK_TRAIN_FILES, BadRow, data_dir, naming_default_data, read_task
from training.options import TASK_DEFAULT_LENGTH
from training.output_folder import written_whole
from training.prepare import IGNORE_INDEX, collator, encode_rows

# named target sets per architecture family (found by its attention module names)
PRESETS = {
    "gpt2": {"attention": ["c_attn"], "attention_mlp": ["c_attn", "mlp.c_proj"]},
    "llama": {
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "attention_mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}


def use_bf16(choice: str) -> bool:
    """Whether to train in bf16 for ``--bf16`` ``choice``: 'yes', 'no', or 'auto' (on a CUDA GPU that supports it)."""
    if choice == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choice == "yes"


def family(model: torch.nn.Module) -> str | None:
    """'gpt2' or 'llama' (Llama, Mistral, Qwen2, ... share its module names), the families ``PRESETS`` has targets
    for; None for a model with neither's attention modules (GPT-NeoX, Falcon, ...)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "c_attn" in names:
        return "gpt2"
    return "llama" if "q_proj" in names else None


def linear_targets(model: torch.nn.Module) -> list[str]:
    """The last name part (``q_proj``) of every layer the engine applies LoRA to (``layers.lora_targets``: the
    Linear/Conv1D layers, 4-bit ones included, but the output head), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name in lora_targets(model)})


def matches(path: str, name: str) -> bool:
    """Whether the module at ``path`` is one that ``name`` (a module name or its dotted end) targets, as peft
    matches them."""
    return path == name or path.endswith("." + name)


def unmatched_targets(names: list[str], model: torch.nn.Module) -> list[str]:
    """Those of ``names`` (module names or their dotted ends, as peft matches them) that the engine would refuse: that
    select no layer it applies LoRA to (``layers.lora_targets``), or also a module it does not (the output head, an
    embedding, a norm, a block), in their order."""
    targets = lora_targets(model)
    others = [path for path, _ in model.named_modules() if path and path not in targets]
    return [name for name in names if not any(matches(path, name) for path in targets)
            or any(matches(path, name) for path in others)]


def check_rank(rank: int, model: torch.nn.Module, names: list[str], option: str = "--rank") -> None:
    """UsageError where ``rank`` (given by ``option``) is above the smaller dimension of a Linear/Conv1D layer of
    ``model`` (a ``meta_model``) that ``names`` target: a LoRA update of that layer has rank at most that dimension,
    so a larger rank only costs memory (a review: ``--rank 2**63 - 1`` ended in torch's RuntimeError, and 10**8 in a
    failed allocation, once the weights had loaded)."""
    layers = {path: min(module.weight.shape) for path, module in lora_targets(model).items()
              if any(matches(path, name) for name in names)}
    path, most = min(layers.items(), key=lambda layer: layer[1])
    if rank > most:
        raise UsageError(f"{option} {rank} is above {most}, the smaller dimension of the target layer {path}: a LoRA "
                         f"update of it has rank {most} at most; give a rank of at most {most}")


def preset_mismatch(preset: str, model: torch.nn.Module) -> str | None:
    """Why the target preset ``preset`` ('attention' or 'attention_mlp') does not fit ``model``: it is of no preset
    family (see ``family``), or lacks a module the preset names (OPT and GPT-J have Llama's q_proj, not its o_proj
    or MLP: peft would train the rest alone); None when it fits."""
    presets = PRESETS.get(family(model))
    if presets is None:
        return (f"the target presets attention and attention_mlp are for GPT-2 and Llama-family bases; "
                f"{type(model).__name__} has neither's attention modules")
    missing = unmatched_targets(presets[preset], model)
    if missing:
        return f"the target preset {preset} names {', '.join(missing)}, not a linear layer of {type(model).__name__}"
    return None


def resolve_targets(spec: str, model: torch.nn.Module) -> list[str]:
    """peft's ``target_modules`` for ``spec``: a preset ('all_linear', 'attention', 'attention_mlp') or a comma list
    of module names, each the name of a Linear/Conv1D layer or its dotted end (``q_proj``, ``mlp.c_proj``), as peft
    matches them. Raises UsageError for a preset that does not fit the model (``preset_mismatch``), and for a list
    with names that match no such layer of ``model`` (naming them, and the layers it has)."""
    if spec == "all_linear":
        return linear_targets(model)
    if spec in ("attention", "attention_mlp"):
        mismatch = preset_mismatch(spec, model)
        if mismatch:
            raise UsageError(f"{mismatch}: target all_linear, or name its linear layers "
                             f"({', '.join(linear_targets(model))})")
        return PRESETS[family(model)][spec]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unmatched = unmatched_targets(names, model)
    if unmatched or not names:
        raise UsageError(f"target modules {', '.join(unmatched) or repr(spec)} match no linear layer of "
                         f"{type(model).__name__} that the engine applies LoRA to (those below the output head: "
                         f"{', '.join(linear_targets(model))}), or match a module it does not (or name a preset: "
                         "all_linear, attention, attention_mlp)")
    return names


def meta_model(model_or_config: torch.nn.Module | PretrainedConfig) -> torch.nn.Module:
    """A weightless (meta device) copy of the architecture of a model or its config: enough to resolve and count
    targets."""
    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else model_or_config.config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def lora_config(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float, targets: str) -> LoraConfig:
    """A causal-LM LoRA of ``rank`` on ``targets`` (see ``resolve_targets``; errors as it raises: only a preset
    needs a known ``family``): scale alpha / rank with alpha 2 x rank unless given; ``dropout`` a probability."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=resolve_targets(targets, model),
        fan_in_fan_out=family(model) == "gpt2",  # GPT-2's Conv1D stores weights transposed
        task_type="CAUSAL_LM",
    )


def split_rows(rows: list[dict], n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): shuffled with ``seed``, at most ``n_eval`` rows held out for validation.
    SQuAD rows (they have a ``title``) are held out by whole articles, so that no validation context is also trained
    on; the rest of a partly needed article is dropped from both."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    group = (lambda r: r["title"]) if rows and "title" in rows[0] else id
    sizes = Counter(map(group, rows))
    held, count = set(), 0
    for key in dict.fromkeys(map(group, rows)):  # groups in shuffled order
        if count >= n_eval:
            break
        held.add(key)
        count += sizes[key]
    validation = [r for r in rows if group(r) in held][:n_eval]
    return [r for r in rows if group(r) not in held], validation


def base_settings(args: argparse.Namespace) -> Settings:
    """The settings the base is loaded with, as the service's loader reads them (``command_settings``: in bf16 where
    ``use_bf16``), on the device the trainer uses (``auto``: CUDA where present, ``options.add_run_options``), whatever
    ``LORASWAP_DEVICE`` says for serving."""
    return command_settings(args, dtype="bfloat16" if use_bf16(args.bf16) else "float32")


def load_model(args: argparse.Namespace, settings: Settings, base_dir: Path) -> PeftModel:
    """The base in ``base_dir`` (via the service's loader with ``settings``, so it is trained as it is served) with a
    fresh LoRA on top. Raises UsageError or ValueError when ``--target-modules`` cannot be resolved
    (``resolve_targets``)."""
    from service.model.base_model import base_model

    model = base_model(settings, base_dir)
    if args.quantize == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(model, args.rank, args.alpha, args.dropout, args.target_modules))
    model.peft_config["default"].base_model_name_or_path = str(args.base_model)  # a name, not this machine's path
    return model


def target_accuracy(eval_pred) -> dict[str, float]:
    """Teacher-forced accuracy on target tokens, shares in [0, 1]: per token, and per example (every target token
    right). ``eval_pred`` holds ``predictions``, the argmax token ids (``argmax_logits``), and ``label_ids``, both
    (N, T) numpy arrays, labels -100 off the target."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids  # (N, T), (N, T)
    predictions, labels = predictions[:, :-1], labels[:, 1:]  # (N, T-1) each: logits at t predict the token at t + 1
    mask = labels != IGNORE_INDEX  # (N, T-1): target tokens
    correct = (predictions == labels) & mask  # (N, T-1)
    return {
        "token_accuracy": float(correct.sum() / max(mask.sum(), 1)),
        "sequence_accuracy": float(np.mean(correct.sum(1) == mask.sum(1))),
    }


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Trainer's ``preprocess_logits_for_metrics``: the likeliest token id at each position, (B, T) from the
    (B, T, V) ``logits``, so that validation keeps ids rather than every logit; ``labels`` (B, T) unused."""
    return logits.argmax(-1)  # (B, T, V) -> (B, T)


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    """Write a PNG to ``path``: the training and validation losses (nats per target token) of the Trainer's log
    ``history`` against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per target token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def base_weights(base_model: str, cache_dir: Path) -> tuple[str, str]:
    """The base weights file name(s) (for 'smollm2', the embedded GGUF's; else in ``base_model``'s folder, in name
    order) and the sha256 of each in hex, each comma-joined in the same order: what ``sha256sum`` prints for each
    file. Raises FileNotFoundError when ``base_model`` is no model directory, RuntimeError when the embedded GGUF is
    not installed."""
    from service.model.base_model import EMBEDDED, embedded_gguf, resolve_base_dir, sha256_of

    files = [embedded_gguf()] if base_model == EMBEDDED else sorted(
        resolve_base_dir(base_model, cache_dir).glob("*.safetensors"))
    return ",".join(f.name for f in files), ",".join(sha256_of(f) for f in files)


@dataclass(frozen=True)
class Examples:
    """A task's tokenised training and validation examples (``join``'s dicts of token-id lists), and their source."""

    train: list[dict]
    validation: list[dict]
    dropped: int  # rows left out of either split: too long for max_length, or a label the task does not have
    available: int  # rows the task's data files hold
    files: list[str]  # those files, relative to the data dir (with the MNLI splits kept)

    def counts(self) -> dict[str, int]:
        """The card's ``examples``: examples trained on and validated on, rows dropped and rows available."""
        return {"train": len(self.train), "validation": len(self.validation),
                "dropped_too_long_or_bad_label": self.dropped, "available": self.available}


def read_rows(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The task's training rows and their files (``read_task``, in ``--data-dir``). Raises FileNotFoundError when a
    file is absent, UsageError when one is not its data: naming the file, row and field of a row that is not the
    task's (``data.BadRow``), else the task's files (not gzip, cut short, not JSON), or when they hold no row, and
    when a file is absent from the data folder no --data-dir gave (``naming_default_data``)."""
    root = Path(args.data_dir or data_dir())
    names = ", ".join(str(root / name) for name, _ in TASK_TRAIN_FILES[args.task])
    try:
        with naming_default_data({"--data-dir": args.data_dir}):
            rows, files = read_task(args.task, root)
    except (FileNotFoundError, UsageError):
        raise
    except BadRow as exc:  # names the file, the row and the field
        raise UsageError(str(exc)) from None
    except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{names}: not {args.task} training data this command reads: {exc!r}") from None
    if not rows:
        raise UsageError(f"{names}: no {args.task} row to train on")
    return rows, files


def prepare_examples(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> Examples:
    """Read the task's training files (``read_rows``), hold out ``--eval-examples`` rows for validation
    (``split_rows``), keep at most ``--max-examples`` of the rest and tokenise both (``example_length`` tokens at most
    per example). Raises FileNotFoundError when a data file is absent, UsageError when it cannot be read or leaves no
    example to train on: every row held out, or every training row dropped (too long, or a label the task lacks)."""
    rows, files = read_rows(args)
    train_rows, eval_rows = split_rows(rows, args.eval_examples, args.seed)
    if not train_rows:
        raise UsageError(f"--eval-examples {args.eval_examples} leaves none of the {len(rows)} {args.task} rows to "
                         "train on: hold out fewer")
    max_length = example_length(args)
    train_set, dropped = encode_rows(args.task, train_rows[: args.max_examples], tokenizer, max_length)
    if not train_set:
        raise UsageError(f"all {dropped} {args.task} training rows were dropped, as longer than --max-length "
                         f"{max_length} tokens or of a label {args.task} does not have: no example to train on")
    eval_set, eval_dropped = encode_rows(args.task, eval_rows, tokenizer, max_length)
    return Examples(train_set, eval_set, dropped + eval_dropped, len(rows), files)


def example_length(args: argparse.Namespace) -> int:
    """Tokens per training example at most: ``--max-length``, else the task's default (``TASK_DEFAULT_LENGTH``)."""
    return args.max_length or TASK_DEFAULT_LENGTH[args.task]


def warmup_steps(warmup: float, steps: int) -> int:
    """The warmup steps of ``--warmup`` ``warmup`` in a run of ``steps`` optimizer steps, as transformers counts them
    (``TrainingArguments.get_warmup_steps``): a whole number as it is, a share of the steps rounded up."""
    return int(warmup) if warmup >= 1 else math.ceil(steps * warmup)


def check_warmup(warmup: float, steps: int, counted: str) -> int:
    """The warmup steps (``warmup_steps``) of a run of ``steps`` optimizer steps (``counted``: what made that many,
    e.g. ``--max-steps 1``). Step k + 1 of a warmup of W steps is at learning rate --lr x k / W (transformers' linear
    warmup): its first at 0, every later one above 0. Raises UsageError where no step is above 0: a warmup in a run of
    one step, whose adapter would be the bare base's (lora_B zeros). A warmup of every step of a longer run trains, at
    rates that rise to --lr x (steps - 1) / W, as transformers takes it (the card records ``warmup_steps``)."""
    used = warmup_steps(warmup, steps)
    if used and steps == 1:
        raise UsageError(f"--warmup {warmup:g} makes {used} warmup step{'s' * (used != 1)} of the 1 optimizer step "
                         f"({counted}): a warmup's first step is at learning rate 0, so this run would train nothing; "
                         "give --warmup 0 (none) or more steps")
    return used


def checked_base(args: argparse.Namespace, settings: Settings) -> Path:
    """The base's folder (``resolve_base_dir``), with all that can be checked before its weights load checked. Raises
    UnsafeEnvironment where the environment would crash oneDNN (as ``load_base`` would), FileNotFoundError when
    ``--base-model`` is no model directory, UsageError for ``--target-modules`` the base lacks (``resolve_targets``;
    ValueError for a preset of no known family), for a ``--rank`` above a target layer's (``check_rank``) and for a
    ``--warmup`` where ``--max-steps`` is 1 (``check_warmup``)."""
    from service.model.base_model import resolve_base_dir
    from service.model.onednn_linear import bound_kernel_caches

    if settings.onednn:
        bound_kernel_caches()
    base_dir = resolve_base_dir(settings.base_model, settings.cache_dir)
    model = meta_model(AutoConfig.from_pretrained(base_dir))
    check_rank(args.rank, model, resolve_targets(args.target_modules, model))
    if args.max_steps:
        check_warmup(args.warmup, args.max_steps, f"--max-steps {args.max_steps}")
    return base_dir


def training_arguments(args: argparse.Namespace, out: Path, bf16: bool, examples: Examples) -> TrainingArguments:
    """The Trainer's settings: a cosine schedule, a log line every 2% of the steps (and the first), validation every
    ``--eval-every`` steps when there are validation ``examples``, no checkpoints, no reporting service; on the CPU
    without CUDA. A batch holds ``--batch-size`` examples, or all there are (the same batches): the Trainer makes a
    tensor of the validation batch's size (a review: ``--batch-size 2**63 - 1`` ended in torch's RuntimeError)."""
    evaluate = bool(examples.validation)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=min(args.batch_size, len(examples.train)),
        per_device_eval_batch_size=min(args.batch_size, max(len(examples.validation), 1)),
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,  # -1: transformers' "use num_train_epochs"
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        logging_steps=0.02,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=args.eval_every if evaluate else None,
        save_strategy="no",
        report_to="none",
        bf16=bf16,
        seed=args.seed,
        label_names=["labels"],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )


class Diverged(UsageError):
    """A run whose loss or weights are no longer finite: ``what`` was found at optimizer step ``step`` (from 1). No
    adapter is written; ``loraswap train`` ends with this usage error, ``loraswap sweep`` records the run as diverged
    and goes on."""

    def __init__(self, what: str, step: int):
        super().__init__(f"training diverged: {what}; no adapter is written (a smaller --lr or --alpha may keep it "
                         "finite)")
        self.what, self.step = what, step


class FiniteLossTrainer(Trainer):
    """A Trainer that stops at the first training loss that is not finite (a review: ``--alpha 1e308`` trained NaN
    losses to the end and wrote an adapter the server refuses, of non-finite weights); the Trainer itself only left
    such a loss out of the logged mean. It keeps what the card records of the run: ``warmup_steps`` (its schedule's)
    and ``examples_seen`` (training examples in the batches it trained on, this process's)."""

    warmup_steps: int | None = None
    examples_seen = 0

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The Trainer's schedule over ``num_training_steps`` optimizer steps, after ``check_warmup`` (UsageError
        for a warmup in a run of one step: where --epochs counts the steps, they are known only here)."""
        counted = (f"--max-steps {self.args.max_steps}" if self.args.max_steps > 0 else
                   f"--epochs {self.args.num_train_epochs:g} of {len(self.train_dataset)} examples in batches of "
                   f"{self.args.per_device_train_batch_size}, {self.args.gradient_accumulation_steps} a step")
        self.warmup_steps = check_warmup(self.args.warmup_steps, num_training_steps, counted)
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model: torch.nn.Module, inputs: dict, *args, **kwargs) -> torch.Tensor:
        """The Trainer's step on the batch ``inputs``, then ``Diverged`` where its loss is NaN or infinite."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.examples_seen += len(inputs["input_ids"])
        if not torch.isfinite(loss).all():
            step = self.state.global_step + 1
            raise Diverged(f"the training loss is {loss.item()} at step {step}", step)
        return loss


def check_finite(model: torch.nn.Module, step: int) -> None:
    """``Diverged`` where a trained weight of ``model``, after optimizer step ``step``, is NaN or infinite: the last
    optimizer step can make them so after a finite loss."""
    for name, weight in model.named_parameters():
        if weight.requires_grad and not torch.isfinite(weight).all():
            raise Diverged(f"the trained weight {name} is not finite", step)


def make_trainer(args: argparse.Namespace, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 examples: Examples, bf16: bool) -> Trainer:
    """A ``FiniteLossTrainer`` of ``model`` (the peft model) on ``examples``; it validates (loss and
    ``target_accuracy``) only when there are validation examples. Batches are padded to their longest example (to a
    multiple of 8 on CUDA)."""
    evaluate = bool(examples.validation)
    return FiniteLossTrainer(
        model=model,
        args=training_arguments(args, Path(args.out), bf16, examples),
        train_dataset=examples.train,
        eval_dataset=examples.validation if evaluate else None,
        data_collator=collator(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        processing_class=tokenizer,
        compute_metrics=target_accuracy if evaluate else None,
        preprocess_logits_for_metrics=argmax_logits if evaluate else None,
    )


def fit(trainer: Trainer) -> float:
    """Train, then validate once more if the last scheduled validation came before the last step, so that the last
    validation in ``trainer.state.log_history`` is of the adapter saved. Returns the mean training loss over all
    steps (nats per target token). Raises ``Diverged`` as soon as a training loss, or at the end a trained weight, is
    not finite (``FiniteLossTrainer``, ``check_finite``)."""
    result = trainer.train()
    check_finite(trainer.model, trainer.state.global_step)
    history, last_step = trainer.state.log_history, trainer.state.global_step
    if trainer.eval_dataset is not None and not any("eval_loss" in h and h["step"] == last_step for h in history):
        trainer.evaluate()
    return result.training_loss


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """The adapter's weights (safetensors) and ``adapter_config.json`` into ``out``, made if absent."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)  # no hub lookup of the base
    (out / "README.md").unlink(missing_ok=True)  # peft's template model card: card.json is ours


def hyperparameters(args: argparse.Namespace, config: LoraConfig) -> dict:
    """The card's ``hyperparameters``: the LoRA as peft made it (``config``: alpha, target modules), the run's
    optimisation settings (``lr`` the peak learning rate; ``eval_every`` too: each validation's data loader draws
    from torch's random generator, so the LoRA dropout masks of the steps after it differ) and its data budget
    (``max_length`` in tokens per example, ``max_examples`` None for all)."""
    return {
        "rank": args.rank, "alpha": config.lora_alpha, "dropout": args.dropout,
        "target_modules": sorted(config.target_modules),
        "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "max_length": example_length(args), "max_examples": args.max_examples,
        "eval_examples": args.eval_examples, "eval_every": args.eval_every, "warmup": args.warmup,
        "scheduler": "cosine", "seed": args.seed, "quantize": args.quantize, "bf16": use_bf16(args.bf16),
    }


def trained_as(args: argparse.Namespace, config: LoraConfig) -> dict:
    """What the card records of how the adapter was trained: its task, base model and ``hyperparameters``."""
    return {"task": args.task, "base_model": str(args.base_model), "hyperparameters": hyperparameters(args, config)}


def examples_trained(trainer: FiniteLossTrainer, examples: Examples) -> dict:
    """What the run trained on, beside what was asked (the card's ``examples`` and ``hyperparameters``): the
    ``examples`` counts with ``seen``, the training examples in the batches trained on (all processes'), and
    ``epochs_trained``, that over the training examples (0.4 for 4 steps of 4 of 40 examples, where --epochs said 1)."""
    seen = int(trainer.accelerator.reduce(torch.tensor(trainer.examples_seen, device=trainer.args.device), "sum"))
    return {"examples": {**examples.counts(), "seen": seen}, "epochs_trained": round(seen / len(examples.train), 4)}


def outcome(history: list[dict], steps: int, warmup_steps: int, mean_train_loss: float) -> dict:
    """The card's results from the Trainer's log ``history``: the optimizer ``steps`` and ``warmup_steps`` of them
    (their schedule's), the last and the mean training loss and the last validation's loss (nats per target token) and
    accuracies (shares in [0, 1]); None where the run logged none."""
    train_losses = [h["loss"] for h in history if "loss" in h]
    final = next((h for h in reversed(history) if "eval_loss" in h), {})
    return {
        "steps": steps,
        "warmup_steps": warmup_steps,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": mean_train_loss,
        "final_validation_loss": final.get("eval_loss"),
        "validation_token_accuracy": final.get("eval_token_accuracy"),
        "validation_sequence_accuracy": final.get("eval_sequence_accuracy"),
    }


def versions() -> dict[str, str]:
    """The versions of torch, transformers and peft the adapter was trained with."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def train_adapter(args: argparse.Namespace) -> dict:
    """Train one adapter into ``args.out``: its weights, ``adapter_config.json``, ``loss.png`` and ``card.json``.
    Returns the card (``train_seconds`` in wall-clock seconds, losses in nats per target token). Raises, before the
    base's weights load, as ``checked_base`` and ``prepare_examples`` do: UnsafeEnvironment, FileNotFoundError for
    absent data files or base model, UsageError for targets the base lacks or data that leaves nothing to train on;
    once the Trainer has counted the steps, UsageError for a warmup in a run of one step (``check_warmup``); after
    training, UsageError when ``--out`` was filled meanwhile (``publish``: the run is written beside it, then
    moved there)."""
    from service.model.base_model import base_tokenizer

    started = time.time()
    set_seed(args.seed)
    out = Path(args.out)
    settings = base_settings(args)
    base_dir = checked_base(args, settings)
    tokenizer = base_tokenizer(settings, base_dir)
    examples = prepare_examples(args, tokenizer)
    model = load_model(args, settings, base_dir)
    with written_whole(out) as partial:
        return trained_card(argparse.Namespace(**{**vars(args), "out": partial}), out.name, model, tokenizer,
                            examples, settings, started)


def trained_card(args: argparse.Namespace, name: str, model: PeftModel, tokenizer: PreTrainedTokenizerBase,
                 examples: Examples, settings: Settings, started: float) -> dict:
    """Train ``model`` on ``examples`` and write the adapter ``name`` into ``args.out``: its weights, config,
    ``loss.png`` and ``card.json``; returns the card. The training runs on a passing thread
    (``cpu_threads.on_passing_thread``): a stop (KeyboardInterrupt) is raised at once, the step running left to run
    without writing anything, as the command's process ends without it; on the main thread it waited for the step's
    forward or backward pass, a long C++ call (SmolLM2: 9-52 s after SIGTERM)."""
    out = Path(args.out)
    trainer = make_trainer(args, model, tokenizer, examples, use_bf16(args.bf16))
    mean_train_loss = on_passing_thread(fit, trainer)  # a stop is taken at once, not after a step's backward pass
    save_adapter(model, out)
    history = trainer.state.log_history
    plot_losses(history, out / "loss.png", f"{name}: {args.task}, r={args.rank}, lr={args.lr:g}")
    base_file, base_sha = base_weights(str(args.base_model), settings.cache_dir)
    card = {
        "name": name, **trained_as(args, model.peft_config["default"]), "base_file": base_file,
        "base_sha256": base_sha,
        "data": {"dir": str(args.data_dir or data_dir()), "files": examples.files},
        **examples_trained(trainer, examples),
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        **outcome(history, trainer.state.global_step, trainer.warmup_steps, mean_train_loss),
        "train_seconds": round(time.time() - started, 1),
        "command": args.command_line,  # as parsed (``BriefErrors.parse_args``), the same however it was launched
        "versions": versions(),
        "metrics": {},
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def run(args: argparse.Namespace) -> None:
    """``loraswap train``: train (see ``train_adapter``, and the errors it raises) and print a line of the outcome."""
    card = train_adapter(args)
    print(f"adapter saved to {args.out}: {card['steps']} steps, train loss {card['final_train_loss']}, "
          f"validation loss {card['final_validation_loss']}")
