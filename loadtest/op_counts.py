"""Counting the aten ops a piece of model code runs: on the GPU each op that is not a view is one kernel."""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounts(TorchDispatchMode):
    """Counts the aten ops run inside it, by name, apart from views (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
