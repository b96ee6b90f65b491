"""A command stopped (Ctrl-C, SIGTERM) ends at once with its one line and status 130, whatever the stop left running,
its exit hooks run (a review: ``loraswap bench`` SIGTERMed during transformers' ``generate`` ended 26 s later, waiting
for it, and 1 run in 4 aborted: ``terminate called without an active exception``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import training.evaluate
from service.cli.main import main
from service.model.cpu_threads import on_passing_thread
from tests.unit.test_training_refusals import TINY_RUN


def waiting_for_a_future(thread: int) -> bool:
    """Whether ``thread`` (its ident) waits for a future's outcome (``Future.result`` or ``exception``)."""
    frame = sys._current_frames()[thread]
    return frame.f_code.co_name == "wait" and frame.f_back.f_code.co_name in ("result", "exception")


def test_a_stop_while_work_runs_on_a_passing_thread_is_raised_without_waiting_for_the_work():
    """The work would end only once the stop is raised (30 s at most: on the old code, on_passing_thread waited that
    long and the work had ended by the time the stop was raised)."""
    released, ended = threading.Event(), threading.Event()
    main = threading.main_thread().ident

    def work() -> None:
        deadline = time.monotonic() + 30  # then the stop is sent all the same and the test fails: never a hang
        while not waiting_for_a_future(main) and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGUSR1)  # the stop, to the thread that waits
        released.wait(30)
        ended.set()

    def stop(signum, frame):
        raise KeyboardInterrupt

    handler = signal.signal(signal.SIGUSR1, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            on_passing_thread(work)
        assert not ended.is_set()
    finally:
        released.set()
        signal.signal(signal.SIGUSR1, handler)


# `loraswap bench` as its own process, its run replaced by work that the stop it sends itself leaves running on a
# passing thread, a thread not daemonic (the interpreter's end joins it), an exit hook that says it ran, and a
# progress bar left open
STOPPED_BENCH = """
import atexit, signal, sys, threading, types
from tqdm import tqdm
from service.model.cpu_threads import on_passing_thread

def run(args):
    atexit.register(print, "exit hook ran", flush=True)
    bar = tqdm(total=10, desc="steps")  # held, as a loop holds its bar
    bar.update(3)
    threading.Thread(target=threading.Event().wait, args=(600,), name="left running").start()
    main = threading.main_thread().ident
    on_passing_thread(lambda: (signal.pthread_kill(main, signal.SIGTERM), threading.Event().wait(600)))

sys.modules["loadtest.bench"] = types.SimpleNamespace(run=run)
sys.argv = ["loraswap", "bench"]
from service.cli.entry import main
main()
"""


def test_a_stopped_command_ends_at_once_with_its_line_and_status_130_its_exit_hooks_run():
    ended = subprocess.run([sys.executable, "-c", STOPPED_BENCH], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert ended.returncode == 130, ended.stderr[-2000:]
    assert ended.stderr.endswith("it/s]\nloraswap bench: interrupted\n"), ended.stderr[-2000:]  # after the bar's line
    assert ended.stderr.count("interrupted") == 1 and "Traceback" not in ended.stderr, ended.stderr[-2000:]
    assert ended.stdout == "exit hook ran\n"


def test_a_stop_s_line_starts_a_line_of_its_own_after_a_progress_bar(monkeypatch, capsys):
    """Stopped with a progress bar open (train's, eval's load of the base), the line was written on the bar's line:
    ``steps:  30%|###       | 3/10 [00:00<00:00, 9.1it/s]loraswap eval: interrupted``."""
    from tqdm import tqdm

    def interrupted(_args):
        bar = tqdm(total=10, desc="steps")  # held, as a loop holds its bar
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.evaluate, "run", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "squad", "--adapter", "none"])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.startswith("\rsteps:"), err
    assert err.endswith("it/s]\nloraswap eval: interrupted\n"), err


# `loraswap train` as its own process, each training step held in a long C++ call, as a backward pass holds the thread
# that runs it: a wait on a torch future, which runs no Python signal handler until it returns (released after 300 s)
STOPPED_TRAIN = """
import sys, threading
from pathlib import Path
import torch
from training import train

marker = Path(sys.argv[1])

def held_step(self, model, inputs, *args, **kwargs):
    held = torch.futures.Future()
    threading.Timer(300, held.set_result, (None,)).start()
    marker.touch()  # the step is held
    held.wait()

train.FiniteLossTrainer.training_step = held_step
sys.argv = ["loraswap", *sys.argv[2:]]
from service.cli.entry import main
main()
"""


def test_train_stopped_during_a_long_step_ends_at_once_and_leaves_no_partial_folder(tiny_gpt2_dir, nli_data,
                                                                                      tmp_path):
    """A review: train SIGTERMed during a backward pass (SmolLM2) ended 9-52 s later, once the pass had returned to
    Python, where the stop's handler runs; here the step would return after 300 s."""
    held, out = tmp_path / "held", tmp_path / "adapter"
    command = [sys.executable, "-c", STOPPED_TRAIN, str(held), "train", *TINY_RUN, "--max-steps", "100000",
               "--base-model", str(tiny_gpt2_dir), "--data-dir", str(nli_data), "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not held.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no training step began within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130 and err.endswith("\nloraswap train: interrupted\n"), err[-2000:]
    assert err.count("interrupted") == 1 and "Traceback" not in err, err[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "held"]  # no adapter, no .partial folder
