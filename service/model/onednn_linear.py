"""The base's float32 and bfloat16 linear layers on the CPU through oneDNN, not MKL.

torch 2.13's CPU wheel computes a float32 ``F.linear`` with Intel MKL's sgemm, which takes slow paths on AMD CPUs.
On an AMD EPYC host (2 vCPUs, AVX-512), all of SmolLM2-135M's linear layers took 55-56 ms for one row and 71-72 ms
for eight with MKL, against 38-42 and 51-53 ms through oneDNN (``docs/results/onednn_linear/linears.txt``); its
layers bar the LM head took 286-303 ms for 190 rows (a prompt), 1.15-1.52 s for 800 and 2.06-2.09 s for 1,500 with
MKL, against 236-257 ms, 0.89-1.06 s and 1.74-1.75 s (``prompt_rows.txt`` beside it).
``torch.ops.mkldnn._linear_pointwise`` is the op torch's own compiler (inductor) emits for frozen CPU linears; it
reads the weight as it is, with no packed copy, so the weights' memory, their pages of the model file
(``file_pages``) and merges into them are unchanged. Its results differ from MKL's in float32 rounding only (about
1e-6 relative).

bfloat16 weights (``--dtype bfloat16``) go through oneDNN too where torch says its oneDNN computes them
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``); torch's own bfloat16 ``F.linear`` took 1.5-1.7x float32's time on
the AMD EPYC host (docs/benchmarks.md, "Tried and not kept"), where oneDNN's, with the CPU's AVX512-BF16
instructions, took 0.68-0.80x float32's time (through oneDNN) for one row of SmolLM2's layer shapes, 0.63-0.67x for
8 and 0.52-0.58x for 150 (``docs/results/bf16_cpu/products.txt``; docs/benchmarks.md, "bfloat16 on the CPU").

oneDNN builds a kernel for each input shape it meets and keeps it, with memory of its own (about 0.6 MB for a
[1536, 576] weight; more for inputs of hundreds of rows), in two caches of 1,024 entries each by default: oneDNN's
primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and ideep's (``LRU_CACHE_CAPACITY``). Prompts come in any
number of rows, and 300 prompts of 65-700 rows over SmolLM2's four layer shapes grew RSS by 595 MB with those
defaults, by 89-97 MB with both caches bounded to ``KERNEL_CACHE`` entries, by 417 MB with oneDNN's alone bounded
(``prompt_kernel_memory.txt``). So ``use_onednn`` bounds both, where the environment does not say otherwise, before
the process's first oneDNN call (both are read then). Decoding steps keep their kernels: inputs of at most
``MOST_ROWS`` rows are padded (``padded_rows``) to a power of two up to 16 rows and to a multiple of ``ROW_STEP`` above
(at most eleven row counts per layer shape, used every step, so the least recently used entries are prompts'). Above
16 rows a product's time grows with its rows: all SmolLM2's layers took 48-59 ms for 16 rows, 60-72 for 24, 72-76 for
32, 80-86 for 40, 92-111 for 48 and 106-120 for 64 (``docs/results/onednn_linear/padded_rows.txt``), so a power of two
(8 rows with four draft tokens each, 40, padded to 64) costs up to a third more than a multiple of 8; the first call
at a new row count, which makes its kernel, takes about 1 ms more per layer shape (``kernel_creation.txt``).

oneDNN runs even a one-row product on every thread of torch's team, where MKL runs it on one: with another process
busy on one of two cores, a decoding step's layers took 4x as long through oneDNN, not longer through MKL, and
neither slowed with ``OMP_NUM_THREADS=1`` (``contention.txt``); a whole server slowed as much either way, its
prompts using both threads (``busy_core.md``). The setting ``onednn`` turns it off.
"""
from __future__ import annotations

import functools
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.kv_cache import row_bucket
from service.errors import UnsafeEnvironment

