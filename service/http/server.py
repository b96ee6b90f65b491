"""Run the app under uvicorn; on SIGTERM, /ready turns false first, then in-flight requests finish (those whose chat
template render has not begun by then fail at once, a 503)."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn

from service.http.app import create_app
from service.model.base_model import remove_partials
from service.runtime import Runtime, log_start_cut
from service.settings import Settings, worded

# seconds the stop gives connections the kernel has accepted to reach the app (``DrainingServer.stop_listening``)
ACCEPTED_WAIT_S = 0.25
CUT_SHORT_WAIT_S = 1.0  # seconds a forced stop waits for the requests it cut short to end (``cut_short``)
# seconds a connection whose reply began before the drain stays open after it for its client's next request
# (``DrainingServer.keep_for_next_request``); how often the end of such a reply is looked for
NEXT_REQUEST_WAIT_S, REPLY_END_POLL_S = 1.0, 0.05


class DrainingServer(uvicorn.Server):
    """A uvicorn server that marks the service as draining for a grace period before shutting down."""

    def __init__(self, config: uvicorn.Config, rt: Runtime, grace_seconds: float):
        super().__init__(config)
        self.rt, self.grace_seconds = rt, grace_seconds
        # ``keep_for_next_request``'s tasks, each closing one connection kept: held here, as the event loop holds a
        # task weakly (asyncio.create_task's documentation)
        self.kept: list[asyncio.Task] = []

    def handle_exit(self, sig, frame) -> None:
        """On SIGTERM or SIGINT, drain for ``grace_seconds`` (/ready false, in-flight requests finish) while the
        service accepts work; at once where it does not yet (still loading, or failed to start): no request is in
        flight, and /ready is false already. A second SIGTERM: stop now, the requests in flight finished (``timeout``
        signals the process group too: its SIGTERM comes twice). A Ctrl-C after the first signal, whenever it comes:
        stop now without waiting for them, as uvicorn's second Ctrl-C (``cut_short``); within the drain it waited
        for them all the same (a review: SIGTERM, then Ctrl-C 0.3 s later). Neither is raised again once the server
        has stopped, as uvicorn's handler has it (a review: SIGTERM twice ended a server with a second line after
        uvicorn's last, 'loraswap serve: stopped', from the SIGTERM raised again)."""
        if self.rt.draining:
            self.force_exit = self.force_exit or sig == signal.SIGINT
            return self._shut_down()
        serving = self.rt.accepting
        self.rt.drain()
        if serving:
            threading.Timer(self.grace_seconds, self._shut_down).start()
        else:
            self._shut_down()

    def _shut_down(self) -> None:
        # set the flag rather than calling super().handle_exit: uvicorn re-raises the signals that went through
        # it after a graceful shutdown, which would end a drained server by SIGTERM instead of with status 0
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        """uvicorn's startup, then a line saying where it listens (``serving_line``), which uvicorn logs only for
        sockets it bound itself (its own line is private: ``Server._log_started_message``)."""
        await super().startup(sockets)
        if sockets is not None and not self.should_exit:
            logging.getLogger("uvicorn.error").info(serving_line(sockets))

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown (stop listening, wait for the requests in flight, then the lifespan's end), the chat
        template renders not begun failed first (``Runtime.stop_rendering``): the requests waiting for them end at once
        with a 503, not after the renders queued before them (a hostile template's backlog took 2 s a render: 86 s).
        A forced stop (``force_exit``) waits for no request and skips the lifespan's end; the requests still in flight
        are then cut short (``cut_short``)."""
        self.rt.stop_rendering()
        if not self.force_exit:
            await self.stop_listening(sockets or [])
            self.keep_for_next_request()
        await super().shutdown(sockets)
        if self.force_exit:
            await self.cut_short()

    async def stop_listening(self, sockets: list[socket.socket]) -> None:
        """Stop taking connections without dropping a request sent on one already made: the listening ``sockets``'
        backlog goes to 0 (the kernel completes no more handshakes: a client's connection is refused once they close,
        so it knows its request was not taken), the connections the kernel completed are accepted and their requests
        read (each answered as the drain answers, its connection then closed: ``app.CloseWhileDraining``), then the
        sockets close, and the requests on connections accepted meanwhile are read too, ``ACCEPTED_WAIT_S`` each.
        uvicorn's shutdown closed the sockets at once, resetting the connections in their backlog, and closed every
        connection whose request it had not read yet: with 16 clients on connections kept alive, 2-15 requests lost
        with no reply at the drain's end (a connection reset, or a disconnect without a response) in 5 runs of 5,
        none in 5 since (docs/results/drain_keepalive/runs.md)."""
        for sock in sockets:
            sock.listen(0)
        await asyncio.sleep(ACCEPTED_WAIT_S)
        for server in self.servers:
            server.close()
        await asyncio.sleep(ACCEPTED_WAIT_S)

    def keep_for_next_request(self) -> None:
        """Keep open, after its reply, each connection whose reply began before the drain and is still being sent (a
        stream's): its headers said nothing of closing, so its client sends its next request on it, and that request
        is read and answered as the drain answers (a 503, ``Connection: close``). ``NEXT_REQUEST_WAIT_S`` after the
        reply's end the connection is shut down as uvicorn's shutdown would have at once (``close_after_its_reply``):
        closed where no request is being answered (none came, or one came only in part: a client cannot hold the
        exit by sending slowly), else after that request's reply. uvicorn's shutdown closed it as the reply ended, and
        the next request met a reset with no reply (a review: 1-4 such losses in each of 3 runs of 40 clients).
        Each connection's ``shutdown`` (uvicorn's) is made a no-op meanwhile: uvicorn's own shutdown waits for it."""
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)  # uvicorn's HTTP protocols' request in progress
            if cycle is not None and cycle.response_started and not cycle.response_complete and cycle.keep_alive:
                self.kept.append(asyncio.create_task(close_after_its_reply(connection, cycle, connection.shutdown)))
                connection.shutdown = lambda: None

    async def cut_short(self) -> None:
        """End the requests in flight at a forced stop while the event loop runs: a reply begun (a stream's) has its
        connection closed, so that its client sees it cut; every request's task is cancelled, and one whose reply had
        not begun is answered with a 503 (``app.CutShort``); each is waited for ``CUT_SHORT_WAIT_S`` at most. uvicorn
        left them to ``asyncio.run``'s end, which cancelled them after the server's last line: each client got a
        plain-text 500 and the log a traceback (a review: Ctrl-C twice during /answer and /v1/completions)."""
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)  # the request uvicorn's HTTP protocols have in progress
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                connection.transport.abort()
        tasks = list(self.server_state.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CUT_SHORT_WAIT_S)


