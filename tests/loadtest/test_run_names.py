"""The load test's adapters under names of their own run (``loadtest.checked.adapters.derived_adapters``), against a
live in-process server on the tiny Llama: two runs at once against one server and adapter root share no name or
folder, each deletes only what it registered and wrote, and a name taken is refused, never replaced."""
from __future__ import annotations

import pytest

from loadtest.checked.adapters import PREFIX, derived_adapters, new_run, run_names
from service.lora.adapter_files import NAME_PATTERN
from tests.server_helpers import ADMIN, listed, ready_client, settings_in

KNOBS = {"seed": 0, "rank": 2, "kinds": ("q_proj", "v_proj"), "spread": 4.0}


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_names")
    (root / "derived").mkdir()  # the server's, as an operator makes it: the runs leave it
    settings = settings_in(root, tiny_llama_dir, llama_adapters, adapter_roots=[root / "derived"])
    with ready_client(settings) as client:
        client.headers.update(ADMIN)
        client.derived = root / "derived"  # the adapter root both runs write under
        client.adapters = root / "adapters"  # the server's adapters folder
        yield client


def test_two_runs_names_differ_and_are_adapter_names():
    first, second = (run_names("overload", new_run(), 100) for _ in range(2))
    assert not set(first) & set(second)
    assert all(NAME_PATTERN.fullmatch(name) and name.startswith(f"{PREFIX}overload_") for name in first + second)


def test_two_runs_at_once_each_delete_only_their_own(client, llama_adapters):
    source = llama_adapters["one"]
    with derived_adapters(client, source, client.derived, "uniform", 2, **KNOBS) as first:
        with derived_adapters(client, source, client.derived, "uniform", 2, **KNOBS) as second:
            assert not set(first) & set(second) and not set(first.values()) & set(second.values())
            assert set(listed(client)) == {"one", "two", *first, *second}
        assert set(listed(client)) == {"one", "two", *first}  # the second run's end left the first's alone
        assert all((folder / "adapter_model.safetensors").is_file() for folder in first.values())
        assert not any(folder.exists() for folder in second.values())
    assert set(listed(client)) == {"one", "two"} and not any(client.derived.iterdir())


def test_a_name_taken_is_refused_and_left_to_its_owner(client, llama_adapters):
    """A second run that drew the first's run id (as if by chance) stops at the folder already there, unregistering
    and removing nothing of the first's."""
    source = llama_adapters["one"]
    with derived_adapters(client, source, client.derived, "churn", 2, run="abc123", **KNOBS) as first:
        with pytest.raises(FileExistsError), \
                derived_adapters(client, source, client.derived, "churn", 2, run="abc123", **KNOBS):
            pass
        assert set(listed(client)) == {"one", "two", *first}
        assert all((folder / "adapter_model.safetensors").is_file() for folder in first.values())


def test_a_name_registered_elsewhere_is_refused_and_left_registered(client, llama_adapters):
    """A name taken on the server (its folder elsewhere) is a 409: the run unregisters only what it registered."""
    taken = run_names("zipf", "def456", 2)[1]
    client.post("/adapters", json={"name": taken, "path": str(client.adapters / "two")}).raise_for_status()
    with pytest.raises(Exception) as refusal, \
            derived_adapters(client, llama_adapters["one"], client.derived, "zipf", 2, run="def456", **KNOBS):
        pass
    # httpx's HTTPStatusError, of the httpx the in-process client is built on
    assert type(refusal.value).__name__ == "HTTPStatusError" and refusal.value.response.status_code == 409
    assert set(listed(client)) == {"one", "two", taken} and not any(client.derived.iterdir())
    client.delete(f"/adapters/{taken}").raise_for_status()


def test_a_registration_a_stop_cuts_short_is_unregistered(client, llama_adapters, monkeypatch):
    """A stop (Ctrl-C, SIGTERM) that lands while ``POST /adapters`` is in flight, after the server took it: the run's
    end unregisters that adapter too (a review: it stayed registered, its folder removed, while the run said it had
    unregistered its adapters)."""
    post = client.post

    def taken_then_cut(*args, **kwargs):
        post(*args, **kwargs).raise_for_status()
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "post", taken_then_cut)
    with pytest.raises(KeyboardInterrupt), \
            derived_adapters(client, llama_adapters["one"], client.derived, "single", 1, run="0a0b0c", **KNOBS):
        pass
    monkeypatch.undo()
    assert set(listed(client)) == {"one", "two"} and not any(client.derived.iterdir())
