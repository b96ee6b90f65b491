"""A channel from the engine thread to one asyncio consumer: items in order, without blocking the engine.

The engine thread (or any thread) ``put``s items; the consumer, on its event loop, ``take``s everything put since
its last take. A put wakes the consumer's loop only when nothing is waiting to be taken already, so a consumer that
falls behind costs the engine thread one wake-up, not one per token.
"""
from __future__ import annotations

import asyncio
import threading


class TokenFeed:
    """Items put from any thread, taken in order by one coroutine on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._ready = asyncio.Event()  # set on the loop once items wait
        self._woken = False  # a wake-up is scheduled or done and not yet consumed by a take
        self._closed = False

    def put(self, item) -> None:
        """Append ``item`` (never blocks); dropped once the feed is closed. Raises RuntimeError if the consumer's loop
        is closed while the feed is not (its consumer is gone without closing it)."""
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            if self._woken:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._ready.set)

    def close(self) -> None:
        """Drop what waits and every item put from now on (the consumer takes no more)."""
        with self._lock:
            self._closed = True
            self._items = []

    async def take(self) -> list:
        """Every item put since the last take, oldest first (at least one): waits until there is one."""
        while True:
            await self._ready.wait()
            with self._lock:
                self._ready.clear()
                self._woken = False
                items, self._items = self._items, []
            if items:
                return items
