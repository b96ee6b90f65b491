"""Chat templates rendered in child processes, each render under a deadline and a memory bound.

A chat template is code (Jinja): the adapter folder's, or the base model's. Jinja's sandbox keeps it from Python's
internals but not from work: 150 bytes of loops rendered one 50 KB chat request as 4 million tokens (21 s, 2.7 GB),
and nested ``range`` loops kept a core busy long after their client left. So each render runs in a child process
(a new interpreter, not a fork: the server's threads are not copied) whose data segment may grow by at most
``MAX_RENDER_BYTES`` past what it holds once started (``RLIMIT_DATA``, getrlimit(2): heap and private mappings), and
which is killed once a render (one of the up to ``RENDERS`` of a job) has run ``MAX_RENDER_SECONDS``; a new one is
started for the next render. Real templates render a chat in about a millisecond (SmolLM2's, a 3,000-character
message: 1.1 ms in a child, 1.3 ms in process, in one run of 200 each).

Whose fault a failed render is decides its error. The template's, a TemplateRefused (a 422), is what the template does
in its process: an exception of its code (the process answers it), a render past the deadline (the sandbox kills the
process, knowing why), past the memory bound (``RLIMIT_DATA`` makes the allocation fail: a MemoryError the process
answers where Python allocates; where the tokenizer's Rust code does, it aborts, SIGABRT after "memory allocation of N
bytes failed" on its stderr, which the sandbox relays and reads: ``ALLOCATION_FAILED``), or the process ending by itself
mid-render (an exit status, or a signal a process gets for what it does: ``OWN_SIGNALS``, such as SIGSEGV). The
server's, a RenderUnavailable (a 503, retried), is what the template cannot do: the process killed by a signal the
sandbox did not send (SIGKILL from an operator or the OOM killer, whose victim a process bounded to ``MAX_RENDER_BYTES``
is only when the machine lacks memory; SIGTERM; SIGINT), its socket failing while it lives, a step that got less than
its deadline's CPU time in ``STARVED_FACTOR`` times as long (the process stopped by SIGSTOP or a debugger, frozen, or
starved by a busy machine: the deadlines count the process's CPU time, the template's work, so a render that waited for
a core is not charged to its template), a process that died between two renders, or one that failed to start. Either way
the process is stopped and the next render starts a new one.

Each tokenizer has ``WORKERS`` children, started when first needed, taking turns between templates (``Renderer``).
A child runs ``NICENESS`` below the server, without the server's secrets in its environment, and ends when the
server does, killed or not. At shutdown ``Renderer.close`` fails the renders not begun (EngineStopped, a 503) and ends
the processes once the renders running end.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import EngineStopped, RenderUnavailable, TemplateBacklog, TemplateRefused
from service.model.process_status import proc_status

if TYPE_CHECKING:  # the CLI's parser imports prompt_styles, which imports this, without loading transformers
    from transformers import PreTrainedTokenizerBase

MAX_RENDER_SECONDS = 2.0  # a render's deadline
# the most renders of one job (``prompt_styles.render_ids``): the text, the token ids, the marked text, and where one of
# them fails, its own error's; each has its deadline (a review: under one deadline for the whole job, a template of
# 0.7 s a render was refused once the marked render was added), so a job runs at most MAX_JOB_SECONDS
RENDERS = 4
MAX_JOB_SECONDS = RENDERS * MAX_RENDER_SECONDS
MAX_RENDER_BYTES = 512 * 2**20  # how much a render may grow its child's data segment
WORKERS = 2  # children per tokenizer: renders that run at once
# jobs of one template known to be slow that may wait (``Renderer.slow``; a job is a prompt: a chat request's
# messages, or one of /answer's and /nli's chat-style prompts): they run one at a time (the slow templates share
# WORKERS - 1 processes) and each may take MAX_JOB_SECONDS (RENDERS renders), so the last of 4 waits up to 32 s before
# its own; most of them end at their first render's deadline anyway (a 422), so a client past these is told at once
# (a 429), not kept waiting behind a pile that grows as fast as clients retry
MAX_SLOW_WAITING = 4
# a slow template is slow no more after this many renders of it in a row that each ran at most RECOVERED_SECONDS on
# the CPU (``Renderer``: why these)
RECOVERY_RENDERS = 3
RECOVERED_SECONDS = MAX_RENDER_SECONDS / 4
START_SECONDS = 120.0  # the most a child may take to start (import transformers, unpickle the tokenizer)
COMPILE_SECONDS = 10.0  # the most a child may take to compile a template (256 KiB of code: about 1 s)
IDLE_SECONDS = 60.0  # a worker and its child end after this long without a job
NICENESS = 10  # children run below the server's priority: a template running to its deadline slows decoding less
EXIT_SECONDS = 1.0  # how long a process whose socket closed is given to exit, before it is taken for alive
# a step's deadline counts the process's CPU time; one that got less than its deadline's in this many times as long
# in all was starved (stopped, frozen, or at nice 10 on a machine busy serving): the server's trouble
STARVED_FACTOR = 4
# the signals a process gets for what it does itself (faults, its own abort, its limits): a template's doing
OWN_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS,
                         signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ})
# what a process writes to its stderr as it aborts (SIGABRT) on an allocation that failed: Rust's (the tokenizer's: a
# template that rendered 5 MB of text, tokenized past the memory bound) and C++'s
ALLOCATION_FAILED = re.compile(rb"memory allocation of \d+ bytes failed|std::bad_alloc")
STDERR_OVERLAP = 256  # the last bytes of a process's stderr searched again with the next read: a line split in two
SHUTTING_DOWN = "the service is shutting down: the chat template's render had not begun"
MISSING = object()

Job = tuple[list[dict[str, str]], "str | None", dict[str, bool]]  # (messages, template, flags) of ``render_ids``


def past_memory_bound(what: str) -> str:
    """A render's refusal for passing the memory bound while it had to ``what``."""
    return f"the chat template took more than the {MAX_RENDER_BYTES // 2**20} MiB memory bound of a render to {what}"


