"""A second stop (SIGTERM or Ctrl-C) while a command shuts down after the first changes nothing: one line, status 130
(a review: ``eval`` SIGTERMed twice 0.3 s apart ended by the second signal, status 143, hung in the engine's stop
with a lock the second KeyboardInterrupt left held, or aborted, status 134; ``bench`` under ``timeout`` printed a
traceback from ``threading._shutdown``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.data.make_corpus import SQUAD_SAMPLE
from tests.server_helpers import free_port
from tests.unit.test_training_refusals import TINY_RUN


def stopped_twice(command: list[str], log, started: callable, second: signal.Signals, gap: float = 0.3) -> int:
    """Run ``command``; once ``started()`` (polled), SIGTERM, then ``second`` ``gap`` seconds later; its exit
    status."""
    process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
                               stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not started() and process.poll() is None:
            assert time.monotonic() < deadline, "the command did not start its work within 120 s"
            time.sleep(0.2)
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        time.sleep(gap)
        process.send_signal(second)
        return process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_twice_ends_with_one_line_and_status_130(second, tiny_llama_dir, tmp_path):
    log = tmp_path / "eval.log"
    command = [sys.executable, "-m", "service.cli.entry", "eval", "--task", "squad", "--adapter", "none", "--data",
               str(SQUAD_SAMPLE), "--base-model", str(tiny_llama_dir), "--adapters-dir", str(tmp_path),
               "--device", "cpu", "--json", str(tmp_path / "report.json")]
    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, lambda: "is not registered" in log.read_text(), second)
    err = log.read_text()
    assert status == 130 and err.count("loraswap eval: interrupted\n") == 1, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    assert not (tmp_path / "report.json").exists()


def test_train_stopped_twice_ends_with_one_line_and_leaves_no_partial_folder(tiny_gpt2_dir, nli_data,
                                                                             tmp_path):
    out, log = tmp_path / "adapter", tmp_path.parent / f"{tmp_path.name}.log"
    command = [sys.executable, "-m", "service.cli.entry", "train", *TINY_RUN, "--max-steps", "100000", "--base-model",
               str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, lambda: bool(list(tmp_path.glob(".adapter.partial-*"))),
                               signal.SIGTERM)
    err = log.read_text()
    assert status == 130 and err.count("loraswap train: interrupted\n") == 1, err[-2000:]
    assert err.endswith("\nloraswap train: interrupted\n"), err[-2000:]  # not on the line of training's progress bar
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]  # no adapter, no .partial folder


@pytest.mark.parametrize(("gap", "second"), [(0.05, signal.SIGTERM), (0.3, signal.SIGINT)])
def test_a_ready_server_stopped_twice_ends_once_its_last_line_uvicorn_s(gap, second, tiny_llama_dir, tmp_path):
    """A second stop while the server drains stops it at once (README), and was raised again once it had stopped
    (uvicorn's handler keeps the signals it handled for that): the process then said 'loraswap serve: stopped' after
    uvicorn's 'Finished server process', its documented last line."""
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "service.cli.entry", "serve", "--base-model", str(tiny_llama_dir),
               "--adapters-dir", str(tmp_path), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        except httpx.TransportError:
            return False

    with log.open("w") as stderr:
        status = stopped_twice(command, stderr, ready, second, gap)
    err = log.read_text()
    assert status == 0 and err.count("Finished server process") == 1, err[-2000:]
    assert err.splitlines()[-1].startswith("INFO:     Finished server process"), err[-2000:]
    assert "Traceback" not in err and "loraswap serve: stopped" not in err, err[-2000:]
