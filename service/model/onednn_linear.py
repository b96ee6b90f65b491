"""The base's float32 linear layers on the CPU: few rows (decoding steps) through oneDNN's inner product, not MKL.

torch 2.13's CPU wheel computes a float32 ``F.linear`` with Intel MKL's sgemm, which takes slow paths on AMD CPUs.
On an AMD EPYC host (2 vCPUs, AVX-512), all of SmolLM2-135M's linear layers took 64-66 ms for one row and 78-105 ms
for eight with MKL, against 46-48 and 61-63 ms through oneDNN (``docs/results/onednn_linear/linears.txt``).
``torch.ops.mkldnn._linear_pointwise`` is the op torch's own compiler (inductor) emits for frozen CPU linears; it
reads the weight as it is, with no packed copy, so the weights' memory, their pages of the model file
(``file_pages``) and merges into them are unchanged. Its results differ from MKL's in float32 rounding only (about
1e-6 relative).

oneDNN builds a kernel for each input shape it meets and keeps it: about 0.8 ms and 0.3-0.6 MB of memory per shape,
measured there (``kernel_memory.txt`` beside it). Prompts come in any number of rows: sent to oneDNN too, they grew a
server's peak RSS from 1.23 to 1.40 GB over one side-by-side run (``caching_off_unbounded.md``), for 1.2-1.3x on a
layer of 190 rows. So only inputs of at most ``MOST_ROWS`` rows go to oneDNN, their rows padded to a power of two: at
most seven row counts per layer shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MOST_ROWS = 64  # inputs of more rows (tokens of all sequences together) take MKL


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` that computes float32 inputs of at most ``MOST_ROWS`` rows without gradients with oneDNN's
    inner product: x [..., in] to [..., out], as ``F.linear``. Everything else (more rows, other dtypes, inputs or
    weights that need gradients: the op has no backward) takes ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self._takes(x, rows):
            return F.linear(x, self.weight, self.bias)
        flat, bucket = x.reshape(rows, self.in_features), 1 << (rows - 1).bit_length()
        padded = flat if bucket == rows else F.pad(flat, (0, 0, 0, bucket - rows))  # [bucket, in]
        out = torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    def _takes(self, x: torch.Tensor, rows: int) -> bool:
        """Whether oneDNN computes ``x`` of ``rows`` rows (the other cases are listed in the class docstring; an
        input of the wrong width goes to ``F.linear`` for its error)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (0 < rows <= MOST_ROWS and x.shape[-1] == self.in_features
                and x.dtype == self.weight.dtype == torch.float32 and not needs_grad)


def use_onednn(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of a model on the CPU a ``OneDnnLinear`` (its class is swapped: weights, tied
    ones included, hooks and wrappers stay as they are); nothing where torch lacks oneDNN. Returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [module for module in model.modules() if type(module) is nn.Linear and module.weight.device.type == "cpu"]
    for module in linears:
        module.__class__ = OneDnnLinear
    return len(linears)
