"""Supervision of the engine thread over HTTP: if it dies, /health and /ready say so (503 with the reason), and
queued and new requests fail at once with 503 instead of hanging."""
from __future__ import annotations

import concurrent.futures.thread
import logging
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service import runtime as runtime_module
from service.cli.command import check_room_for_prompts
from service.cli.main import build_parser, naming
from service.cli.settings_options import settings_from
from service.http.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.server_helpers import (
    ADMIN,
    ask,
    classify,
    free_port,
    ready_client,
    settings_in,
    tiny_settings,
    wait_ready,
    wait_until,
)
from tests.tiny_models import make_adapter

WAIT = 60  # seconds a step may take before the test fails instead of hanging


class InjectedFault(BaseException):
    """A fault no handler of the engine loop catches (it is no Exception): the loop dies of it."""


def raise_fault():
    raise InjectedFault("injected")


def test_a_dead_engine_thread_is_reported_and_fails_queued_and_new_requests(tiny_llama_dir, llama_adapters, tmp_path):
    settings = settings_in(tmp_path, tiny_llama_dir, llama_adapters, qa_adapter="one", nli_adapter="two")
    with ready_client(settings) as client, ThreadPoolExecutor(4) as pool:
        engine = client.app.state.runtime.engine
        assert client.get("/health").json() == {"status": "ok"}
        holding, release = threading.Event(), threading.Event()
        held = engine.call(lambda: (holding.set(), release.wait(WAIT)))  # the engine thread waits between batches
        assert holding.wait(WAIT)
        queued = [pool.submit(ask, client, "one", status=503), pool.submit(classify, client, "two", status=503)]
        wait_until(lambda: engine.queue_depth == 2, "both requests queued")
        fault = engine.call(raise_fault)  # runs right after the held call: the engine thread dies of it
        release.set()
        held.result(WAIT)
        for reply in queued:
            assert "the engine failed: InjectedFault: injected" in reply.result(WAIT)["error"]
        assert isinstance(fault.exception(WAIT), InjectedFault)

        health, ready = client.get("/health"), client.get("/ready")
        assert health.status_code == 503 and health.json() == {
            "status": "failed", "reason": "the engine failed: InjectedFault: injected"}
        assert ready.status_code == 503 and ready.json() == {
            "ready": False, "reason": "the engine failed: InjectedFault: injected"}
        assert "InjectedFault" in ask(client, "one", status=503)["error"]  # at once: no thread would answer
        assert "InjectedFault" in classify(client, None, status=503)["error"]
        assert_failed_for_good(client, "the engine failed: InjectedFault: injected")


def assert_failed_for_good(client: TestClient, reason: str) -> None:
    """A failed service's 503s say why, and no Retry-After (it never serves again by itself; they said 1 s): on the
    routes that run the model, in OpenAI's shape too (code engine_failed), and on the admin routes."""
    replies = [client.post("/answer", json={"context": "c", "question": "q"}),
               client.post("/v1/completions", json={"model": "base", "prompt": "Hi"}),
               client.post("/adapters/unmerge", headers=ADMIN), client.get("/v1/models")]
    for reply in replies:
        assert reply.status_code == 503 and "retry-after" not in reply.headers, (reply.text, reply.headers)
        assert reason in reply.text and "still loading" not in reply.text, reply.text
    assert replies[1].json()["error"]["code"] == "engine_failed"


def test_a_token_budget_that_leaves_no_room_for_a_prompt_fails_the_start_saying_why(tiny_llama_dir, tmp_path):
    """It started, and then refused every request as too long (the room left for a prompt was 0 or less)."""
    settings = settings_in(tmp_path, tiny_llama_dir, {}, max_new_tokens=10**9)
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: client.get("/health").status_code == 503, "the start failed")
        reason = client.get("/health").json()["reason"]
        assert_failed_for_good(client, reason)
    # named as an operator sets it without a command (it said max_new_tokens, the setting's field)
    assert reason == ("failed to start: ValueError: LORASWAP_MAX_NEW_TOKENS 1000000000 leaves 0 of the base model's "
                      "512 positions for a prompt, fewer than 16: lower it")
    edge = Runtime(settings_in(tmp_path / "edge", tiny_llama_dir, {}, max_new_tokens=512 - 15))
    with pytest.raises(ValueError, match="leaves 15 of the base model's 512 positions"):
        edge.start()


