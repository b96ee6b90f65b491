"""The ``engines`` fixture of the engine tests (see engine_helpers)."""
from __future__ import annotations

import pytest

from tests.engine.engine_helpers import Engines


@pytest.fixture(scope="module")
def engines(request, tmp_path_factory):
    built = Engines(request, tmp_path_factory)
    yield built
    built.close()
