"""What the HTTP API test modules share: ``Tiny`` (an architecture's tiny base, its adapters one and two, and extra
adapters three and four in an adapter root; the ``tiny`` and ``client`` fixtures of tests/http/conftest.py build on
it), a check of probabilities and the admin calls."""
from __future__ import annotations

from pathlib import Path

from tests.server_helpers import copy_adapters, tiny_settings
from tests.tiny_models import make_adapter

ARCHS = {"gpt2": ("tiny_gpt2_dir", "gpt2_adapters"), "llama": ("tiny_llama_dir", "llama_adapters")}
PROBABILITY_TOLERANCE = 1e-4


class Tiny:
    """One architecture's tiny base, its adapters, and a folder of extra adapters inside the roots."""

    def __init__(self, arch: str, base_dir: Path, adapters: dict[str, Path], root: Path):
        self.arch, self.base_dir, self.adapters, self.root = arch, base_dir, adapters, root
        self.adapters_dir = copy_adapters(adapters, root / "served")
        self.extra = root / "extra"
        self.extra_adapters = {"three": make_adapter(base_dir, self.extra / "three", seed=2),
                               "four": make_adapter(base_dir, self.extra / "four", seed=3, r=2, alpha=4)}

    def settings(self, **overrides):
        return tiny_settings(self.base_dir, self.adapters_dir, self.root / "cache",
                             adapter_roots=[self.extra], **overrides)


def assert_close(got: dict[str, float], want: dict[str, float], tolerance: float = PROBABILITY_TOLERANCE) -> None:
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= tolerance for k in want), (got, want)


ADMIN_CALLS = [("post", "/adapters", {"name": "x", "path": "/tmp"}), ("delete", "/adapters/one", None),
               ("post", "/adapters/one/merge", None), ("post", "/adapters/unmerge", None)]
