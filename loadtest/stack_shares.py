"""Where a loraswap server's time goes, from sampled Python stacks (py-spy's ``--format raw``: one line per distinct
stack, ``frame;frame;...;frame COUNT``, root first, each frame ``function (file:line)``). Each sample is put in one
category of its thread: the engine thread (prefill and decoding steps split into base matmuls, the LM head, LoRA,
attention, KV cache and the rest of the model; sampling; scheduling; waiting for work), the event loop (HTTP,
tokenization, span location, idle), or other threads. Pure: text in, counts out (``loadtest.profile_answer`` runs
the profiler)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

ENGINE, EVENT_LOOP, OTHER = "engine thread", "event loop", "other threads"

# markers, matched against "function (file" of a frame (py-spy writes paths relative to sys.path)
ENGINE_LOOP = "(service/engine/scheduler.py"
PREFILL = "Prefill.advance (service/engine/prefill.py"
DECODE = "DecodeStep.__call__ (service/engine/decode_step.py"
SAMPLING = ("RunningBatch.sample (", "(service/engine/sampling.py")
WAITING = "Engine._next_batch ("
ENGINE_PARTS = [  # (category, markers): the first category, in this order, whose marker some frame holds
    ("sampling", SAMPLING),
    ("LoRA row mapping", ("(service/engine/row_mapping.py",)),
    ("merge / unmerge", ("Engine._apply_merge_policy (",)),
    ("KV cache: copy of joined prompts", ("RunningBatch.add (",)),
    ("finishing (detokenize, publish)", ("Engine._finish (", "RunningBatch.publish (")),
]
MODEL_PARTS = [  # (component, markers), searched from the leaf up: the innermost match decides
    ("base matmuls", ("Linear.forward (torch/nn/modules/linear.py", "(service/model/onednn_linear.py")),
    ("LoRA", ("(service/lora/layers.py",)),
    ("attention", ("(service/engine/attention.py", "sdpa_attention", "eager_attention_forward")),
    ("KV cache", ("(transformers/cache_utils.py", "(service/engine/kv_cache.py")),
]
LM_HEAD_CALLER = "ForCausalLM.forward ("
MODULE_CALL = "(torch/nn/modules/module.py"  # torch's module call machinery, between a module and its caller
REST = "other ops: norms, activations, residuals, rotary"  # the model's other work, in its own Python
TOKENIZATION = ("(tokenizers", "(transformers/tokenization", "encode_text (service/tasks/prompts.py")
IDLE_LEAVES = ("select (selectors.py", "Condition.wait (threading.py", "wait (threading.py")


def parse_raw(lines: Iterable[str]) -> Counter:
    """py-spy raw lines -> {stack (tuple of frames, root first): samples}. Blank lines are skipped; ValueError for
    a line that does not end in a sample count."""
    stacks: Counter = Counter()
    for line in lines:
        if not line.strip():
            continue
        frames, _, count = line.rstrip("\n").rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"not a py-spy raw line: {line[:80]!r}")
        stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def holds(frame: str, markers: Iterable[str]) -> bool:
    """Whether ``frame`` contains any of ``markers``."""
    return any(marker in frame for marker in markers)


def model_component(frames: tuple[str, ...]) -> str:
    """The part of a model pass a stack is in: the innermost frame that is a base linear layer (the LM head when
    the model's top forward called it), LoRA, attention or the KV cache; else REST (norms, rotary embedding,
    activations, residual adds, module calls in Python)."""
    for depth in range(len(frames) - 1, -1, -1):
        for component, markers in MODEL_PARTS:
            if holds(frames[depth], markers):
                callers = [frame for frame in frames[:depth] if MODULE_CALL not in frame]
                if component == "base matmuls" and callers and LM_HEAD_CALLER in callers[-1]:
                    return "LM head matmul"
                return component
    return REST



def engine_category(frames: tuple[str, ...]) -> str:
    """The category of an engine-thread stack: ``prefill: <component>``, ``decoding step: <component>``, one of
    ENGINE_PARTS, waiting for work, or scheduling (the scheduler's own Python). The part before ": " is the stage
    (``stage_of``)."""
    for phase, marker in (("prefill", PREFILL), ("decoding step", DECODE)):
        if any(marker in frame for frame in frames):
            return f"{phase}: {model_component(frames)}"
    for category, markers in ENGINE_PARTS:
        if any(holds(frame, markers) for frame in frames):
            return category
    if any(WAITING in frame for frame in frames) and holds(frames[-1], IDLE_LEAVES):
        return "waiting for work (incl. the batch window)"
    return "scheduling"


def stage_of(category: str) -> str:
    """The stage a category belongs to: ``prefill``, ``decoding step``, ``KV cache``, or the category itself."""
    return category.split(": ")[0]


def loop_category(frames: tuple[str, ...]) -> str:
    """The category of an event-loop stack: idle (waiting in select), tokenization, the answer span constraint, or
    HTTP (the server, routing, validation, JSON, asyncio)."""
    if holds(frames[-1], IDLE_LEAVES):
        return "idle"
    if any(holds(frame, TOKENIZATION) for frame in frames):
        return "tokenization"
    if any("(service/tasks/span_constraint.py" in frame for frame in frames):
        return "answer span"
    return "HTTP, validation, asyncio"


def thread_of(frames: tuple[str, ...]) -> str:
    """ENGINE for the engine's loop, EVENT_LOOP for the asyncio loop that serves HTTP, else OTHER."""
    if any(ENGINE_LOOP in frame and "_loop" in frame for frame in frames):
        return ENGINE
    if any("(asyncio/base_events.py" in frame for frame in frames):
        return EVENT_LOOP
    return OTHER


def shares(stacks: Counter) -> dict[str, dict[str, int]]:
    """Samples per category, per thread: ``{ENGINE: {...}, EVENT_LOOP: {...}, OTHER: {"other": n}}`` (threads with
    no sample are left out)."""
    counts: dict[str, Counter] = {}
    for frames, samples in stacks.items():
        thread = thread_of(frames)
        category = (engine_category(frames) if thread == ENGINE else
                    loop_category(frames) if thread == EVENT_LOOP else "other")
        counts.setdefault(thread, Counter())[category] += samples
    return {thread: dict(counter.most_common()) for thread, counter in counts.items()}
