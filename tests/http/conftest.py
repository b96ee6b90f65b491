"""Fixtures of the HTTP tests: ``tiny``, each architecture's tiny base with its adapters (``api_helpers.Tiny``), and
``client``, the main in-process server on it (a module that defines its own ``client`` uses that one); and
``compared_digests``, what the routes compare in constant time."""
from __future__ import annotations

import hmac

import pytest

from service.http import keys
from tests.http.api_helpers import ARCHS, Tiny
from tests.server_helpers import ready_client


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory) -> Tiny:
    base_fixture, adapters_fixture = ARCHS[request.param]
    return Tiny(request.param, request.getfixturevalue(base_fixture), request.getfixturevalue(adapters_fixture),
                tmp_path_factory.mktemp(f"api_{request.param}"))


@pytest.fixture(scope="module")
def client(tiny: Tiny):
    """The main server: adapters one and two, /answer defaults to one and /nli to two."""
    with ready_client(tiny.settings(qa_adapter="one", nli_adapter="two")) as client:
        yield client


@pytest.fixture
def compared_digests(monkeypatch) -> list[tuple[bytes, bytes]]:
    """The (given, expected) pairs the routes compare with ``hmac.compare_digest`` during a test, in order."""
    compared, original = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", compare_digest)
    return compared
