"""JSON read so that each object names each key once.

RFC 8259 (section 4) says the names within an object SHOULD be unique, and that where they are not, what a reader
makes of the object is unpredictable: Python's parser keeps the last value, others the first. Every JSON loraswap
reads from outside (request bodies, adapter configs, safetensors headers, cards, tokenizer configs) is read here, so
that ``{"adapter": "squad", "adapter": "nli"}`` or a config naming ``lora_alpha`` twice is refused, never served with
one of its values picked silently; and so that an integer of more digits than Python converts is read as a number
past any bound (``PAST_ANY_BOUND``), which a reader refuses where it lies, not as text that is not JSON.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any


class RepeatedKey(ValueError):
    """A JSON object names a key more than once."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: the object, or RepeatedKey naming a key it holds twice (as the key
    reads once decoded: ``"a"`` and ``"\\u0061"`` are one key)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        key, times = Counter(key for key, _ in pairs).most_common(1)[0]
        raise RepeatedKey(f"the key {json.dumps(key)[:200]} appears {times} times in one object (JSON names within an "
                          "object must be unique: which value counts is not defined, RFC 8259 section 4)")
    return found


# what an integer of more digits than Python converts (``sys.get_int_max_str_digits()``, 4,300 by default: a guard
# against converting such text, which takes time quadratic in its length) is read as, of its sign: the largest integer
# of as many digits as Python converts, past any bound a reader sets, so that it is refused as too large or too small
# where it lies, as ``2**70`` is. A plain int: a subclass of int (to keep the text) was read as an object by pydantic's
# ``from_attributes``, which FastAPI's body validation sets (a review: ``"decoding": 99...9`` was served as ``{}``)
PAST_ANY_BOUND = 10 ** sys.get_int_max_str_digits() - 1


def integer(text: str) -> int:
    """``json.loads``' ``parse_int``: the integer ``text`` spells, or ``PAST_ANY_BOUND`` of its sign where it has
    more digits than Python converts (``int`` refuses them at once, by their count)."""
    try:
        return int(text)
    except ValueError:
        return -PAST_ANY_BOUND if text.startswith("-") else PAST_ANY_BOUND


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads(text)`` (bytes in UTF-8, UTF-16 or UTF-32), refusing a key named twice in one object: RepeatedKey,
    json.JSONDecodeError for text that is not JSON (both ValueErrors), UnicodeDecodeError, RecursionError when nested
    too deeply. An integer of more digits than Python converts is ``PAST_ANY_BOUND`` of its sign."""
    return json.loads(text, object_pairs_hook=unique_keys, parse_int=integer)