def test_a_default_adapter_that_is_not_registered_is_warned_of_at_start(tiny_llama_dir, llama_adapters, tmp_path,
                                                                       caplog):
    """Requests that name no adapter then get the bare base model: said in the log, not only in each reply."""
    runtime = Runtime(settings_in(tmp_path, tiny_llama_dir, llama_adapters, qa_adapter="squad", nli_adapter="two"))
    runtime.start()
    try:
        warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    finally:
        runtime.stop()
    assert [line for line in warned if "is not registered" in line] == [
        "LORASWAP_QA_ADAPTER 'squad' is not registered: requests that name no adapter get the bare base model until "
        "an adapter of that name is"]


def start_failure_log(settings, caplog, raises: type[Exception]) -> list[logging.LogRecord]:
    """The records the runtime logs (DEBUG and above) while ``settings`` fail its start with ``raises``."""
    caplog.set_level(logging.DEBUG, logger=runtime_module.__name__)
    with pytest.raises(raises):
        Runtime(settings).start()
    return [record for record in caplog.records if record.name == runtime_module.__name__]


@pytest.mark.parametrize("overrides,cause", [
    ({"base_model": "/nonexistent"}, "FileNotFoundError: LORASWAP_BASE_MODEL /nonexistent: no Hugging Face model "
     "directory"),
    ({"base_model": "smollm2", "cache_dir": Path("/proc/x")}, "FileNotFoundError: LORASWAP_CACHE_DIR /proc/x: cannot "
     "make this folder: No such file or directory"),
    ({"max_new_tokens": 10**9}, "ValueError: LORASWAP_MAX_NEW_TOKENS 1000000000 leaves 0 of the base model's 512 "
     "positions"),
    # a stride below max_input_tokens (1024) but not below the 32 tokens max_new_tokens leaves a prompt
    ({"max_new_tokens": 480, "answer_stride": 32}, "ValueError: LORASWAP_ANSWER_STRIDE 32 is not below the 32 tokens "
     "a prompt may have (LORASWAP_MAX_NEW_TOKENS 480 of 512 positions)"),
])
def test_settings_that_cannot_work_fail_the_start_in_one_log_line_naming_the_cause(overrides, cause, tiny_llama_dir,
                                                                                   tmp_path, caplog):
    """Not a 30-45 line traceback for a mistyped path: the traceback only at DEBUG."""
    fields = {"base_dir": tiny_llama_dir, "adapters_dir": tmp_path, "cache_dir": tmp_path / "cache", **overrides}
    records = start_failure_log(tiny_settings(**fields), caplog, (OSError, ValueError))
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [record.getMessage() for record in errors]
    assert errors[0].getMessage().startswith(f"the service failed to start: {cause}")
    assert "\n" not in errors[0].getMessage()
    assert [record.exc_info is not None for record in records if record.levelno == logging.DEBUG] == [True]


def test_an_embedded_base_that_is_not_the_expected_gguf_fails_the_start_in_one_log_line(tmp_path, caplog,
                                                                                        monkeypatch):
    """$SMOLLM2_GGUF naming another file: a settings fault, logged as one line (was a RuntimeError's traceback)."""
    (tmp_path / "other.gguf").write_bytes(b"GGUF not the model")
    monkeypatch.setenv("SMOLLM2_GGUF", str(tmp_path / "other.gguf"))
    settings = Settings(base_model="smollm2", adapters_dir=tmp_path, cache_dir=tmp_path / "cache")
    records = start_failure_log(settings, caplog, ValueError)
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage().startswith(f"the service failed to start: ValueError: {tmp_path / 'other.gguf'} "
                                             "does not have the expected sha256")


