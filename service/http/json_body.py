"""Request bodies read as JSON whose objects name each key once.

RFC 8259 (section 4) says the names within an object SHOULD be unique, and that where they are not, what a reader
makes of the object is unpredictable: Python's parser keeps the last value, others the first. A body such as
``{"adapter": "squad", "adapter": "nli"}`` is therefore refused (400 naming the key), never served with one of its
values picked silently.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: the object, or ValueError naming a key it holds twice (as the key
    reads once decoded: ``"a"`` and ``"\\u0061"`` are one key)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        key, times = Counter(key for key, _ in pairs).most_common(1)[0]
        raise ValueError(f"the key {json.dumps(key)[:200]} appears {times} times in one object (JSON names within an "
                         "object must be unique: which value counts is not defined, RFC 8259 section 4)")
    return found


class UniqueKeysRequest(Request):
    async def json(self) -> Any:
        """The body read as JSON (UTF-8, UTF-16 or UTF-32, as ``json.loads`` reads bytes); ValueError for an object
        that holds a key twice (``unique_keys``), json.JSONDecodeError for text that is not JSON."""
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class UniqueKeysRoute(APIRoute):
    """A FastAPI route whose JSON body is read by ``UniqueKeysRequest`` (FastAPI's "custom Request and APIRoute
    class" pattern). FastAPI answers its ValueError as a 400 (``app.add_error_handlers`` keeps the reason)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def unique_keys_handler(request: Request) -> Response:
            return await handler(UniqueKeysRequest(request.scope, request.receive))

        return unique_keys_handler
