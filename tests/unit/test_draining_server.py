"""serve's uvicorn server (``service.http.server.DrainingServer``): where it drains on a stop, the line saying where it
listens."""
from __future__ import annotations

import asyncio
import logging
import signal
from types import SimpleNamespace

import pytest
import uvicorn

from service.http import server as server_module
from service.http.listening import listening_sockets
from service.http.server import DrainingServer
from service.runtime import Runtime
from service.settings import Settings

GRACE = 3600.0  # seconds: a drain that would outlast the test


async def app(scope, receive, send):  # an ASGI app that is never called: the tests serve no request
    raise AssertionError("no request is served")


def server(ready: bool) -> DrainingServer:
    runtime = Runtime(Settings(admin_key=None))
    if ready:
        runtime.ready.set()
    return DrainingServer(uvicorn.Config(app, log_config=None), runtime, GRACE)


def test_a_stop_of_a_serving_server_drains_first(monkeypatch):
    timers = []
    unstarted = lambda *timer: SimpleNamespace(start=lambda: timers.append(timer))  # noqa: E731 (a timer never due)
    monkeypatch.setattr(server_module.threading, "Timer", unstarted)
    drained = server(ready=True)
    drained.handle_exit(signal.SIGTERM, None)
    assert drained.rt.draining and not drained.should_exit  # /ready false for GRACE seconds first
    assert timers == [(GRACE, drained._shut_down)]


@pytest.mark.parametrize(("second", "forced"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["then-TERM", "then-INT"])
@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_ctrl_c_while_a_server_drains_stops_it_without_waiting_for_its_requests(first, second, forced, monkeypatch):
    """A second SIGTERM ends the drain, the requests in flight finished; a Ctrl-C after the first stop forces the exit
    (uvicorn's ``force_exit``) whenever it comes: within the drain (its timer not due) it did not (a review)."""
    monkeypatch.setattr(server_module.threading, "Timer", lambda *timer: SimpleNamespace(start=lambda: None))
    drained = server(ready=True)
    drained.handle_exit(first, None)
    drained.handle_exit(second, None)
    assert drained.should_exit and drained.force_exit == forced


@pytest.mark.parametrize("failed", [False, True], ids=["loading", "failed"])
def test_a_stop_of_a_server_that_serves_nothing_yet_ends_it_at_once(failed):
    """A review: SIGTERM while the model loaded drained for --drain-seconds all the same, with nothing in flight and
    /ready false already (a part of serve's 10-30 s to end, past a container runtime's 10 s grace)."""
    stopped = server(ready=False)
    stopped.rt.start_failure = "ValueError: x" if failed else None
    stopped.handle_exit(signal.SIGTERM, None)
    assert stopped.rt.draining and stopped.should_exit


def test_the_server_says_where_it_listens_without_uvicorns_private_line(monkeypatch, caplog):
    """serve logged uvicorn's line through its private ``Server._log_started_message``: an uvicorn without it (or
    with another signature) would fail every start. Here that method is gone."""
    monkeypatch.delattr(uvicorn.Server, "_log_started_message")
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    sockets = listening_sockets("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    started = server(ready=True)
    started.config.lifespan = "off"
    started.config.load()  # as uvicorn's serve does before its startup
    started.lifespan = started.config.lifespan_class(started.config)

    async def start_and_stop():
        await started.startup(sockets)
        await uvicorn.Server.shutdown(started, sockets)

    try:
        asyncio.run(start_and_stop())
    finally:
        for sock in sockets:
            sock.close()
    assert f"Serving on http://127.0.0.1:{port} (Press CTRL+C to quit)" in caplog.messages
