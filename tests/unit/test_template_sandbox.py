"""Chat templates render in child processes (``template_sandbox``): the same token ids as a render in process, and a
template that works without end or renders gigabytes is refused, its process stopped, and the next render served; a
render that fails for the server's trouble (its process killed or frozen from outside, or not started) is not the
template's; a closed renderer fails the renders not begun at once and ends its processes."""
from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from transformers import AutoTokenizer

from service.errors import EngineStopped, RenderUnavailable, TemplateBacklog, TemplateRefused
from service.http.server import DrainingServer
from service.model.base_model import resolve_base_dir
from service.runtime import Runtime
from service.settings import Settings
from service.tasks import template_sandbox
from service.tasks.prompt_styles import render_ids
from service.tasks.template_sandbox import (
    MAX_JOB_SECONDS,
    MAX_RENDER_SECONDS,
    MAX_SLOW_WAITING,
    RECOVERY_RENDERS,
    Child,
    Renderer,
    process_state,
    renderer,
)

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who gave their name to Normandy?"}]
ENDLESS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}"
HUGE = "{{ messages[-1].content * 100000000 }}"  # 3.2 GB of text
# 5 MB of text, rendered in Python within the memory bound; its tokens, in the tokenizer's Rust code, are past it
HUGE_TOKENS = "{{ 'word ' * 1000000 }}{% for m in messages %}{{ m.content }}{% endfor %}"
GENERATION = {"add_generation_prompt": True}
# endless on a message that says "loop", quick on any other
SOMETIMES = ("{% if messages[-1].content == 'loop' %}" + ENDLESS.removesuffix("{{ messages }}") +
             "{% endif %}{{ messages }}")