def test_an_unexpected_start_failure_still_logs_its_traceback(tiny_llama_dir, tmp_path, caplog, monkeypatch):
    """A fault of the service, not of the settings: its traceback is what finds it."""
    def broken(*_):  # as torch's own errors: their C++ frames after the first line
        raise RuntimeError("a bug\nException raised from f at f.cpp:79 (most recent call first):\nframe #0: ...")

    monkeypatch.setattr(runtime_module, "check_room", broken)
    records = start_failure_log(settings_in(tmp_path, tiny_llama_dir, {}), caplog, RuntimeError)
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].getMessage() == "the service failed to start: RuntimeError: a bug"  # /health's reason: one line


def test_a_stop_while_adapters_load_ends_the_start_quietly(tiny_llama_dir, llama_adapters, tmp_path, caplog,
                                                            monkeypatch):
    """A review: serve stopped (SIGTERM) while its adapters loaded logged 'the service failed to start: RuntimeError:
    cannot schedule new futures after interpreter shutdown' with a traceback once the server had ended: the load ran
    on, and the interpreter's end refuses the adapter's packing threads. Here the load is held at its first adapter
    until the runtime has stopped, then meets that refusal (concurrent.futures' flag the interpreter's end sets)."""
    loading, release = threading.Event(), threading.Event()
    load_adapter = Runtime.load_adapter

    def held(self, *args, **kwargs):
        loading.set()
        assert release.wait(WAIT)
        return load_adapter(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "load_adapter", held)
    monkeypatch.setattr(runtime_module, "STOP_WAIT_SECONDS", WAIT)  # the stop waits for the start, on a busy machine
    caplog.set_level(logging.DEBUG, logger=runtime_module.__name__)
    runtime = Runtime(settings_in(tmp_path, tiny_llama_dir, llama_adapters))
    starting = runtime.start_in_background()
    assert loading.wait(WAIT)
    stopping = threading.Thread(target=runtime.stop)  # waits for the start to end
    stopping.start()
    wait_until(lambda: runtime.draining, "the stop began", WAIT)
    with monkeypatch.context() as shutdown:
        shutdown.setattr(concurrent.futures.thread, "_shutdown", True)
        release.set()
        stopping.join(WAIT)
    assert not stopping.is_alive() and not starting.is_alive()  # the stop returned once the start had ended
    records = [record for record in caplog.records if record.name == runtime_module.__name__]
    assert [record.getMessage() for record in records if record.levelno >= logging.ERROR] == []
    assert "the start was cut short: the service was stopped while it loaded" in [
        record.getMessage() for record in records if record.levelno == logging.INFO]
    assert runtime.failure is None and not runtime.ready.is_set()


def test_a_stop_waits_a_bounded_time_for_a_start_it_cannot_cut(tiny_llama_dir, llama_adapters, tmp_path, caplog,
                                                              monkeypatch):
    """A review: serve SIGTERMed while it converted the embedded base ended 10-30 s later (the stop waited for the
    conversion), past a container's grace period. Here the base's load, a step no stop can cut, is held: the stop
    returns after ``STOP_WAIT_SECONDS`` with the start still running (``still_starting``: the server's process ends
    without it), and the start, let go, ends at its next step, its engine never started, no failure."""
    loading, release = threading.Event(), threading.Event()
    load_base = runtime_module.load_base

    def held(settings):
        loading.set()
        assert release.wait(WAIT)
        return load_base(settings)

    monkeypatch.setattr(runtime_module, "load_base", held)
    caplog.set_level(logging.INFO, logger=runtime_module.__name__)
    runtime = Runtime(settings_in(tmp_path, tiny_llama_dir, llama_adapters))
    starting = runtime.start_in_background()
    assert loading.wait(WAIT)
    stopping = threading.Thread(target=runtime.stop)
    stopping.start()
    try:
        stopping.join(WAIT)
        assert not stopping.is_alive(), "the stop waited for the held load"
        assert runtime.still_starting
    finally:
        release.set()
    starting.join(WAIT)
    assert not runtime.still_starting and runtime.failure is None and not runtime.ready.is_set()
    assert runtime.engine is None or runtime.engine._thread is None  # no engine thread started after the stop
    assert "the start was cut short: the service was stopped while it loaded" in caplog.messages


