"""The server process readied at its start: glibc malloc's tcache off (by executing itself again), bitsandbytes kept
out of a full-precision server, and only for a process that is the server from its start."""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

import service.cli.main as cli_main
import service.http.server as server_module
from service.model.malloc import TCACHE, tunables_with_tcache_off
from tests.server_helpers import free_port

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's tunables only")

# freed small chunks land in malloc's fast bins (mallinfo2's fsmblks) only without the tcache, which keeps them
FAST_BINS = """
import ctypes, os, sys
from service.model.malloc import restart_without_tcache
restart_without_tcache()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keep")]
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
before = libc.mallinfo2().fsmblks
chunks = [libc.malloc(40) for _ in range(5)]
for chunk in chunks:
    libc.free(chunk)
print(os.environ.get("GLIBC_TUNABLES"), libc.mallinfo2().fsmblks - before, sys.argv[1:])
"""


def test_the_tcache_is_turned_off_beside_other_tunables_unless_its_size_is_set():
    assert tunables_with_tcache_off({}) == f"{TCACHE}=0"
    assert tunables_with_tcache_off({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
        f"glibc.malloc.arena_max=2:{TCACHE}=0")
    assert tunables_with_tcache_off({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TCACHE}=7"}) is None
    assert tunables_with_tcache_off({"GLIBC_TUNABLES": "glibc.malloc.tcache_count_x=1"}) == (
        f"glibc.malloc.tcache_count_x=1:{TCACHE}=0")


@glibc
@pytest.mark.parametrize(("tunables", "expected"), [(None, f"{TCACHE}=0"), (f"{TCACHE}=7", f"{TCACHE}=7")])
def test_a_process_starts_again_with_its_command_line_and_the_tcache_off(tunables, expected):
    env = {"PATH": "/usr/bin:/bin", **({"GLIBC_TUNABLES": tunables} if tunables else {})}
    out = subprocess.run([sys.executable, "-c", FAST_BINS, "one", "two"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split(maxsplit=1)
    setting, fast_bytes = out[0], int(out[1].split()[0])
    assert setting == expected and out[1].endswith("['one', 'two']\n")
    assert (fast_bytes > 0) == (expected == f"{TCACHE}=0"), "glibc did not take the tcache's size"


def test_only_a_process_that_is_the_server_from_its_start_is_readied_and_ended_at_once(monkeypatch):
    calls = []
    monkeypatch.setattr(cli_main.malloc, "restart_without_tcache", lambda: calls.append(("restart",)))
    monkeypatch.setattr(cli_main.server_process, "prepare", lambda quantize: calls.append(("prepare", quantize)))

    def end(status):  # server_process.end, which would end this process
        calls.append(("end", status))
        raise SystemExit(status)

    def serve(settings, named, sockets, checked):
        for sock in sockets:
            sock.close()
        calls.append(("serve", settings.quantize))

    monkeypatch.setattr(cli_main.server_process, "end", end)
    monkeypatch.setattr(server_module, "serve", serve)
    port = str(free_port())
    monkeypatch.setattr(sys, "argv", ["loraswap", "serve", "--quantize", "none", "--port", port])
    with pytest.raises(SystemExit):
        cli_main.main()
    assert cli_main.main(["serve", "--port", port]) == 0  # a caller's process (tests, embedding): left as it is
    assert calls == [("restart",), ("prepare", "none"), ("serve", "none"), ("end", 0), ("serve", "none")]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_full_precision_server_keeps_peft_from_importing_bitsandbytes(quantize):
    absent = quantize == "none" or importlib.util.find_spec("bitsandbytes") is None
    code = ("import sys; from service.model import server_process as p; "
            f"p.prepare({quantize!r}); import peft; print(sys.modules.get('bitsandbytes') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(absent)


@pytest.mark.parametrize(("flags", "called"), [([], True), (["--quantize", "nf4"], False)])
def test_the_other_commands_of_a_full_precision_base_go_without_bitsandbytes(monkeypatch, tmp_path, flags, called):
    """Each command but serve imported it through peft, and printed its warning on the CPU (a review)."""
    calls = []
    monkeypatch.setattr(cli_main.server_process, "without_bitsandbytes", lambda: calls.append(True))
    with pytest.raises(SystemExit) as exited:  # no such base: a usage error once the command runs
        cli_main.main(["eval", "--task", "nli", "--adapter", "none", "--base-model", str(tmp_path / "none"), *flags])
    assert exited.value.code == 2 and bool(calls) == called


HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
# `loraswap serve` as its own process, up to its server: what was imported when it started again (without the tcache),
# and whether bitsandbytes is in the server (the server module replaced by one that reports and returns)
READIED = """
import sys, types
from service.model import malloc
heavy = {heavy!r}
malloc.restart_without_tcache = lambda: print("restart:", [name for name in heavy if name in sys.modules])
sys.modules["service.http.server"] = types.SimpleNamespace(
    serve=lambda settings, named, sockets, checked: print("serve:", sys.modules.get("bitsandbytes") is not None))
sys.argv = ["loraswap", "serve", "--base-model", {base!r}, "--device", "cpu", "--port", "{port}"]
import service.cli.main
service.cli.main.main()
"""


def test_the_server_starts_again_before_serve_s_checks_import_torch(tiny_llama_dir):
    """serve's checks of the settings (the device, oneDNN's environment, the base's config) import torch, transformers
    and peft, and peft bitsandbytes: run before the restart without the tcache, as they were, every start imported
    them twice (the CPU image replayed in a chroot on a busy 2-core machine: 25 s to ready, 11-16 s without), and the
    server kept bitsandbytes and its warning on a full-precision base."""
    code = READIED.format(heavy=HEAVY, base=str(tiny_llama_dir), port=free_port())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["restart: []", "serve: False"]


# `loraswap serve` as its own process, started again without the tcache for real, up to its server: a line for each
# Settings built (the server module replaced by one that says it was reached)
READ_ONCE = """
import sys, types
from service.settings import Settings
built = Settings.__init__
def counted(self, *args, **values):
    print("settings read", flush=True)
    built(self, *args, **values)
Settings.__init__ = counted
sys.modules["service.http.server"] = types.SimpleNamespace(serve=lambda *args: print("serve"))
sys.argv = ["loraswap", "serve", "--cache-dir", {cache!r}, "--port", "{port}"]
import service.cli.main
service.cli.main.main()
"""


@glibc
def test_serve_reads_its_configuration_once(tmp_path):
    """serve built its Settings, then started again without the tcache, and the process started again built them
    once more (a summary: 'config read twice at start'); it starts again first now. The environment is the one
    execve passes on, so the two reads agreed; a path setting's check of the file system (usable_path) ran twice."""
    env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    code = READ_ONCE.format(cache=str(tmp_path / "cache"), port=free_port())  # the embedded base is not converted
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.splitlines() == ["settings read", "serve"], out.stdout