LOOP = [{"role": "user", "content": "loop"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("template", [None, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"])
@pytest.mark.parametrize("flags", [{"add_generation_prompt": True}, {"continue_final_message": True}])
def test_a_render_in_a_child_is_the_render_in_process(tokenizer, template, flags):
    messages = [*QUESTION, {"role": "assistant", "content": "Answer: <|im_end|> the"}]
    assert renderer(tokenizer).render((messages, template, flags)) == render_ids(tokenizer, messages, template,
                                                                                  **flags)


def test_a_child_whose_server_left_a_reply_unread_ends_quietly(tokenizer):
    """A review: after ``loraswap eval`` exited on a template's refusal, its render processes printed
    ConnectionResetError tracebacks: the server closed the socket with a reply unread, which the child's next read
    meets as a reset, not an end of file."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-P", "-m", template_sandbox.__name__, str(theirs.fileno()),
                              str(os.getpid())], pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(Path(template_sandbox.__file__).parents[2])})
    theirs.close()
    connection = Connection(ours.detach())
    connection.send(tokenizer)
    assert connection.poll(120) and connection.recv()  # ready
    connection.send((QUESTION, None, GENERATION))
    assert connection.poll(30)  # it answered: a reply lies unread
    connection.close()
    assert child.wait(30) == 0
    assert child.stderr.read().decode() == ""


def test_a_child_is_stopped_by_its_server_alone(tokenizer):
    """A review: a Ctrl-C to the server's process group (a terminal's, ``kill -INT -PGID``) ended its render processes
    too, while the server drained: a chat got a 503 naming an EOFError, the log a KeyboardInterrupt's traceback. A
    child runs in a session of its own and ignores SIGINT and SIGTERM (systemd sends those to every process of the
    service's cgroup): it renders on until its server stops it."""
    child = Child(tokenizer)
    assert os.getpgid(child.process.pid) != os.getpgid(0)
    for stop in (signal.SIGINT, signal.SIGTERM):
        os.kill(child.process.pid, stop)
    assert child.render((QUESTION, None, GENERATION)) == render_ids(tokenizer, QUESTION, None, **GENERATION)
    child.stop()
    assert not child.alive


@pytest.mark.usefixtures("patient_renders")
def test_a_template_past_the_deadline_is_refused_and_its_process_stopped(tokenizer):
    child = Child(tokenizer)
    started = time.monotonic()
    with pytest.raises(TemplateRefused, match=f"took more than {MAX_RENDER_SECONDS:g} s to render the messages"):
        child.render((QUESTION, ENDLESS, {"add_generation_prompt": True}))
    assert time.monotonic() - started < MAX_RENDER_SECONDS + 30
    assert not child.alive and child.process.returncode is not None  # killed and reaped: no core left busy


def working(work: int) -> str:
    """A template of some work at each render (about ``work`` sums, in loops of at most 100,000: jinja's sandbox
    refuses a longer range), which keeps each user's text as it is."""
    inner = min(work, 100_000)
    outer = -(-work // inner) if inner else 0
    return (f"{{% set ns = namespace(x=0) %}}{{% for k in range({outer}) %}}{{% for i in range({inner}) %}}"
            "{% set ns.x = ns.x + i %}{% endfor %}{% endfor %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")


def render_cpu_seconds(tokenizer, template: str) -> float:
    """The CPU seconds one render of ``template`` takes in this process, the least of 3."""
    tokenizer.apply_chat_template(QUESTION, chat_template=template, tokenize=False)  # compiled
    seconds = []
    for _ in range(3):
        started = time.process_time()
        tokenizer.apply_chat_template(QUESTION, chat_template=template, tokenize=False, **GENERATION)
        seconds.append(time.process_time() - started)
    return min(seconds)


@pytest.mark.usefixtures("patient_renders")
def test_each_render_of_a_job_has_its_own_deadline(tokenizer, monkeypatch):
    """A review: a job renders the template up to 3 times (the text, the token ids, the marked text: ``render_ids``)
    under one deadline for all of them, so a template of 0.7 s a render (legal: under the 2 s deadline) was refused
    once the marked render was added. Here the deadline is twice one render's CPU time: the job's three renders take
    more than it together, each less."""
    # about 0.3 s a render, from a sample long enough for /proc's 10 ms ticks (the CI run of c138504: a sample of
    # 20,000 sums counted as 0.01 s or less asked for a range past jinja's bound)
    sample = render_cpu_seconds(tokenizer, working(200_000))
    template = working(max(20_000, round(200_000 * 0.3 / max(sample, 0.01))))
    one = render_cpu_seconds(tokenizer, template)
    monkeypatch.setattr(template_sandbox, "MAX_RENDER_SECONDS", 2 * one)
    child = Child(tokenizer)
    assert child.render((QUESTION, template, GENERATION)) == render_ids(tokenizer, QUESTION, template, **GENERATION)
    assert one / 2 < child.render_seconds < 2 * one  # the longest render's, not the job's
    child.stop()


@pytest.mark.usefixtures("patient_renders")
def test_a_render_past_its_deadline_is_refused_whichever_of_the_job_it_is(tokenizer):
    """Endless on the marked render alone (its user text the marker, ``prompt_styles.marked``), quick on the two
    before it: refused at that render's deadline, the process stopped, as an endless first render is."""
    endless_when_marked = ("{% if 'user-message' in messages[-1].content %}" + ENDLESS.removesuffix("{{ messages }}")
                           + "{% endif %}" + working(0))
    child = Child(tokenizer)
    with pytest.raises(TemplateRefused, match=f"took more than {MAX_RENDER_SECONDS:g} s to render the messages"):
        child.render((QUESTION, endless_when_marked, GENERATION))
    assert not child.alive and child.process.returncode is not None


def test_a_template_past_the_memory_bound_is_refused_and_the_process_serves_on(tokenizer):
    child = Child(tokenizer)
    with pytest.raises(TemplateRefused, match="more than the 512 MiB memory bound of a render to render the messages"):
        child.render((QUESTION, HUGE, {"add_generation_prompt": True}))
    assert child.render((QUESTION, None, {"add_generation_prompt": True})) == \
        render_ids(tokenizer, QUESTION, None, add_generation_prompt=True)
    child.stop()


@pytest.mark.parametrize("flags", [GENERATION, {"continue_final_message": True}])  # a chat; /answer's chat styles
def test_a_template_whose_tokens_pass_the_memory_bound_is_refused_naming_it(tokenizer, monkeypatch, flags):
    """A review: a template of 5 MB of text, its tokens past the memory bound in the tokenizer's Rust code, whose
    failed allocation aborts the process (SIGABRT, not a MemoryError), was refused as "the chat template's process died
    trying to render the messages (SIGABRT)". The deadline is lengthened here: the abort comes after 1.2-1.9 s of CPU,
    and the deadline's refusal is another test's."""
    monkeypatch.setattr(template_sandbox, "MAX_RENDER_SECONDS", 60.0)
    child = Child(tokenizer)
    with pytest.raises(TemplateRefused, match=r"more than the 512 MiB memory bound of a render to render the messages "
                                              r"\(its process aborted on an allocation that failed: SIGABRT\)$"):
        child.render((QUESTION, HUGE_TOKENS, flags))
    assert not child.alive and child.process.returncode == -signal.SIGABRT


@pytest.mark.smollm2
def test_the_memory_bound_is_named_whatever_the_abort_writes_after_it(monkeypatch):
    """A review: with ``RUST_BACKTRACE=1`` in the server's environment, SmolLM2's tokenizer wrote a backtrace of ~16 KB
    after "memory allocation of N bytes failed", which fell out of the stderr tail read, and the template of 5 MB of
    text was refused as "the chat template's process died ... (SIGABRT)" again."""
    monkeypatch.setattr(template_sandbox, "MAX_RENDER_SECONDS", 60.0)
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    child = Child(AutoTokenizer.from_pretrained(resolve_base_dir("smollm2", Settings().cache_dir)))
    with pytest.raises(TemplateRefused, match=r"memory bound of a render to render the messages \(its process aborted "
                                              r"on an allocation that failed: SIGABRT\)$"):
        child.render((QUESTION, HUGE_TOKENS, GENERATION))


@pytest.mark.usefixtures("patient_renders")
def test_a_render_killed_at_its_deadline_near_the_memory_bound_says_how_near(tokenizer):
    """A render that holds most of the memory bound when its deadline kills it (the template of 5 MB of text on a
    busy machine: the deadline came before the bound, and said only "took more than 2 s") says how much it held."""
    holding = "{% set held = 'x' * (messages | length) * 150000000 %}" + ENDLESS  # 300 MB held
    child = Child(tokenizer)
    with pytest.raises(TemplateRefused, match=f"took more than {MAX_RENDER_SECONDS:g} s to render the messages "
                                              r"\(its process then 28\d MiB into the 512 MiB memory bound"):
        child.render((QUESTION, holding, GENERATION))


@pytest.mark.usefixtures("patient_renders")
def test_a_renderer_starts_a_new_process_for_the_next_render(tokenizer):
    renders = Renderer(tokenizer)
    for template in (ENDLESS, HUGE):
        with pytest.raises(TemplateRefused):
            renders.render((QUESTION, template, {"add_generation_prompt": True}))
        assert renders.render((QUESTION, None, {"add_generation_prompt": True})) == \
            render_ids(tokenizer, QUESTION, None, add_generation_prompt=True)


@pytest.mark.usefixtures("patient_renders")
def test_templates_take_turns_so_an_endless_one_holds_one_process_not_all(tokenizer):
    """A template known to run to the deadline, three jobs of it, then one of another: that one is rendered by the
    other process while the endless template's jobs wait their turn on one (they take 2 s each)."""
    renders = Renderer(tokenizer)
    with pytest.raises(TemplateRefused, match="more than"):
        renders.render((QUESTION, ENDLESS, {"add_generation_prompt": True}))
    assert renders.slow == {ENDLESS}
    endless = [renders.submit((QUESTION, ENDLESS, {"add_generation_prompt": True})) for _ in range(3)]
    normal = renders.submit((QUESTION, None, {"add_generation_prompt": True}))
    assert normal.result(timeout=120) == render_ids(tokenizer, QUESTION, None, add_generation_prompt=True)
    assert sum(future.done() for future in endless) <= 1  # the others still wait: one endless render at a time
    withdrawn = endless[2].cancel()  # a caller that gives up: its job is skipped, not rendered
    for future in endless[:2]:
        with pytest.raises(TemplateRefused, match="more than"):
            future.result(timeout=120)
    assert withdrawn and endless[2].cancelled()
    # the worker takes the withdrawn job off the queue, and counts its render ended, after the render's caller heard
    wait_for(lambda: not renders.waiting and not renders.running, "the withdrawn job skipped and no render counted")


@pytest.mark.usefixtures("patient_renders")
def test_a_slow_templates_renders_wait_in_a_bounded_queue_past_which_they_are_refused_at_once(tokenizer):
    """A review: the renders waiting for a template known to be slow piled up without bound, each client waiting 2 s
    per render ahead of it. Past ``MAX_SLOW_WAITING`` waiting, a render is refused at once (TemplateBacklog, a 429);
    a caller that gave up frees its place; other templates render meanwhile."""
    renders, job = Renderer(tokenizer), (QUESTION, ENDLESS, GENERATION)
    with pytest.raises(TemplateRefused, match="more than"):
        renders.render(job)
    running = renders.submit(job)
    wait_for(lambda: renders.running, "the slow render to begin")
    waiting = [renders.submit(job) for _ in range(MAX_SLOW_WAITING)]
    refused = renders.submit(job)
    assert refused.done() and isinstance(refused.exception(), TemplateBacklog), refused
    assert "slow" in str(refused.exception()) and not any(future.done() for future in waiting)
    ahead = math.ceil((MAX_SLOW_WAITING + 1) * MAX_JOB_SECONDS)  # the jobs waiting and the one running
    assert refused.exception().retry_after == ahead and f"retry in {ahead} s" in str(refused.exception())
    # a review: it said "4 renders ... wait" where 4 jobs of up to 4 renders each wait
    assert f"{MAX_SLOW_WAITING} prompts wait already" in str(refused.exception())
    assert f"the {MAX_SLOW_WAITING + 1} prompts ahead (waiting and rendering)" in str(refused.exception())
    assert waiting[-1].cancel() and not renders.submit(job).done()  # its place taken by the next
    assert renders.render((QUESTION, None, GENERATION)) == render_ids(tokenizer, QUESTION, None, **GENERATION)
    renders.close()
    with pytest.raises(TemplateRefused, match="more than"):
        running.result(timeout=30)


@pytest.mark.usefixtures("patient_renders")
@pytest.mark.parametrize("cheap", [True, False], ids=["cheap", "dear"])
def test_a_slow_template_whose_renders_are_then_cheap_is_slow_no_more(tokenizer, monkeypatch, cheap):
    """A review: a template that once ran to a render's bound was throttled (one render at a time, a bounded queue)
    until the server restarted. ``RECOVERY_RENDERS`` renders in a row that each ran within ``RECOVERED_SECONDS`` of
    CPU end its slowness (none does when that is below 0: "dear"); a render to a bound makes it slow again at once."""
    if not cheap:
        monkeypatch.setattr(template_sandbox, "RECOVERED_SECONDS", -1.0)
    renders, quick = Renderer(tokenizer), (QUESTION, SOMETIMES, GENERATION)
    with pytest.raises(TemplateRefused, match="more than"):
        renders.render((LOOP, SOMETIMES, GENERATION))
    assert renders.slow == {SOMETIMES}
    expected = render_ids(tokenizer, QUESTION, SOMETIMES, **GENERATION)
    for _ in range(RECOVERY_RENDERS - 1):
        assert renders.render(quick) == expected and renders.slow == {SOMETIMES}
    assert renders.render(quick) == expected
    assert renders.slow == (set() if cheap else {SOMETIMES})
    with pytest.raises(TemplateRefused, match="more than"):
        renders.render((LOOP, SOMETIMES, GENERATION))
    assert renders.slow == {SOMETIMES} and renders.render(quick) == expected and renders.slow == {SOMETIMES}
    renders.close()


def test_a_child_ends_when_the_server_is_killed_mid_render(tiny_tokenizer_dir, tmp_path):
    """A server killed (SIGKILL) while its child renders an endless template: the child ends within seconds, not
    after the render (which never ends)."""
    script = tmp_path / "server.py"
    script.write_text("import sys\n"
                      "from transformers import AutoTokenizer\n"
                      "from service.tasks.template_sandbox import Renderer\n"
                      f"renders = Renderer(AutoTokenizer.from_pretrained({str(tiny_tokenizer_dir)!r}))\n"
                      f"renders.submit(({QUESTION!r}, {ENDLESS!r}, {{'add_generation_prompt': True}}))\n"
                      "import time; time.sleep(300)\n")
    server = subprocess.Popen([sys.executable, str(script)])
    try:
        children = wait_for(lambda: child_pids(server.pid), "the server's render process to start")
    finally:
        server.kill()
        server.wait()
    # ended: gone, or a zombie where no init process reaps the orphans of this test's process tree
    wait_for(lambda: all(process_state(pid)[0] in ("", "Z") for pid in children), "its render process to end")


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def wait_for(condition, what: str, timeout: float = 60.0):
    """Poll ``condition`` until it returns something true (returned), or fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outcome := condition():
            return outcome
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout} s for {what}")


def test_a_script_without_a_main_guard_renders_once(tiny_tokenizer_dir, tmp_path):
    """The child is a new interpreter running the sandbox module, not multiprocessing's spawn, which runs the
    parent's main script again in the child (where this script would render again, and the start fail)."""
    script = tmp_path / "script.py"
    script.write_text("from transformers import AutoTokenizer\n"
                      "from service.tasks.template_sandbox import renderer\n"
                      f"tokenizer = AutoTokenizer.from_pretrained({str(tiny_tokenizer_dir)!r})\n"
                      f"job = ({QUESTION!r}, None, {{'add_generation_prompt': True}})\n"
                      "print('ids', len(renderer(tokenizer).render(job)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ids ") == 1, done.stdout


def rendering_children(monkeypatch) -> list[Child]:
    """The render processes that begin a render from now on (for the test), in order: the ones running already too.
    A child's ``in_render`` turns true once its render runs: the job sent and compiled, the server waits for the ids."""
    children, render, receive = [], Child.render, Child.receive

    def recorded(child: Child, job):
        child.in_render = False
        children.append(child)
        return render(child, job)

    def step(child: Child, seconds: float, what: str):
        child.in_render = what == "render the messages"
        return receive(child, seconds, what)

    monkeypatch.setattr(Child, "render", recorded)
    monkeypatch.setattr(Child, "receive", step)
    return children


def rendering(children: list[Child], which: int = 0) -> Child:
    """Child ``which`` of ``children`` once its render runs (not while the job is sent or compiled: a signal then
    meets another step)."""
    return wait_for(lambda: len(children) > which and children[which].in_render and children[which],
                    "a render to run")


@pytest.mark.parametrize("sent,error,said", [
    (signal.SIGKILL, RenderUnavailable, "killed by SIGKILL"),  # an operator's kill -9, the OOM killer
    (signal.SIGHUP, RenderUnavailable, "killed by SIGHUP"),  # SIGTERM and SIGINT it ignores: its server stops it
    (signal.SIGSEGV, TemplateRefused, r"died trying to render the messages \(SIGSEGV\)"),  # a crash of its own
    # an abort of its own, not on an allocation that failed (its stderr does not say so): not the memory bound's
    (signal.SIGABRT, TemplateRefused, r"died trying to render the messages \(SIGABRT\)")],
    ids=["SIGKILL", "SIGHUP", "SIGSEGV", "SIGABRT"])
def test_a_render_process_killed_from_outside_is_the_servers_trouble_not_the_templates(tokenizer, monkeypatch, sent,
                                                                                      error, said):
    """A process killed mid-render by a signal the sandbox did not send: a RenderUnavailable (a 503), not the
    template's refusal (a 422, as it was), the template not taken for a slow one, the next render served by a new
    process; a signal a process gets for its own doing (a fault) stays the template's."""
    children, renders = rendering_children(monkeypatch), Renderer(tokenizer)
    endless = renders.submit((QUESTION, ENDLESS, GENERATION))
    os.kill(rendering(children).process.pid, sent)
    with pytest.raises(error, match=said) as failed:
        endless.result(timeout=30)
    assert isinstance(failed.value, TemplateRefused) == (error is TemplateRefused)
    assert renders.slow == ({ENDLESS} if error is TemplateRefused else set())
    assert not children[0].alive
    assert renders.render((QUESTION, None, GENERATION)) == render_ids(tokenizer, QUESTION, None, **GENERATION)
    renders.close()


@pytest.mark.parametrize("step", ["compile", "render the messages"])
def test_a_render_process_frozen_from_outside_is_the_servers_trouble(tokenizer, monkeypatch, step):
    """A process stopped (SIGSTOP) before its job, or in its render: the step's wait ends as before (the compile's
    shortened here), but as a RenderUnavailable, and the process is killed; the compile took 10 s then a 422."""
    monkeypatch.setattr(template_sandbox, "COMPILE_SECONDS", 1.0)
    child = Child(tokenizer)
    if step == "compile":
        os.kill(child.process.pid, signal.SIGSTOP)
    else:  # once compiled, as the server begins to wait for the render (a timer could stop it before it compiled)
        receive = Child.receive

        def stopped(waiting: Child, seconds: float, what: str):
            if what == step:
                os.kill(waiting.process.pid, signal.SIGSTOP)
            return receive(waiting, seconds, what)

        monkeypatch.setattr(Child, "receive", stopped)
    with pytest.raises(RenderUnavailable, match=f"got .* s of CPU in the .* s it had to {step}"):
        child.render((QUESTION, ENDLESS, GENERATION))
    assert not child.alive and child.process.returncode == -signal.SIGKILL


def test_a_render_process_stopped_while_idle_is_replaced_before_the_next_render(tokenizer, monkeypatch):
    """A review: a render process stopped (SIGSTOP) between renders cost the next chat the compile step's whole wait,
    then a 503; its worker now sees it stopped, kills it and renders in a new one."""
    monkeypatch.setattr(template_sandbox, "COMPILE_SECONDS", 120.0)
    children, renders = rendering_children(monkeypatch), Renderer(tokenizer)
    expected = render_ids(tokenizer, QUESTION, None, **GENERATION)
    assert renders.render((QUESTION, None, GENERATION)) == expected
    os.kill(children[0].process.pid, signal.SIGSTOP)
    wait_for(lambda: template_sandbox.process_state(children[0].process.pid)[0] in ("T", "t"), "the stop")
    assert renders.submit((QUESTION, None, GENERATION)).result(timeout=60) == expected
    assert children[1] is not children[0] and children[0].process.returncode == -signal.SIGKILL
    renders.close()


def test_a_render_process_starved_for_a_while_renders_as_it_would_have(tokenizer, monkeypatch):
    """The deadlines count the process's CPU time: a process that waited for a core (here stopped for twice the
    compile step's deadline, then continued) renders as it would have; on the wall clock the wait was charged to the
    step (a review: a template that renders in 0.15 s was refused, "took more than 2 s", beside a busy engine)."""
    monkeypatch.setattr(template_sandbox, "COMPILE_SECONDS", 1.0)
    child = Child(tokenizer)
    os.kill(child.process.pid, signal.SIGSTOP)
    threading.Timer(2.0, os.kill, (child.process.pid, signal.SIGCONT)).start()
    assert child.render((QUESTION, None, GENERATION)) == render_ids(tokenizer, QUESTION, None, **GENERATION)
    assert child.alive
    child.stop()


def test_a_render_process_dead_since_its_last_render_is_the_servers_trouble(tokenizer):
    child = Child(tokenizer)
    child.process.kill()
    child.process.wait()
    with pytest.raises(RenderUnavailable, match="not the template's doing"):
        child.render((QUESTION, None, GENERATION))


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
def test_a_render_process_that_fails_to_start_is_the_servers_trouble(tokenizer, monkeypatch, executable):
    """No process (Popen's OSError: it was raised as it was, a 500) or one that dies starting: RenderUnavailable."""
    renders = Renderer(tokenizer)
    monkeypatch.setattr(template_sandbox.sys, "executable", executable)
    with pytest.raises(RenderUnavailable, match=r"could not start|failed to start"):
        renders.render((QUESTION, None, GENERATION))
    monkeypatch.undo()
    assert renders.slow == set()
    assert renders.render((QUESTION, None, GENERATION)) == render_ids(tokenizer, QUESTION, None, **GENERATION)
    renders.close()


@pytest.mark.usefixtures("patient_renders")
def test_closing_fails_the_renders_not_begun_at_once_and_ends_the_processes(tokenizer, monkeypatch):
    """A backlog of an endless template's renders (2 s each, one at a time: it is slow), then close (the server
    shuts down): the queued ones fail at once with EngineStopped, as a render submitted later does; the one running
    ends at its deadline (2 s of CPU: ``result``'s 30 s bound its wall time, not a tighter one, as a loaded machine
    gives it a fraction of a core; 7.4 s under two pytest workers), and every process ends."""
    children, renders = rendering_children(monkeypatch), Renderer(tokenizer)
    with pytest.raises(TemplateRefused):
        renders.render((QUESTION, ENDLESS, GENERATION))
    backlog = [renders.submit((QUESTION, ENDLESS, GENERATION))]
    rendering(children, 1)  # its process started (seconds on a busy machine): the time bound below is the render's
    backlog += [renders.submit((QUESTION, ENDLESS, GENERATION)) for _ in range(MAX_SLOW_WAITING)]
    renders.close()
    assert sum(future.done() for future in backlog) == len(backlog) - 1  # all but the one running
    for future in backlog:
        with pytest.raises((EngineStopped, TemplateRefused)):
            future.result(timeout=30)
    assert sum(isinstance(future.exception(), EngineStopped) for future in backlog) == len(backlog) - 1
    assert "shutting down" in str(backlog[-1].exception())
    with pytest.raises(EngineStopped, match="shutting down"):
        renders.render((QUESTION, None, GENERATION))
    wait_for(lambda: renders.workers == 0 and not any(child.alive for child in children), "the processes to end")


def test_the_runtimes_stop_closes_its_renders(tiny_tokenizer_dir):
    runtime, tokenizer = Runtime(Settings()), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # a renderer its own
    runtime.tasks = SimpleNamespace(tokenizer=tokenizer)  # the model unloaded: no engine to stop
    runtime.stop()
    with pytest.raises(EngineStopped, match="shutting down"):
        renderer(tokenizer).render((QUESTION, None, GENERATION))


def test_the_servers_shutdown_fails_the_renders_not_begun_before_it_waits_for_the_requests(monkeypatch):
    """uvicorn's shutdown waits for the requests in flight: the renders not begun fail first, or a request waits for
    every render queued before its own (a review: 86 s for a hostile template's backlog)."""
    steps = []

    async def uvicorns(server, sockets=None):
        steps.append("uvicorn's shutdown")

    monkeypatch.setattr(uvicorn.Server, "shutdown", uvicorns)
    runtime = SimpleNamespace(stop_rendering=lambda: steps.append("renders closed"))
    server = DrainingServer(uvicorn.Config(app=None), runtime, 0)
    server.servers = []  # what uvicorn's startup, always run before its shutdown, leaves when it listens on nothing
    asyncio.run(server.shutdown())
    assert steps == ["renders closed", "uvicorn's shutdown"]