MOST_ROWS = 64  # inputs of at most this many rows (decoding steps) are padded (padded_rows); more go as they are
ROW_STEP = 8  # inputs of 17 to MOST_ROWS rows are padded to a multiple of this
KERNEL_CACHE = 64  # kernels oneDNN keeps: decoding steps' (11 row counts x SmolLM2's 5 layer shapes) and prompts'
CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's primitive cache, ideep's
LEGACY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "DNNL_PRIMITIVE_CACHE_CAPACITY"}  # an older name oneDNN still reads


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN computes here: float32, and bfloat16 where torch's oneDNN supports it on this CPU."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` that computes inputs of its weight's dtype (float32, or bfloat16: ``onednn_dtypes``) on the
    CPU with oneDNN's inner product: x [..., in] to [..., out], as ``F.linear``. Everything else takes ``F.linear``:
    no rows, other dtypes, a weight moved off the CPU, autocast, a non-contiguous bias or one of another dtype (the op
    reads it as contiguous, of the weight's dtype), and anything that needs gradients (the op has no backward). With
    ``fused`` (a ``fused_linears.FusedLinears``), the product is computed with those of the other layers that read
    the same input."""

    fused = None  # the FusedLinears this layer's weight is rows of, if any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not self._takes(x, rows):
            return F.linear(x, self.weight, self.bias)
        if self.fused is not None:
            return self.fused.output(self, x)
        return inner_product(x, self.weight, self.bias)

    def _takes(self, x: torch.Tensor, rows: int) -> bool:
        """Whether oneDNN computes ``x`` of ``rows`` rows (an input of the wrong width goes to ``F.linear`` for its
        error)."""
        bias = self.bias
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))
        plain_bias = bias is None or (bias.dtype == self.weight.dtype and bias.is_contiguous())
        return (rows > 0 and x.shape[-1] == self.in_features and computes_through_onednn(self)
                and x.dtype == self.weight.dtype and plain_bias and not needs_grad
                and not torch.is_autocast_enabled("cpu"))


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] times weight^T [in, out] plus bias [out] through oneDNN: [..., out]. Its rows are padded to
    ``padded_rows`` for the product. x, weight and bias of one dtype of ``onednn_dtypes`` on the CPU, bias
    contiguous."""
    rows, width = x.numel() // weight.shape[1], weight.shape[1]
    flat, bucket = x.reshape(rows, width), padded_rows(rows)
    padded = flat if bucket == rows else F.pad(flat, (0, 0, 0, bucket - rows))  # [bucket, in]
    out = torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")
    return out[:rows].view(*x.shape[:-1], weight.shape[0])


def padded_rows(rows: int) -> int:
    """The rows oneDNN computes for an input of ``rows``: a power of two up to 16, a multiple of ``ROW_STEP`` up to
    ``MOST_ROWS``, ``rows`` above."""
    if rows > MOST_ROWS:
        return rows
    return row_bucket(rows) if rows <= 16 else -(-rows // ROW_STEP) * ROW_STEP


def computes_through_onednn(layer: nn.Module) -> bool:
    """Whether ``layer`` computes inputs of its weight's dtype through oneDNN: an ``OneDnnLinear`` (``use_onednn``)
    whose weight is on the CPU, of a dtype of ``onednn_dtypes``."""
    return (isinstance(layer, OneDnnLinear) and layer.weight.is_cpu
            and layer.weight.dtype in onednn_dtypes())


def pads_rows(model: nn.Module) -> bool:
    """Whether ``model``'s linear layers compute an input of n rows as ``padded_rows(n)`` (``computes_through_onednn``
    of its first)."""
    return computes_through_onednn(next((module for module in model.modules() if isinstance(module, nn.Linear)), None))


def use_onednn(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of a model on the CPU a ``OneDnnLinear`` (its class is swapped: weights, tied
    ones included, hooks and wrappers stay as they are), and bound oneDNN's kernel caches (``bound_kernel_caches``);
    nothing where torch lacks oneDNN. Returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    bound_kernel_caches()
    linears = [module for module in model.modules() if type(module) is nn.Linear and module.weight.device.type == "cpu"]
    for module in linears:
        module.__class__ = OneDnnLinear
    return len(linears)


def bound_kernel_caches() -> None:
    """Bound oneDNN's and ideep's kernel caches (``CACHES``) to ``KERNEL_CACHE`` entries each, where the environment
    does not set them (under either of oneDNN's names, ``LEGACY``). Only the process's first oneDNN call reads them:
    after it, this changes nothing. UnsafeEnvironment where ``LRU_CACHE_CAPACITY`` reads as 0 (ideep reads it as C's
    ``atoi`` does: "0", "00", "abc"): torch 2.13's oneDNN linear then kills the process with a segmentation fault at
    its first call."""
    for variable in CACHES:
        if LEGACY.get(variable, variable) not in os.environ:
            os.environ.setdefault(variable, str(KERNEL_CACHE))
    value = os.environ["LRU_CACHE_CAPACITY"]
    number = re.match(r"\s*([+-]?\d+)", value)
    if number is None or int(number.group(1)) == 0:
        raise UnsafeEnvironment(f"LRU_CACHE_CAPACITY={value!r} reads as 0, which crashes torch's oneDNN linear layers "
                                "(a segmentation fault): set it to 1 or more, or unset it, or turn oneDNN off",
                                off="onednn")