async def close_after_its_reply(connection, cycle, shutdown: Callable[[], None]) -> None:
    """Once ``cycle`` (a uvicorn request cycle of ``connection``) has sent its whole reply, wait
    ``NEXT_REQUEST_WAIT_S``, then call ``shutdown``, the connection's own (uvicorn's): it closes the connection unless
    a request is being answered there, which it lets end first."""
    while not cycle.response_complete and not connection.transport.is_closing():
        await asyncio.sleep(REPLY_END_POLL_S)
    await asyncio.sleep(NEXT_REQUEST_WAIT_S)
    shutdown()


def serving_line(sockets: list[socket.socket]) -> str:
    """The line saying where the server listens: ``Serving on http://127.0.0.1:8000`` (an IPv6 address in brackets,
    each socket's address, one ``listening.listening_sockets`` took for each address of the host)."""
    urls = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        urls.append(f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}")
    return f"Serving on {', '.join(urls)} (Press CTRL+C to quit)"


def serve(settings: Settings, named: Callable[[str], str] = worded, sockets: list[socket.socket] | None = None,
          checked: bool = False) -> None:
    """Run the HTTP service with ``settings`` until it is stopped; ``named`` and ``checked`` as ``Runtime`` takes
    them. ``sockets``: the listening sockets to serve on (``listening.listening_sockets``, taken before the model
    loads, so that a port in use is found at once); None: uvicorn binds ``settings.host``:``settings.port`` once the
    app has started. Where a stop leaves the start running a step it cannot cut (``Runtime.still_starting``), the
    start is said to be cut short and its conversion's partial folder removed (``base_model.remove_partials``): the
    caller ends the process without waiting for the step (``server_process.end``; the interpreter's end would join its
    thread: 30-60 s of a conversion)."""
    rt = Runtime(settings, named, checked)
    config = uvicorn.Config(create_app(rt=rt), host=settings.host, port=settings.port, log_level="info")
    try:
        DrainingServer(config, rt, settings.drain_seconds).run(sockets)
    finally:
        if rt.still_starting:
            log_start_cut()
            remove_partials()
