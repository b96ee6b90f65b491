"""``loraswap scale``'s routing read from the request alone: the adapter a request is for (its Ray Serve multiplexed
model id), and which requests change the adapters (sent to every replica). No Ray needed."""
from __future__ import annotations

import json

import pytest

from service.scale.routing import NO_ADAPTER, adapter_of, changes_adapters

DEFAULTS = {"/answer": "squad", "/nli": None}


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("method,path,raw,adapter", [
    ("POST", "/answer", body(context="c", question="q", adapter="one"), "one"),
    ("POST", "/answer", body(context="c", question="q"), "squad"),  # the route's default
    ("POST", "/nli", body(premise="p", hypothesis="h"), NO_ADAPTER),  # its default is the bare base
    ("POST", "/nli", body(premise="p", hypothesis="h", adapter="two"), "two"),
    ("POST", "/v1/completions", body(model="three", prompt="x"), "three"),
    ("POST", "/v1/chat/completions", body(model="four", messages=[]), "four"),
    *(("POST", "/answer", body(adapter=base), NO_ADAPTER) for base in (None, "none", "base")),
    ("POST", "/v1/completions", body(model="base", prompt="x"), NO_ADAPTER),
    # what the replica refuses goes anywhere: not JSON, not an object, not a name
    ("POST", "/answer", b"{not json", NO_ADAPTER),
    ("POST", "/answer", b"\xff\xfe", NO_ADAPTER),
    ("POST", "/answer", b"[" * 100_000, NO_ADAPTER),
    ("POST", "/answer", body(adapter=["one"]), NO_ADAPTER),
    ("POST", "/answer", b'["one"]', NO_ADAPTER),
    ("POST", "/answer", body(adapter="../one"), NO_ADAPTER),
    ("POST", "/answer", body(adapter="x" * 65), NO_ADAPTER),
    ("POST", "/v1/completions", body(model=7, prompt="x"), NO_ADAPTER),
    ("POST", "/answer", b'{"context": "c", "question": "q", "adapter": "one", "adapter": "two"}', NO_ADAPTER),
    # routes that run no model, and other methods
    ("POST", "/adapters", body(name="one", path="/p"), NO_ADAPTER),
    ("GET", "/answer", body(adapter="one"), NO_ADAPTER),
    ("GET", "/v1/models/one", b"", NO_ADAPTER),
])
def test_the_adapter_of_a_request(method, path, raw, adapter):
    assert adapter_of(method, path, raw, DEFAULTS) == adapter


@pytest.mark.parametrize("method,path,changes", [
    ("POST", "/adapters", True),
    ("DELETE", "/adapters/one", True),
    ("POST", "/adapters/one/merge", True),
    ("POST", "/adapters/unmerge", True),
    ("POST", "/v1/load_lora_adapter", True),
    ("POST", "/v1/unload_lora_adapter", True),
    ("PUT", "/adapters", True),  # a 405 from every replica, alike
    ("GET", "/adapters", False),
    ("HEAD", "/adapters", False),
    ("OPTIONS", "/adapters/one", False),
    ("POST", "/answer", False),
    ("POST", "/adaptersx", False),
    ("GET", "/metrics", False),
])
def test_which_requests_change_the_adapters(method, path, changes):
    assert changes_adapters(method, path) is changes