class RenderBound(TemplateRefused):
    """A render ran past the deadline or the memory bound, or its process ended by itself."""


class Child:
    """One render process: takes a job, answers (True, token ids) or (False, why the template refused)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        """Start the process and send it ``tokenizer``. Raises RenderUnavailable when it cannot be started, dies
        starting, or is not ready within ``START_SECONDS``: the server's trouble, not a template's."""
        ours, theirs = socket.socketpair()
        # a new interpreter running this module (not multiprocessing's spawn, which runs the parent's main script
        # again in the child: a script without a __main__ guard would run twice), imported from where this process
        # imported it (PYTHONPATH first; -P: not from the working directory)
        source = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, (source, os.environ.get("PYTHONPATH"))))
        environment = {name: value for name, value in os.environ.items() if not secret(name)}
        try:
            self.process = subprocess.Popen([sys.executable, "-P", "-m", __name__, str(theirs.fileno()),
                                             str(os.getpid())],
                                            env={**environment, "PYTHONPATH": path, "RUST_BACKTRACE": "0"},
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:  # no process (out of memory, of processes)
            ours.close()
            raise RenderUnavailable(f"the server could not start a chat template process: {exc!r}") from None
        finally:
            theirs.close()
        self.allocation_failed, self._stderr_tail = False, b""
        self.relay = threading.Thread(target=self.relay_stderr, name="chat-template-stderr", daemon=True)
        self.relay.start()
        self.connection = Connection(ours.detach())
        try:
            self.connection.send(tokenizer)
            if not self.connection.poll(START_SECONDS):
                raise TimeoutError(f"not started within {START_SECONDS:g} s")
            self.start_bytes = self.connection.recv()  # ready (imported, tokenizer read, memory bound set): its data
        except (OSError, EOFError) as exc:
            self.stop()
            raise RenderUnavailable(f"the chat template process failed to start: {exc!r}") from None

    def relay_stderr(self) -> None:
        """Copy the process's stderr to the server's as it comes (the terminal they shared before), noting whether
        it ever said an allocation failed (``allocation_failed``: ``ALLOCATION_FAILED`` anywhere in it, whatever
        follows; a review: a Rust backtrace of ~16 KB after it pushed it out of the last 4 KiB read), until the
        process ends. The process runs with ``RUST_BACKTRACE=0``: a backtrace of the tokenizer's abort tells an
        operator nothing of the template."""
        with self.process.stderr as stderr:
            while chunk := os.read(stderr.fileno(), 65536):
                with contextlib.suppress(OSError):  # the server's stderr closed: read on, or the process would block
                    os.write(2, chunk)
                read = self._stderr_tail + chunk
                self.allocation_failed = self.allocation_failed or bool(ALLOCATION_FAILED.search(read))
                self._stderr_tail = read[-STDERR_OVERLAP:]

    def aborted_on_memory(self) -> bool:
        """Whether the process, ended, was ended by SIGABRT on an allocation that failed (``allocation_failed``,
        its stderr read to its end)."""
        self.relay.join(EXIT_SECONDS)
        return self.process.returncode == -signal.SIGABRT and self.allocation_failed

    def render(self, job: Job) -> list[int]:
        """The token ids of ``job``; ``render_seconds``, then, the most seconds one of its renders (up to ``RENDERS``)
        ran on the CPU (the template's work, as its deadline counts it: from when the template is compiled, then
        from the end of the render before). TemplateRefused when the template refuses it, or RenderBound when a
        render runs past ``MAX_RENDER_SECONDS`` (each its own: Jinja compiles a template once per process, in up to
        about a second for one of the largest accepted, before the first), past the memory bound, or ends the
        process; RenderUnavailable when the render fails for the server's trouble (``receive``). After either of the
        last two the process is stopped (``alive`` turns false)."""
        try:
            self.connection.send(job)
        except OSError:  # the process died since its last render: this template never ran in it
            self.stop()
            raise RenderUnavailable("the server could not render the chat template: its process died before the "
                                    "render (not the template's doing)") from None
        self.receive(COMPILE_SECONDS, "compile")  # the template compiled (or found not to compile)
        self.render_seconds, kind = 0.0, "rendered"
        while kind == "rendered":  # a render ended: the next one's deadline runs from here
            wall, cpu = time.monotonic(), process_state(self.process.pid)[1]
            kind, outcome = self.receive(MAX_RENDER_SECONDS, "render the messages")
            self.render_seconds = max(self.render_seconds, ran_since(self.process.pid, cpu, wall))
        if kind != "ids":
            raise (RenderBound if kind == "bound" else TemplateRefused)(outcome)
        return outcome

    def receive(self, seconds: float, what: str):
        """The process's next message, before it has run ``seconds`` on the CPU in this step (the template's work; the
        wall clock where /proc cannot say) and within ``STARVED_FACTOR`` x ``seconds`` in all; else the process is
        stopped and RenderBound raised when the template is to blame: the step ran ``seconds`` on the CPU, or the
        process ended by itself (``ended``), else RenderUnavailable: it was starved of the CPU, or killed from
        outside."""
        started, ran = time.monotonic(), process_state(self.process.pid)[1]
        used = waited = 0.0
        while used < seconds and waited < STARVED_FACTOR * seconds:
            try:
                if self.connection.poll(min(seconds - used, STARVED_FACTOR * seconds - waited)):
                    return self.connection.recv()
            except (EOFError, OSError):  # the process died, or its socket failed
                raise self.ended(what) from None
            waited, used = time.monotonic() - started, ran_since(self.process.pid, ran, started)
        grown = data_bytes(self.process.pid) - self.start_bytes
        self.stop()
        if used < seconds:
            raise RenderUnavailable(f"the server could not render the chat template: its process got {used:.2f} s of "
                                    f"CPU in the {waited:.0f} s it had to {what} (stopped, or starved by a busy "
                                    "server; not the template's doing)")
        # one that ran short of memory first (a template that rendered 5 MB of text, tokenized: 1.2-1.9 s of CPU to
        # the bound) says so
        held = (f" (its process then {grown / 2**20:.0f} MiB into the {MAX_RENDER_BYTES // 2**20} MiB memory bound of "
                "a render)" if grown > MAX_RENDER_BYTES / 2 else "")
        raise RenderBound(f"the chat template took more than {seconds:g} s to {what}{held}")

    def ended(self, what: str) -> Exception:
        """The error for a process whose socket closed or failed while it had to ``what``, once it is stopped:
        RenderBound when it ended by itself (past the memory bound: ``aborted_on_memory``; an exit status, or one of
        ``OWN_SIGNALS``), else RenderUnavailable (a signal from outside: SIGKILL, SIGTERM; or still alive after
        ``EXIT_SECONDS``: its socket failed)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(EXIT_SECONDS)
        code = self.process.returncode
        self.stop()
        if code is not None and self.aborted_on_memory():
            return RenderBound(f"{past_memory_bound(what)} (its process aborted on an allocation that failed: SIGABRT)")
        if code is not None and (code >= 0 or -code in OWN_SIGNALS):
            return RenderBound(f"the chat template's process died trying to {what} ({ending(code)})")
        how = "its socket failed" if code is None else f"its process was killed by {ending(code)}"
        return RenderUnavailable(f"the server could not render the chat template: {how} while it had to {what} (not "
                                 "the template's doing)")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def usable(self) -> bool:
        """Alive and not stopped (SIGSTOP, a debugger: state T or t): a process stopped while idle would cost its next
        render the compile step's whole wait (``COMPILE_SECONDS``) before a 503."""
        return self.alive and process_state(self.process.pid)[0] not in ("T", "t")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.connection.close()


