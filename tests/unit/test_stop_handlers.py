"""What SIGINT and SIGTERM do in a command (service.cli.command: ``interrupt``, ``run_until_stopped``), where both come
before Python runs either handler, as on a busy machine (a CI run: ``eval`` stopped twice under load printed
"Signal 15 ignored due to race condition" and asyncio's "Task exception was never retrieved", each with a
traceback). Both are made pending at once: blocked, sent, unblocked; Python then runs SIGINT's handler first."""
from __future__ import annotations

import subprocess
import sys

BOTH_PENDING = ("import os, signal; both = {signal.SIGINT, signal.SIGTERM}; "
                "signal.pthread_sigmask(signal.SIG_BLOCK, both); os.kill(os.getpid(), signal.SIGTERM); "
                "os.kill(os.getpid(), signal.SIGINT); signal.pthread_sigmask(signal.SIG_UNBLOCK, both)")


def printed(code: str) -> str:
    """What Python ``code`` printed, in a process of its own, having printed nothing on stderr."""
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.stderr == "", ran.stderr
    return ran.stdout


def test_a_stop_then_another_raise_one_keyboard_interrupt_and_print_nothing():
    assert printed("import time; from service.cli.command import take_stops; take_stops()\n"
                   f"try:\n    {BOTH_PENDING}; time.sleep(0.1)\n"
                   "except KeyboardInterrupt as exc:\n    print('stopped by', exc)\n"
                   "time.sleep(0.1); print('went on')") == "stopped by SIGINT\nwent on\n"


def test_a_stop_of_an_asyncio_run_cancels_its_tasks_then_raises_keyboard_interrupt():
    assert printed("import asyncio; from service.cli.command import run_until_stopped, take_stops; take_stops()\n"
                   "async def inner():\n    try:\n        await asyncio.sleep(10)\n"
                   "    except asyncio.CancelledError:\n        print('cancelled'); raise\n"
                   f"async def stops():\n    await asyncio.sleep(0.1)\n    {BOTH_PENDING}\n"
                   "    await asyncio.sleep(10)\n"
                   "async def work():\n    return await asyncio.gather(inner(), inner(), stops())\n"
                   "try:\n    run_until_stopped(work())\n"
                   "except KeyboardInterrupt as exc:\n    print('stopped by', exc)"
                   ) == "cancelled\ncancelled\nstopped by SIGINT\n"


def test_an_asyncio_run_not_stopped_gives_its_result_and_leaves_the_handlers():
    assert printed("import asyncio, signal; from service.cli.command import interrupt, run_until_stopped, take_stops\n"
                   "take_stops()\nasync def work():\n    return 7\n"
                   "print(run_until_stopped(work()), signal.getsignal(signal.SIGTERM) is interrupt)") == "7 True\n"