def test_an_adapters_folder_or_root_that_is_no_folder_is_warned_of_at_start(tiny_llama_dir, tmp_path, caplog):
    """A mistyped --adapters-dir or --adapter-roots path served nothing from it without a word."""
    (tmp_path / "a_file").write_text("not a folder")
    roots = [tmp_path / "nonexistent", tmp_path, tmp_path / "a_file"]
    runtime = Runtime(tiny_settings(tiny_llama_dir, tmp_path / "no_adapters", tmp_path / "cache", adapter_roots=roots))
    runtime.start()
    runtime.stop()
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [line for line in warned if "is not an existing folder" in line] == [
        f"{setting} {folder} is not an existing folder: no adapter can come from it" for setting, folder in
        [("LORASWAP_ADAPTERS_DIR", tmp_path / "no_adapters"), ("LORASWAP_ADAPTER_ROOTS", roots[0]),
         ("LORASWAP_ADAPTER_ROOTS", roots[2])]]


def test_a_max_new_tokens_that_shortens_the_longest_prompt_is_warned_of_at_start(tiny_llama_dir, tmp_path, caplog):
    """It cut prompts to what the base's positions leave, below max_input_tokens, without a word: every longer prompt
    was a 413 naming a limit the settings never gave."""
    caplog.set_level(logging.WARNING, logger=runtime_module.__name__)
    with ready_client(settings_in(tmp_path, tiny_llama_dir, {}, max_new_tokens=480)):
        pass
    warnings = [record.getMessage() for record in caplog.records if record.name == runtime_module.__name__]
    assert any("LORASWAP_MAX_NEW_TOKENS 480 leaves 32 of the base model's 512 positions for a prompt: prompts are "
               "limited to 32 tokens, not LORASWAP_MAX_INPUT_TOKENS 1024" in message for message in warnings), warnings


def test_the_checks_before_a_start_leave_its_warnings_to_it(tiny_llama_dir, tmp_path, caplog):
    """serve, scale and bench check the settings from the base's config before the start (``check_room_for_prompts``);
    the start warns of what they pass with a warning (a review: serve logged the shortened prompts twice)."""
    caplog.set_level(logging.WARNING)
    check_room_for_prompts(settings_in(tmp_path, tiny_llama_dir, {}, max_new_tokens=480))
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def serve_runtime(argv: list[str]) -> Runtime:
    """The runtime ``loraswap serve`` with ``argv`` (its options) starts, naming its settings as they were given."""
    args = build_parser().parse_args(["serve", *argv])
    return Runtime(settings_from(args), naming(args))


def test_serves_start_failure_names_its_settings_as_the_command_line_gave_them(tiny_llama_dir, tmp_path, caplog):
    """A review: serve's usage errors named --max-new-tokens, its start-failure log line and /ready's reason the field,
    max_new_tokens."""
    caplog.set_level(logging.ERROR, logger=runtime_module.__name__)
    rt = serve_runtime(["--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu",
                        "--max-new-tokens", "600"])
    with TestClient(create_app(rt=rt)) as client:
        wait_until(lambda: client.get("/ready").status_code == 503 and rt.failure is not None, "the start failed")
        reason = client.get("/ready").json()["reason"]
    cause = "ValueError: --max-new-tokens 600 leaves 0 of the base model's 512 positions for a prompt, fewer than 16"
    assert reason.startswith(f"failed to start: {cause}"), reason
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR] == [
        f"the service failed to start: {cause}: lower it"]