def ending(code: int) -> str:
    """How a process ended, from its return code: "exit status 1", "SIGKILL"."""
    if code >= 0:
        return f"exit status {code}"
    with contextlib.suppress(ValueError):
        return signal.Signals(-code).name
    return f"signal {-code}"


def ran_since(pid: int, cpu: float | None, wall: float) -> float:
    """The seconds process ``pid`` has run on the CPU since it had run ``cpu`` seconds (``process_state``'s); where
    /proc cannot say, now or then, the wall clock's seconds since ``wall`` (``time.monotonic``'s)."""
    now = process_state(pid)[1]
    return now - cpu if cpu is not None and now is not None else time.monotonic() - wall


def process_state(pid: int) -> tuple[str, float | None]:
    """Process ``pid``'s state letter and the seconds it has run on the CPU (user and system), from
    /proc/<pid>/stat (proc(5)); ("", None) where it cannot be read (the process ended, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "", None
    return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Renderer:
    """The render processes of one tokenizer: ``WORKERS`` threads, each with a child process, take render jobs from
    a queue that is fair between templates: the templates with jobs waiting take turns, and the slow ones (a render of
    which ran to a bound: the deadline, the memory bound, a process that ended by itself: ``RenderBound``) render in
    ``WORKERS`` - 1 processes at most, all of them together, so that the others always have one, and each has at most
    ``MAX_SLOW_WAITING`` jobs waiting (a job past them is refused at once). A slow template is slow no more once
    ``RECOVERY_RENDERS`` renders of it in a row have each run ``RECOVERED_SECONDS`` or less on the CPU (a quarter of
    the deadline; real templates take about a millisecond): a bound met once (a message far longer than the others, a
    render that happened to meet the memory bound) throttled it until the server restarted. Several in a row, not
    one, as one cheap render may be a short message to a template that is dear on long ones; a render that meets a
    bound makes it slow again at once and starts the count anew, so a template whose renders alternate between cheap
    and endless takes the other templates' process for one endless render at most per ``RECOVERY_RENDERS`` cheap. A
    job whose caller gave up (its future cancelled) before it starts is skipped. Threads and their processes start
    with the first jobs and end after ``IDLE_SECONDS`` without one, or once ``close``d. Safe to call from any
    thread."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.changed = threading.Condition()
        self.waiting: OrderedDict[str | None, deque[tuple[Job, Future]]] = OrderedDict()  # by template, in turn
        self.running: Counter[str | None] = Counter()  # the renders running now, by template
        self.slow: set[str | None] = set()  # templates a render of which ran to a bound
        self.recovering: Counter[str | None] = Counter()  # slow ones: their renders in a row since, each cheap
        self.workers = self.idle = 0  # worker threads, and those of them waiting for a job
        self.closed = False

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future's result is ``render_ids`` of it, or TemplateRefused or RenderUnavailable as
        ``Child`` raises, or at once EngineStopped once ``close``d, and TemplateBacklog (a 429) when its template is
        a slow one with ``MAX_SLOW_WAITING`` jobs waiting. Cancel the future to withdraw a job not started."""
        future: Future = Future()
        with self.changed:
            refusal = self.refusal(job[1])
            if refusal is not None:
                future.set_exception(refusal)
                return future
            self.waiting.setdefault(job[1], deque()).append((job, future))
            if self.idle == 0 and self.workers < WORKERS:  # a worker waiting takes it: its process is started
                self.workers += 1
                threading.Thread(target=self.work, name="chat-template-renders", daemon=True).start()
            self.changed.notify()
        return future

    def refusal(self, template: str | None) -> Exception | None:
        """Why a job of ``template`` is not queued (call holding ``changed``): EngineStopped once ``close``d,
        TemplateBacklog for a slow template with ``MAX_SLOW_WAITING`` jobs waiting whose callers wait still; None
        when it is queued. The backlog's ``retry_after`` is the seconds the jobs of the template ahead of the next
        one may take, in whole seconds rounded up: (jobs waiting + jobs running) x ``MAX_JOB_SECONDS``, each job up
        to ``RENDERS`` renders of ``MAX_RENDER_SECONDS``, run one at a time (4 waiting and 1 running: 5 x 8 = 40 s).
        CPU seconds, so a busy machine's take longer; another slow template's jobs, which take turns with these, are
        not counted."""
        if self.closed:
            return EngineStopped(SHUTTING_DOWN)
        if template not in self.slow:  # the count below walks the template's queue: only for the slow ones
            return None
        waiting = sum(not future.cancelled() for _, future in self.waiting.get(template, ()))
        if waiting >= MAX_SLOW_WAITING:
            ahead = waiting + self.running[template]
            wait = math.ceil(ahead * MAX_JOB_SECONDS)
            return TemplateBacklog(f"this chat template is slow (a render of it ran to the bounds of a render), and "
                                   f"{waiting} prompts wait already to be rendered with it (each a chat request's "
                                   f"messages, or one of /answer's or /nli's chat-style prompts), the most this "
                                   f"server queues for such a template; retry in {wait} s, when the {ahead} prompts "
                                   f"ahead (waiting and rendering) will have been rendered, one at a time, each in up "
                                   f"to {MAX_JOB_SECONDS:g} s ({RENDERS} renders of {MAX_RENDER_SECONDS:g} s)",
                                   retry_after=wait)
        return None

    def render(self, job: Job) -> list[int]:
        """``submit``, waiting for the result (blocking; raises as the future does)."""
        return self.submit(job).result()

    async def rendered(self, job: Job) -> list[int]:
        """``submit``, awaiting the result without holding a thread (raises as the future does); cancelling the
        caller withdraws a job not begun."""
        return await asyncio.wrap_future(self.submit(job))

    def work(self) -> None:
        """A worker thread: render the jobs ``next_job`` hands out in its own child process, until idle or closed."""
        child = None
        while (taken := self.next_job()) is not None:
            job, future = taken
            try:
                if child is not None and not child.usable:
                    child.stop()  # dead, or stopped from outside while idle: a new one renders
                    child = None
                child = child or Child(self.tokenizer)
                ids = child.render(job)
                self.count_render(job[1], child.render_seconds)
                future.set_result(ids)
            except RenderBound as exc:
                with self.changed:
                    self.slow.add(job[1])
                    del self.recovering[job[1]]  # counted anew
                future.set_exception(exc)
            except Exception as exc:  # TemplateRefused, or RenderUnavailable: the server's trouble, not the template's
                future.set_exception(exc)
            finally:
                with self.changed:
                    self.running -= Counter([job[1]])  # a count that reaches 0 is dropped
                    self.changed.notify_all()
        if child is not None and child.alive:
            child.stop()

    def count_render(self, template: str | None, seconds: float) -> None:
        """Count a render of ``template`` that ran ``seconds`` on the CPU toward its recovery, if it is slow: one past
        ``RECOVERED_SECONDS`` starts the count anew, the ``RECOVERY_RENDERS``-th cheap one in a row ends its
        slowness."""
        with self.changed:
            if template not in self.slow:
                return
            if seconds > RECOVERED_SECONDS:
                del self.recovering[template]
            elif self.recovering[template] + 1 < RECOVERY_RENDERS:
                self.recovering[template] += 1
            else:
                self.slow.discard(template)
                del self.recovering[template]

    def close(self) -> None:
        """Render no more (the service shuts down): the jobs not begun fail at once, and those submitted later, with
        EngineStopped; a render running ends as it would (within its deadline), then its worker stops its process and
        ends, as the idle ones do at once. Does not wait."""
        with self.changed:
            self.closed = True
            jobs = [future for futures in self.waiting.values() for _, future in futures]
            self.waiting.clear()
            self.changed.notify_all()
        for future in jobs:
            if future.set_running_or_notify_cancel():  # False: its caller gave up
                future.set_exception(EngineStopped(SHUTTING_DOWN))

    def next_job(self) -> tuple[Job, Future] | None:
        """The next job of the first template in turn that may render now (not a slow one while the slow ones hold
        ``WORKERS`` - 1 processes), its turn then moved to the end; None once no job came for ``IDLE_SECONDS``, or
        once ``close``d (the worker ends)."""
        with self.changed:
            while True:
                if self.closed:
                    self.workers -= 1
                    return None
                slow_running = sum(self.running[key] for key in self.slow)
                template = next((key for key in self.waiting if key not in self.slow or slow_running < WORKERS - 1),
                                MISSING)
                if template is not MISSING:
                    jobs = self.waiting.pop(template)
                    job, future = jobs.popleft()
                    if jobs:
                        self.waiting[template] = jobs  # at the end: the other templates go first
                    if future.set_running_or_notify_cancel():  # False: its caller gave up
                        self.running[template] += 1
                        return job, future
                else:
                    self.idle += 1
                    notified = self.changed.wait(IDLE_SECONDS)
                    self.idle -= 1
                    if not notified and not self.waiting:
                        self.workers -= 1
                        return None


@lru_cache(maxsize=8)
def renderer(tokenizer: PreTrainedTokenizerBase) -> Renderer:
    """The render processes of ``tokenizer`` (a server has one tokenizer; the last few are kept, as
    ``chat.longest_token`` keeps theirs)."""
    return Renderer(tokenizer)


def secret(name: str) -> bool:
    """Whether environment variable ``name`` may hold a secret a child has no use for (loraswap's settings, keys and
    tokens): it is not passed on."""
    return name.startswith("LORASWAP_") or any(word in name.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSW"))


def watch_parent(parent: int) -> None:
    """End this process once ``parent`` is no longer its parent (the server died, even by SIGKILL: a render of an
    endless template would otherwise go on for ever)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def serve(connection: Connection, parent: int) -> None:
    """A child's loop: lower its priority, watch its ``parent``, read the tokenizer, bound its data segment, say it
    is ready (sending its data segment's bytes, from which the bound counts), then render each job it is sent until the
    pipe closes. A job's failure of any kind (MemoryError past the bound included) is answered, not raised."""
    from transformers.utils.chat_template_utils import _compile_jinja_template  # cached: the render reuses it

    from service.tasks.prompt_styles import render_ids  # not at the top: prompt_styles imports this module

    os.nice(NICENESS)
    threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    tokenizer = connection.recv()
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    start = data_bytes(os.getpid())
    bound = start + MAX_RENDER_BYTES
    resource.setrlimit(resource.RLIMIT_DATA, (bound if hard == resource.RLIM_INFINITY else min(bound, hard), hard))
    connection.send(start)
    while True:
        try:
            messages, template, flags = connection.recv()
        except EOFError:  # the server closed the pipe, or exited
            return
        with contextlib.suppress(Exception):  # one that does not compile fails the render, which says why
            _compile_jinja_template(tokenizer.chat_template if template is None else template)
        connection.send(None)  # compiled: the deadline runs from here
        try:
            ids = render_ids(tokenizer, messages, template, lambda: connection.send(("rendered", None)), **flags)
            connection.send(("ids", ids))
        except TemplateRefused as refused:
            connection.send(("refused", str(refused)))
        except MemoryError:
            connection.send(("bound", past_memory_bound("render the messages")))


def data_bytes(pid: int) -> int:
    """Process ``pid``'s data segment (``VmData`` of /proc/<pid>/status, proc(5): ``proc_status``), in bytes; 0 where
    it cannot be read (the process ended, no /proc)."""
    try:
        return proc_status("VmData", pid)
    except (OSError, StopIteration):
        return 0


if __name__ == "__main__":  # a child: ``Child`` runs this module with its socket's file descriptor and the server's pid
    # its end is the server's to decide (``Child.stop``, ``watch_parent``), in a session of its own: a stop sent to
    # the server's process group (a terminal's Ctrl-C, kill -INT -PGID) or to every process of its cgroup (systemd)
    # ended it as it started or rendered, and a chat the server was still serving, draining, got a 503 naming an
    # EOFError and the log a KeyboardInterrupt's traceback (a review)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the server gone (it exited, or closed the socket with a reply unread: a reset, not an end of file) ends the
    # child quietly, no traceback on the terminal they share
    with contextlib.suppress(ConnectionError):
        serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
