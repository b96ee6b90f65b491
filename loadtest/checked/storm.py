"""The disconnect storm of the ``soak`` scenario: clients that send a request and hang up at a random point of it.

Each storm request goes out on a socket of its own (plain HTTP/1.1, so that the client decides to the byte when it
leaves) and is cut in one of three ways: while its body is still being sent, after it was sent and before a random
moment (up to ``hang_up_s``) whatever came by then, or once a streamed completion's first event arrived. Nothing is
asked of the server but that it stays well: a status line that arrives before the hang-up is noted, and a 5xx is a
failure. ``Storm`` is the plain side, shared by the storm users' greenlets (``users.storm_user``)."""
from __future__ import annotations

import json
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loadtest.checked.asks import Ask

SENDING, WAITING, STREAMING = "while sending", "before the reply", "mid-stream"
PHASES = (SENDING, WAITING, STREAMING)


@dataclass
class Storm:
    """Sends ``asks`` (to ``adapters`` at random) to the server at ``host`` (http://HOST:PORT) with ``headers``, each
    cut at a random point. ``hang_ups`` counts the requests by the phase they were cut in; ``statuses`` the status
    lines that came before the hang-up (``answered``: a whole reply came first); ``errors`` connections the server
    refused or reset before the request was out."""

    host: str
    asks: list[Ask]
    adapters: list[str]
    headers: dict[str, str]
    hang_up_s: float = 2.0
    hang_ups: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def send(self) -> None:
        """One request, cut in a phase drawn at random."""
        phase = random.choice(PHASES)
        streams = [ask for ask in self.asks if ask.endpoint == "/v1/completions"]
        ask = random.choice(streams if phase == STREAMING and streams else self.asks)
        body = {**ask.body(random.choice(self.adapters)), **({"stream": True} if phase == STREAMING else {})}
        request = http_request(self.host, ask.endpoint, self.headers, json.dumps(body).encode())
        address = urlsplit(self.host)
        try:
            with socket.create_connection((address.hostname, address.port or 80), timeout=self.hang_up_s) as conn:
                received = self._cut(conn, phase, request)
        except OSError as exc:  # refused, reset before the request was out, or a timeout while connecting
            self.errors[type(exc).__name__] += 1
            return
        self.hang_ups[phase] += 1
        if received.startswith(b"HTTP/1.1 "):
            self.statuses[received[9:12].decode(errors="replace")] += 1

    def _cut(self, conn: socket.socket, phase: str, request: bytes) -> bytes:
        """Send ``request`` on ``conn`` and leave as ``phase`` says; returns what came before leaving."""
        if phase == SENDING:
            conn.sendall(request[: random.randrange(1, len(request))])
            return b""
        conn.sendall(request)
        conn.settimeout(random.uniform(0, self.hang_up_s) if phase == WAITING else self.hang_up_s)
        received = b""
        try:
            while chunk := conn.recv(4096):
                received += chunk
                if phase == WAITING or b"data: " in received:  # the first bytes, or the first event: leave
                    break
        except OSError:  # the random moment came (a timeout), or the server closed first
            pass
        return received

    def report(self) -> dict:
        """The storm's figures: requests cut by phase, status lines seen before the cut, refused connections, and
        ``server_errors`` (5xx seen), a failure."""
        return {"hang_ups": dict(self.hang_ups), "statuses_seen": dict(self.statuses),
                "connection_errors": dict(self.errors),
                "server_errors": sum(n for status, n in self.statuses.items() if status.startswith("5"))}


def http_request(host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The bytes of an HTTP/1.1 POST of the JSON ``body`` to ``path`` on ``host``, closing the connection after."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {urlsplit(host).netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
