"""The base's float32 linear layers on the CPU: inputs of few rows (decoding steps) through oneDNN, not MKL.

torch 2.13's CPU wheel computes a float32 ``F.linear`` with Intel MKL's sgemm, which takes slow paths on AMD CPUs.
On an AMD EPYC host (2 vCPUs, AVX-512), all of SmolLM2-135M's linear layers took 55-56 ms for one row and 71-72 ms
for eight with MKL, against 38-42 and 51-53 ms through oneDNN (``docs/results/onednn_linear/linears.txt``).
``torch.ops.mkldnn._linear_pointwise`` is the op torch's own compiler (inductor) emits for frozen CPU linears; it
reads the weight as it is, with no packed copy, so the weights' memory, their pages of the model file
(``file_pages``) and merges into them are unchanged. Its results differ from MKL's in float32 rounding only (about
1e-6 relative).

oneDNN builds a kernel for each input shape it meets and keeps it: about 1 ms and 0.6 MB of memory per shape there,
0.3 MB with its primitive cache off, never given back (``kernel_memory.txt`` beside it). Prompts come in any number
of rows: sent to oneDNN too, they grew a server's peak RSS from 1.23 to 1.40 GB over one side-by-side run
(``caching_off_unbounded.md``), for 1.3x on a prompt of 190 rows (``linears.txt``). So only inputs of at most
``MOST_ROWS`` rows (decoding steps, and prompts of that many tokens in all) go to oneDNN, their rows padded to a power
of two: at most seven row counts per layer shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.kv_cache import row_bucket

MOST_ROWS = 64  # inputs of more rows (tokens of all sequences together) take MKL


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` that computes float32 inputs of at most ``MOST_ROWS`` rows on the CPU with oneDNN's inner
    product: x [..., in] to [..., out], as ``F.linear``. Everything else takes ``F.linear``: more rows (or none),
    other dtypes, a weight moved off the CPU, autocast, a non-contiguous bias (the op reads it as contiguous), and
    anything that needs gradients (the op has no backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not self._takes(x, rows):
            return F.linear(x, self.weight, self.bias)
        flat, bucket = x.reshape(rows, self.in_features), row_bucket(rows)
        padded = flat if bucket == rows else F.pad(flat, (0, 0, 0, bucket - rows))  # [bucket, in]
        out = torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    def _takes(self, x: torch.Tensor, rows: int) -> bool:
        """Whether oneDNN computes ``x`` of ``rows`` rows (an input of the wrong width goes to ``F.linear`` for its
        error)."""
        bias = self.bias
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))
        plain_bias = bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        return (0 < rows <= MOST_ROWS and x.shape[-1] == self.in_features and self.weight.is_cpu
                and x.dtype == self.weight.dtype == torch.float32 and plain_bias
                and not needs_grad and not torch.is_autocast_enabled("cpu"))


def use_onednn(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of a model on the CPU a ``OneDnnLinear`` (its class is swapped: weights, tied
    ones included, hooks and wrappers stay as they are); nothing where torch lacks oneDNN. Returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    linears = [module for module in model.modules() if type(module) is nn.Linear and module.weight.device.type == "cpu"]
    for module in linears:
        module.__class__ = OneDnnLinear
    return len(linears)
