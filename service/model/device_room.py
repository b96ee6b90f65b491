"""What the size settings make the engine allocate, found from the base model's config (no weights), and whether the
device has room for it with the weights: a setting whose allocation cannot exist is refused before the model loads
(a review: ``serve --max-batch 4611686018427387904`` failed its start with torch's "Storage size calculation
overflowed", and a value within that bound but past the device's memory fails once a full batch comes), and so are
settings whose allocations, a step's activations, the base's weights and the process together are past the device's
memory (a review: under a 1 GB container limit ``--prefix-cache-bytes 900000000`` was taken, each setting checked
alone, and the kernel killed the server at the 6th long prompt; the defaults under 600 MB were killed while the
weights loaded).

The settings that allocate in proportion to their value (the others bound counts and allocate nothing by themselves:
``max_queue``, ``max_choices``, ``max_answer_windows``, ``max_body_bytes``,
``prefix_block_tokens``, ``max_rank``; ``max_input_tokens`` and ``max_new_tokens`` are bounded by the model's
positions, ``runtime.check_room``; ``scale`` bounds ``max_batch`` + ``max_queue`` by Ray's 32 bits,
``scale.preflight.check_ongoing``):

- ``max_batch``: the KV cache of a full batch of the longest requests, ``row_bucket(max_batch)`` rows (a power of
  two) x ``column_bucket`` of the longest prompt, ``max_new_tokens`` and a step's draft tokens (the positions a row
  writes at the most) x ``kv_bytes_per_token`` (``kv_cache.RowKVCache``; on a GPU so many rows are allocated at
  once, on the CPU the rows and columns never written take no memory);
- ``max_resident``: the LoRA banks of ``max_resident`` resident adapters of rank 1 on a single layer, with the zero
  slot, (``max_resident`` + 1) x ``hidden_size`` x the dtype's bytes (each layer reads or writes the hidden state:
  ``lora.layers.InputGroup.reserve``);
- ``prefix_cache_bytes``: the bytes of keys and values the prefix cache may keep (``prefix_cache.PrefixCache``);
- ``max_prefill_tokens``: not an allocation that stays, but what a prefill step holds while it runs, its activations
  (``step_memory.prefill_bytes``: a review found a prefill of 2,048 tokens rise 120 MB past its KV cache, uncounted).

The start's check counts with them the adapters of ``adapters_dir`` at their most (``adapters_dir_bytes``: their host
copies and LoRA banks at their widest), so that the settings it passes leave them room.

Not counted here: one layer's old KV cache while it grows (``RowKVCache.reserve`` frees each layer's once copied); a
decoding step's activations (``step_memory``). What is left once the allocations are counted is the adapters' room
(``adapter_room``): their host copies and LoRA banks, bounded at each registration, the adapters folder's at the
start (``lora.adapter_memory``).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from service.engine.kv_cache import column_bucket, row_bucket
from service.engine.running_batch import MOST_FED
from service.errors import AdapterError
from service.lora.adapter_files import adapter_folders, packed_bytes, read_config
from service.lora.adapter_memory import AdapterRoom, bank_bytes, bank_slots, rank_bytes
from service.lora.layers import lora_targets, module_shape
from service.model.base_model import config_positions
from service.model.process_status import proc_status
from service.model.step_memory import prefill_bytes
from service.settings import INT64, MIN_PROMPT_TOKENS, Settings


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in the KV cache of a model of ``config`` in ``dtype``: 2 (keys,
    values) x layers x key-value heads x head size x the dtype's bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def allocations(settings: Settings, config: PretrainedConfig, dtype: torch.dtype,
                device: torch.device) -> dict[str, tuple[int, str]]:
    """The bytes each size setting makes the engine allocate at the most, or at least where said, and a prefill
    step's activations on ``device`` (see the module's docstring), by setting, with the formula in words."""
    per_token = kv_bytes_per_token(config, dtype)
    rows, columns = row_bucket(settings.max_batch), longest_row(settings, config)
    return {
        "max_batch": (rows * columns * per_token, f"a full batch's KV cache, {rows} row{'s' * (rows != 1)} x "
                      f"{columns} columns x {per_token} bytes a token, the columns for max_input_tokens "
                      f"{settings.max_input_tokens} and max_new_tokens {settings.max_new_tokens}"),
        "max_resident": ((settings.max_resident + 1) * config.hidden_size * dtype.itemsize,
                         f"at least the LoRA banks of so many adapters of rank 1 on one layer, "
                         f"{settings.max_resident + 1} slots x {config.hidden_size} x {dtype.itemsize} bytes"),
        "prefix_cache_bytes": (settings.prefix_cache_bytes, "the prefix cache's keys and values"),
        "max_prefill_tokens": prefill_bytes(settings, config, dtype, device, longest_prompt(settings, config),
                                            per_token),
    }


def longest_prompt(settings: Settings, config: PretrainedConfig) -> int:
    """The most tokens a prompt may have: ``max_input_tokens``, and the model's positions less ``max_new_tokens``
    (``runtime.check_room``)."""
    return min(settings.max_input_tokens, max(config_positions(config) - settings.max_new_tokens, 0))


def longest_row(settings: Settings, config: PretrainedConfig) -> int:
    """The KV cache columns a row of the running batch may fill (``kv_cache.column_bucket``): its prompt
    (``longest_prompt``), its generated tokens and the most tokens a decoding step feeds it after its last
    (``running_batch.MOST_FED``: drafts)."""
    return column_bucket(longest_prompt(settings, config) + settings.max_new_tokens + MOST_FED)


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype, quantize: str) -> tuple[int, str]:
    """The bytes the weights of a base model of ``config`` take, with the formula in words, from the model built on
    the meta device (no memory): each parameter in ``dtype``; quantized to NF4 (``quantize``), every linear layer's
    weights but the output head's (``lora_targets``: GPT-2's Conv1D too, as transformers quantizes) take half a
    byte each and a float32 scale per block of ``NF4_BLOCK`` (bitsandbytes' ``quantize_4bit``)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    packed = 0 if quantize == "none" else sum(module.weight.numel() for module in lora_targets(model).values())
    size = (total - packed) * dtype.itemsize + packed // 2 + -(-packed // NF4_BLOCK) * 4
    nf4 = f", {packed} of them in NF4" if packed else ""
    return size, f"{total} parameters x {dtype.itemsize} bytes{nf4}"


NF4_BLOCK = 64  # weights a float32 scale of bitsandbytes' 4-bit blocks covers (its default blocksize)


def adapters_dir_bytes(settings: Settings, config: PretrainedConfig, dtype: torch.dtype,
                       device: torch.device) -> tuple[int, str]:
    """The bytes the adapters of ``settings.adapters_dir`` (``adapter_folders``: those the start registers) take at
    their most on ``device`` (``lora.adapter_memory``), with the formula in words, read from their configs' ranks and
    their weights files' headers, no weight loaded: their LoRA banks at their widest (``bank_slots`` of them + the zero
    slot x their largest rank x ``rank_bytes`` of the base's LoRA targets, in the banks' dtype: float32 under
    ``quantize`` nf4), and on the CPU their host copies too (on a GPU those take the host's memory,
    ``adapter_room``). A folder whose config the server refuses is not counted (the start skips it). A review: the
    start check counted none of them, so the settings it advised under a container limit failed the start, the
    shipped squad and nli (97,689,600 bytes on SmolLM2 in float32) past the room left."""
    found = []
    for folder in adapter_folders(settings.adapters_dir):
        with contextlib.suppress(AdapterError):
            found.append((read_config(folder, settings.max_rank).r, packed_bytes(folder, banks_dtype(settings, dtype))))
    if not found:
        return 0, "no adapter in it"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    per_rank = rank_bytes({name: module_shape(module) for name, module in lora_targets(model).items()},
                          banks_dtype(settings, dtype))
    slots, widest = bank_slots(len(found), settings.max_resident), max(rank for rank, _ in found)
    banks, host = bank_bytes(slots, widest, per_rank), sum(size for _, size in found) * (device.type == "cpu")
    copies = f"{host} bytes of their host copies and " if host else ""
    return host + banks, (f"its {len(found)} adapter{'s' * (len(found) != 1)} at their most: {copies}their LoRA banks "
                          f"at their widest, {slots + 1} slots x rank {widest} x {per_rank} bytes a rank")


def banks_dtype(settings: Settings, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA banks (and host copies) of a base loaded in ``dtype``: float32 under ``quantize`` nf4
    (``LoraLayers``: the 4-bit weights are no floating point)."""
    return dtype if settings.quantize == "none" else torch.float32


def in_use(device: torch.device) -> int:
    """The bytes of ``device``'s memory in use now: on the CPU this process's resident set (VmRSS: the interpreter,
    torch and what it loaded so far), on a GPU all that is taken on it (its total less ``torch.cuda.mem_get_info``'s
    free: CUDA's context and other processes' memory included)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free
    return proc_status("VmRSS")


def check_allocations(settings: Settings, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                      replicas: int = 1) -> None:
    """ValueError naming the first size setting (``allocations``) whose allocation cannot exist, past 2**63 bytes
    (torch's storage sizes are 64-bit: "Storage size calculation overflowed"), or where ``replicas`` servers of these
    settings on ``device`` (``scale``'s replicas that share it) need more than its memory (``device_memory``), each
    its allocations and a step's activations, the base's weights (``weight_bytes``) and a process as this one is now
    (``in_use``) (``check_fit``; ``replicas`` 0: none runs here, as for a cluster's replicas, whose device this machine
    may not have)."""
    sizes = allocations(settings, config, dtype, device)
    for name, (size, what) in sizes.items():
        if size >= INT64:  # unset, max_prefill_tokens takes max_batch's rows of the longest prompt (a GPU's default)
            fix = "lower it" if getattr(settings, name) is not None else "set it, or lower max_batch"
            raise ValueError(f"{name} {shown(settings, name)} needs {what}: past 2**63 bytes, more than any torch "
                             f"tensor can hold; {fix}")
    if replicas:
        folder = adapters_dir_bytes(settings, config, dtype, device)  # none of the sizes advice changes
        adapters = {"adapters_dir": folder} if folder[0] else {}
        check_fit(settings, lambda chosen: {**allocations(chosen, config, dtype, device), **adapters},
                  weight_bytes(config, dtype, settings.quantize), in_use(device), described_memory(device), replicas)


Sized = Callable[[Settings], dict[str, tuple[int, str]]]  # settings -> their sizes, as ``allocations`` gives them


def check_fit(settings: Settings, sized: Sized, weights: tuple[int, str], used: int, memory: tuple[int, str],
              replicas: int = 1) -> None:
    """ValueError where ``replicas`` servers (``scale``'s replicas sharing the device), each with the size settings'
    allocations and a step's activations (``sized(settings)``: ``allocations`` on the model's config), the base's
    ``weights`` (bytes and their formula: ``weight_bytes``) and the ``used`` bytes the device holds now (a process's),
    need more than its ``memory`` (bytes and whose: ``described_memory``) together: a line saying by how much, a line
    for each part, and a line of what to lower (``advice``; a review: one line of 900 characters)."""
    sizes = sized(settings)
    each = used + weights[0] + sum(size for size, _ in sizes.values())
    if replicas * each <= memory[0]:
        return
    parts = [f"{used} in use now", f"{weights[0]} for the base's weights ({weights[1]})"]
    parts += [f"{size} for {name} {shown(settings, name)} ({what})" for name, (size, what) in sizes.items()]
    needs = f"{each} bytes of memory" + (f" each, {replicas * each} for {replicas} replicas" if replicas > 1 else "")
    advised = advice(settings, sized, used + weights[0], each, memory[0], replicas)
    terms = "".join(f"\n  {part}" for part in parts)
    raise ValueError(f"the base model and these settings need {needs} together, more than the {memory[0]} bytes "
                     f"{memory[1]} by {replicas * each - memory[0]}:{terms}\n{advised}")


def shown(settings: Settings, name: str) -> object:
    """A setting's value as a message shows it: "unset" for None (``max_prefill_tokens``: the device's default)."""
    value = getattr(settings, name)
    return "unset" if value is None else value


def advice(settings: Settings, sized: Sized, fixed: int, each: int, memory: int, replicas: int) -> str:
    """``check_fit``'s advice, for ``replicas`` servers needing ``each`` bytes in ``memory`` bytes, ``fixed`` of them
    the process's and the weights': what to lower (``batch_advice``), and fewer replicas where some fit."""
    fewer = f"; or fewer replicas: {memory // each} fit" if replicas > 1 and each <= memory else ""
    return batch_advice(settings, sized, fixed, memory // replicas) + fewer


def batch_advice(settings: Settings, sized: Sized, fixed: int, memory: int) -> str:
    """What to lower for a server's needs (``fixed`` bytes and its ``sized`` settings') to fit in ``memory`` bytes:
    the largest ``max_batch`` that fits (a power of two: the KV cache's rows are), and the largest
    ``max_prefill_tokens`` that fits with ``max_batch`` as set (a power of two), or, where neither does, what
    ``max_batch`` 1 needs and the settings that take memory, each with its largest value that fits with ``max_batch``
    1 where one does (``one_row_advice``; a review: a ``prefix_cache_bytes`` of 0 was advised lowered; a batch of one
    row runs one prompt a prefill pass, whatever ``max_prefill_tokens``)."""
    def need(**changed) -> int:
        return fixed + sum(size for size, _ in sized(settings.model_copy(update=changed)).values())

    fitting = [(name, largest_fitting(lambda value, name=name: need(**{name: value}) <= memory, start))
               for name, start in (("max_batch", row_bucket(settings.max_batch)), ("max_prefill_tokens", INT64 // 2))]
    fits = [f"{name} {value}" for name, value in fitting if value]
    if fits:
        return f"lower them: {' or '.join(fits)} fits with the rest"
    if need(max_batch=1, prefix_cache_bytes=0, max_input_tokens=MIN_PROMPT_TOKENS, max_new_tokens=1) > memory:
        return "not even the base's weights and the process fit: give it more memory"
    return one_row_advice(settings, need, memory)


def one_row_advice(settings: Settings, need: Callable[..., int], memory: int) -> str:
    """``batch_advice`` where not even ``max_batch`` 1 fits in ``memory`` bytes (``need``: the bytes of the settings
    changed so): what it needs, by how much past ``memory`` (a review: following the advice for a 1 GiB limit, a
    server still needed 32 MB more, and was told again "not even max_batch 1 fits" alone), and what to lower, each
    with the largest value that fits with ``max_batch`` 1 and the rest as set, where one does (``prefix_cache_bytes``
    to the byte; ``max_input_tokens`` and ``max_new_tokens`` a power of two, a prompt no shorter than
    ``MIN_PROMPT_TOKENS``)."""
    def largest(name: str, least: int) -> int:  # a power of two, 0 where none from least up fits
        value = largest_fitting(lambda value: need(max_batch=1, **{name: value}) <= memory,
                                2 ** (getattr(settings, name).bit_length() - 1))
        return value if value >= least else 0

    lower = [("prefix_cache_bytes", memory - need(max_batch=1, prefix_cache_bytes=0))] * (
        settings.prefix_cache_bytes > 0)
    lower += [("max_input_tokens", largest("max_input_tokens", MIN_PROMPT_TOKENS)),
              ("max_new_tokens", largest("max_new_tokens", 1))]
    named = [f"{name} ({value} fits)" if value > 0 else name for name, value in lower]
    alone = "" if any(value > 0 for _, value in lower) else " (none of them alone fits: lower more than one)"
    needed = need(max_batch=1)
    return (f"not even max_batch 1 fits with the rest: it needs {needed} bytes, {needed - memory} more than the "
            f"{memory} there are; lower {', '.join(named[:-1])} or {named[-1]}{alone}, or give it more memory")


def largest_fitting(fits: Callable[[int], bool], start: int) -> int:
    """The largest power of two from ``start`` down to 1 for which ``fits`` holds (it holds for all below one that
    does), or 0 where none."""
    value = start
    while value and not fits(value):
        value //= 2
    return value


def adapter_room(settings: Settings, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                 sharing: int = 1) -> AdapterRoom:
    """The bytes left to the adapters (``lora.adapter_memory``) by a server of ``settings`` on ``device``, to be
    measured before its weights load: of its share of the device's memory (``described_memory``, split evenly among
    the ``sharing`` servers on it: ``scale``'s replicas, as ``check_fit`` counts them), what the process holds now
    (``in_use``), the base's weights (``weight_bytes``) and every allocation but the banks' least (``allocations``)
    do not take. On a GPU the banks take its memory and the host copies the host's (its RAM and swap, or a container's
    limit, shared alike, less this process's resident set); on the CPU both take the one memory
    (``AdapterRoom.shared``)."""
    others = sum(size for name, (size, _) in allocations(settings, config, dtype, device).items()
                 if name != "max_resident")
    fixed = in_use(device) + weight_bytes(config, dtype, settings.quantize)[0] + others
    left = device_memory(device) // sharing - fixed
    if device.type == "cpu":
        return AdapterRoom(left, None, shared=True)
    cpu = torch.device("cpu")
    return AdapterRoom(left, device_memory(cpu) // sharing - in_use(cpu), shared=False)


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has (``described_memory``)."""
    return described_memory(device)[0]


def described_memory(device: torch.device) -> tuple[int, str]:
    """Bytes of memory ``device`` has and whose they are, in words: a GPU's total memory; for the CPU the host's RAM
    and swap (the most a private map can be given: ``file_pages.mapped_zeros``), or a container's memory limit where
    that is less (``container_memory``: under ``docker run --memory 2g`` a size setting past it was taken, and the
    process killed by the kernel once the engine filled it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, "of the GPU's memory"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + swap_bytes()
    limit = container_memory()
    if limit is not None and limit < host:
        return limit, "of the container's memory limit (memory and swap)"
    return host, "of the host's RAM and swap"


def container_memory() -> int | None:
    """Bytes of memory and swap the cgroup a container sees as its root may use, as joblib reads a container's CPU
    quota (``service.model.cpu_quota``): cgroup v2's ``memory.max`` plus ``memory.swap.max``, cgroup v1's memory and
    swap limit, else its memory limit, swap not limited counting as the host's swap; None where no memory limit is set
    or none can be read. A limit on a cgroup below that root (systemd's ``MemoryMax=`` on a host) is not found."""
    memory = read_limit(f"{CGROUP}/memory.max")
    if memory is not None:
        swap = read_limit(f"{CGROUP}/memory.swap.max")
        return memory + (swap_bytes() if swap is None else swap)
    both = read_limit(f"{CGROUP}/memory/memory.memsw.limit_in_bytes")
    if both is not None:
        return both
    memory = read_limit(f"{CGROUP}/memory/memory.limit_in_bytes")
    return None if memory is None else memory + swap_bytes()


CGROUP = "/sys/fs/cgroup"  # where a container sees its own cgroup: v2's files, or v1's hierarchies' folders
NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit count, v2 as "max"


def read_limit(path: str) -> int | None:
    """A cgroup limit file's bytes; None where it says no limit or cannot be read."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < NO_LIMIT else None


def swap_bytes() -> int:
    """The host's swap space in bytes (``/proc/meminfo``'s SwapTotal; 0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            line = next((line for line in meminfo if line.startswith("SwapTotal:")), "SwapTotal: 0 kB")
    except OSError:
        return 0
    return int(line.split()[1]) * 1024
