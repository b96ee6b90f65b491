"""The plain side of a load test's users, shared by their greenlets: ``Traffic`` sends the answer key's requests and
grades every reply, ``Churn`` unregisters an adapter and registers it again on every tick, and ``Absences`` keeps
when each adapter was away (a 404 then may stand in for an answer). ``users`` wraps them in locust users."""
from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.checked.answer_key import FINE, AnswerKey, verdict
from loadtest.checked.asks import answer_of
from loadtest.checked.report import Record


@dataclass
class Absences:
    """When each adapter was unregistered: per name, windows [from the DELETE sent, to the POST that registered it
    again answered] (the end None while it is away)."""

    windows: dict[str, list[list[float | None]]] = field(default_factory=dict)

    def start(self, name: str, at: float) -> None:
        self.windows.setdefault(name, []).append([at, None])

    def end(self, name: str, at: float) -> None:
        self.windows[name][-1][1] = at

    def overlaps(self, name: str, begin: float, end: float) -> bool:
        """Whether ``name`` was away at some moment of [``begin``, ``end``] (``time.perf_counter`` seconds)."""
        return any(start <= end and (stop is None or stop >= begin) for start, stop in self.windows.get(name, ()))


@dataclass
class Traffic:
    """Sends random requests of ``key`` to adapters drawn with ``weights`` (in ``key.adapters``' order), with
    ``headers`` (the API key, if any), and keeps a ``Record`` of each; ``absences`` tells a 404 that may stand in
    for an answer."""

    key: AnswerKey
    weights: Sequence[float]
    headers: dict[str, str]
    absences: Absences
    records: list[Record] = field(default_factory=list)

    def send(self, client) -> None:
        """One request through ``client`` (a locust FastHttpSession), graded; locust counts it a failure unless
        its outcome is fine (``answer_key.FINE``)."""
        adapter = random.choices(self.key.adapters, self.weights)[0]
        index = random.randrange(len(self.key.asks))
        ask = self.key.asks[index]
        begin = time.perf_counter()
        with client.post(ask.endpoint, json=ask.body(adapter), headers=self.headers, name=ask.endpoint,
                         catch_response=True) as reply:
            end = time.perf_counter()
            body = parsed(reply.text) if reply.status_code == 200 else None
            retry_after = reply.headers is not None and "retry-after" in reply.headers
            outcome = verdict(self.key, adapter, index, reply.status_code, retry_after, body,
                              self.absences.overlaps(adapter, begin, end))
            if outcome in FINE:
                reply.success()
            else:
                reply.failure(outcome)
            self.records.append(Record(ask.endpoint, adapter, index, reply.status_code, outcome,
                                       reply.request_meta["response_time"],
                                       None if outcome in FINE else what_came(ask.endpoint, body, reply.text)))


def what_came(endpoint: str, body: dict | None, text: str | None) -> dict | str:
    """A reply that was not right, for the report: its answer (``asks.answer_of``), else its text (cut short)."""
    try:
        return answer_of(endpoint, body)
    except (KeyError, IndexError, TypeError):
        return (text or "")[:200]


def parsed(text: str | None) -> dict | None:
    """The JSON object ``text`` holds, or None."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Churn:
    """Every tick: registers again the adapter it unregistered at the last tick, then unregisters the next one of
    ``folders`` (name -> folder, taken in turn), noting the windows in ``absences``. ``calls`` counts its admin calls
    by (action, status)."""

    folders: dict[str, Path]
    headers: dict[str, str]
    absences: Absences
    away: str | None = None
    calls: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(self.folders)

    def tick(self, client) -> None:
        """Register the adapter away, unregister the next, through ``client`` (a locust FastHttpSession)."""
        if self.away is not None:
            name = self.away
            status = self._call(client, "POST", "/adapters", "register", json={"name": name,
                                                                                "path": str(self.folders[name])})
            if status == 201:
                self.absences.end(name, time.perf_counter())
                self.away = None
        if self.away is None:
            name = next(self._turn)
            self.absences.start(name, time.perf_counter())
            status = self._call(client, "DELETE", f"/adapters/{name}", "unregister")
            if status == 200:
                self.away = name
            else:
                self.absences.end(name, time.perf_counter())

    def _call(self, client, method: str, path: str, action: str, **kwargs) -> int:
        with client.request(method, path, name=f"admin {action}", headers=self.headers, catch_response=True,
                            **kwargs) as reply:
            key = f"{action} {reply.status_code}"
            self.calls[key] = self.calls.get(key, 0) + 1
            return reply.status_code


def sent_alone(http: httpx.Client, key: AnswerKey, adapter: str, index: int) -> Record:
    """Request ``index`` of the answer key sent to ``adapter`` through ``http``, alone (nothing else in flight from
    here), graded: it must get its right answer; what came, where it was not (``Record.got``), as under load."""
    ask = key.asks[index]
    begin = time.perf_counter()
    try:
        reply = http.post(ask.endpoint, json=ask.body(adapter))
    except httpx.TransportError:  # no reply within the timeout, or none at all
        status, retry_after, body, text = 0, False, None, ""
    else:
        status, retry_after, text = reply.status_code, "retry-after" in reply.headers, reply.text
        body = parsed(text) if status == 200 else None
    outcome = verdict(key, adapter, index, status, retry_after, body, False)
    return Record(ask.endpoint, adapter, index, status, outcome, (time.perf_counter() - begin) * 1000,
                  None if outcome in FINE else what_came(ask.endpoint, body, text))