def test_serves_start_warnings_name_its_settings_as_the_command_line_gave_them(tiny_llama_dir, tmp_path, monkeypatch,
                                                                                caplog):
    monkeypatch.setenv("LORASWAP_MAX_INPUT_TOKENS", "100")
    rt = serve_runtime(["--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "none"), "--device",
                        "cpu", "--max-new-tokens", "480", "--nli-adapter", "two"])
    rt.start()
    rt.stop()
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert {f"--adapters-dir {tmp_path / 'none'} is not an existing folder: no adapter can come from it",
            "--max-new-tokens 480 leaves 32 of the base model's 512 positions for a prompt: prompts are limited to 32 "
            "tokens, not LORASWAP_MAX_INPUT_TOKENS 100",
            "--nli-adapter 'two' is not registered: requests that name no adapter get the bare base model until an "
            "adapter of that name is"} <= set(warned), warned


def test_serves_start_warnings_name_its_settings_as_the_user_could_set_them(tiny_llama_dir, tmp_path, caplog):
    """A review: serve's start warned 'qa_adapter 'squad' is not registered' and 'max_new_tokens 64 leaves ...',
    naming settings by their fields where no flag or variable gave them; serve has the flags."""
    caplog.set_level(logging.WARNING)
    rt = serve_runtime(["--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device", "cpu"])
    rt.start()
    try:
        warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    finally:
        rt.stop()
    assert "--qa-adapter 'squad' is not registered" in "\n".join(warned), warned
    assert "--max-new-tokens 64 leaves 448 of the base model's 512 positions" in "\n".join(warned), warned
    assert not [line for line in warned if "qa_adapter" in line or "max_new_tokens" in line], warned


def test_serves_replies_name_its_settings_as_the_command_line_gave_them(tiny_llama_dir, tmp_path):
    """A review: a rank past --max-rank, refused over HTTP, said "(max_rank)", the setting's field, which only the
    CLI's own errors named as given; a body past --max-body-bytes said "(its max_body_bytes)". The bound leaves room
    for the registration's body, whose path is the test's folder (100 bytes: a 413 where pytest's folder was long)."""
    wide = make_adapter(tiny_llama_dir, tmp_path / "root" / "wide", r=4)
    rt = serve_runtime(["--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path / "root"), "--device",
                        "cpu", "--max-rank", "2", "--max-body-bytes", "1000", "--admin-key", "k"])
    with TestClient(create_app(rt=rt)) as client:
        wait_ready(client.get)
        rank = client.post("/adapters", json={"name": "wide", "path": str(wide)}, headers=ADMIN)
        body = client.post("/answer", json={"context": "c" * 1000, "question": "q"})
    assert rank.status_code == 422 and rank.json()["error"] == "adapter rank 4 must be an integer in 1..2 (--max-rank)"
    assert body.status_code == 413 and body.json()["error"].endswith("1000 bytes (its --max-body-bytes)")


def test_serve_checks_its_settings_against_the_memory_once(tiny_llama_dir, tmp_path):
    """A review: under ``--memory 2g`` serve advised ``--max-batch 16``, which fit by 6 MB; given it, serve's check
    before it took its port passed, and the start checked again, its process grown by 14 MB since, refused it, and the
    server stayed unready. Here the process seems past any memory after the first check: the start does not check
    again, and serves."""
    port = free_port()
    argv = ["loraswap", "serve", "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path), "--device",
            "cpu", "--host", "127.0.0.1", "--port", str(port)]
    grows = ("import itertools, sys; from service.model import device_room; "
             "used = itertools.chain([0], itertools.repeat(2**62)); device_room.in_use = lambda device: next(used); "
             f"from service.cli.main import main; sys.argv = {argv!r}; main()")
    with subprocess.Popen([sys.executable, "-c", grows], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as process, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        try:
            wait_ready(http.get, timeout=WAIT)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=WAIT)
    assert process.returncode == 0, err
