"""Prefix caching: the keys and values of prompt prefixes, kept and reused by later prompts that begin the same way.

Questions about one document share the start of their prompt ("Context: <paragraph>\\nQuestion: ..."). As in vLLM's
automatic prefix caching, prompts are cut into blocks of ``block_tokens`` tokens (the last one may be shorter); a
block's keys and values depend on its tokens, on every token before it and on the weights, so a block is found by its
parent (the block before it) and its own tokens, and a first block by the weights (``weights_key``: the adapter's
identity, never its name). Where vLLM chains hashes, the key here holds the parent's serial number and the tokens
themselves: two different prefixes never share a key. A prompt reuses the longest run of cached whole blocks that
begins it, short of its last token (its prefill must compute that token's logits), and then the first tokens of the
block after that run which it shares with a cached block of the same parent: the keys and values of a block's first k
tokens depend only on those tokens and the ones before them. So, as in SGLang's radix cache, a question reuses its
context up to the last token in common, not to the last whole block (16 tokens by default), and a prompt asked again
all but its last token.

The blocks take ``max_bytes`` at most, the least recently used dropped first; those of adapter weights unregistered
are dropped once the engine learns of it (``purge``). Every use touches a chain from its last block to its first, so a
block is always more recently used than the blocks after it: eviction takes the tails of chains first and never leaves
a block whose parent is gone.
"""
from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from service import metrics
from service.lora.adapter_files import AdapterWeights

WeightsKey = tuple[int, bool]  # (the adapter's serial, 0 for the bare base; whether it is merged into the base)


def weights_key(adapter: AdapterWeights | None, merged: AdapterWeights | None) -> WeightsKey:
    """What computed a row's keys and values: its adapter's weights (by ``serial``: weights registered again under
    the same name are other weights; None, the bare base) and whether they were merged into the base (``merged``: the
    registry's merged weights). Keys and values computed with the adapter merged agree with those computed through
    its slot only to rounding (the merged weights are rounded sums), so the two are kept apart: a cached block is
    only reused by rows that take the same arithmetic path as the one that computed it."""
    return (0 if adapter is None else adapter.serial, adapter is not None and adapter is merged)


@dataclass(eq=False)
class Block:
    """One cached block: its key in the cache, its serial (its children's parent) and its keys and values."""

    key: tuple[WeightsKey | int, tuple[int, ...]]  # (parent: its weights if first, else its serial; its tokens)
    serial: int
    kv: torch.Tensor  # [layers, 2 (keys, values), kv heads, block tokens, head dim]


class PrefixCache:
    """Blocks of prompt keys and values by (parent, tokens), least recently used first, in ``max_bytes`` at most
    (0: off, nothing is looked up or kept). Used by the engine thread only."""

    def __init__(self, block_tokens: int, max_bytes: int):
        self.block_tokens, self.max_bytes = block_tokens, max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[tuple, Block] = OrderedDict()
        self._children: dict[WeightsKey | int, dict[tuple, None]] = {}  # parent -> its blocks' keys, oldest first
        self._serials = itertools.count()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, weights: WeightsKey, prompt: list[int]) -> torch.Tensor | None:
        """The keys and values [layers, 2, kv heads, tokens, head dim] of the longest cached prefix of ``prompt`` (its
        last token left out) for ``weights``: a run of whole blocks, then the first tokens of the cached block after it
        that shares the most; None if no token is cached. Counted in the metrics."""
        if not self.enabled:
            return None
        most = len(prompt) - 1  # tokens the cache may supply: the last one runs
        chain = self._cached(weights, prompt, most // self.block_tokens)
        start = len(chain) * self.block_tokens
        partial, shared = self._partial(chain[-1].serial if chain else weights, prompt[start:most])
        self._touch([*chain, partial] if shared else chain)
        metrics.PREFIX_CACHE_QUERY_TOKENS.inc(len(prompt))
        metrics.PREFIX_CACHE_HIT_TOKENS.inc(start + shared)
        pieces = [block.kv for block in chain] + ([partial.kv[:, :, :, :shared]] if shared else [])
        return torch.cat(pieces, dim=3) if pieces else None

    def store(self, weights: WeightsKey, prompt: list[int], block_kv: Callable[[int, int], torch.Tensor]) -> None:
        """Keep the blocks of ``prompt`` computed with ``weights``: its whole blocks and the shorter one after them
        (unless a cached block begins with its tokens), which later prompts reuse in part only: a prompt asked again
        reuses all but its last token. ``block_kv(start, end)`` gives the keys and values [layers, 2, kv heads, end
        - start, head dim] of tokens ``start .. end - 1``, a tensor of its own that the cache keeps (asked only for
        blocks not cached yet). Stops at the first block that would only fit by evicting the blocks before it."""
        if not self.enabled:
            return
        chain, parent, size = [], weights, self.block_tokens
        for start in range(0, len(prompt), size):
            tokens = tuple(prompt[start: start + size])
            key = (parent, tokens)
            block = self._blocks.get(key)
            if block is None:
                if len(tokens) < size and self._partial(parent, tokens)[1] == len(tokens):
                    break  # a cached block begins with the short one: a lookup finds that
                block = self._insert(key, block_kv(start, start + len(tokens)), chain)
                if block is None:
                    break
            self._blocks.move_to_end(key)  # the chain so far sits at the end, out of eviction's way
            chain.append(block)
            parent = block.serial
        self._touch(chain)
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)

    def purge(self, serial: int) -> None:
        """Drop the blocks computed with the adapter weights numbered ``serial`` (``AdapterWeights.serial``), merged
        or not: every chain whose first block's key is theirs. For weights no longer registered, whose blocks no
        request taken from then on can reuse, and which would otherwise only age out."""
        gone: set[int] = set()
        for block in sorted(self._blocks.values(), key=lambda block: block.serial):  # a parent's serial is smaller
            parent = block.key[0]  # a first block's: its weights key; any other's: its parent's serial
            first = not isinstance(parent, int)
            if (parent[0] == serial) if first else (parent in gone):
                gone.add(block.serial)
                self._drop(block.key)
        metrics.PREFIX_CACHE_BYTES.set(self.nbytes)

    def shared(self, weights: list[WeightsKey], prompts: list[list[int]]) -> list[tuple[int, int]]:
        """Prefixes that several of ``prompts`` (computed with ``weights``, one each) begin with, whole blocks short of
        their last tokens, and that are not cached: run once before the prompts, they are cached for them all. Returns
        (a prompt that begins with it, its length in tokens) for each, none a prefix of another; [] when off."""
        if not self.enabled:
            return []
        ids: dict[tuple, int] = {}  # (parent, tokens) -> an id of the block in these prompts
        paths = [self._path(key, prompt, ids) for key, prompt in zip(weights, prompts)]
        rows = Counter(block for path in paths for block in path)  # how many prompts hold each block
        ends: dict[int, int] = {}  # the last block of a shared prefix not cached -> a prompt that begins with it
        for row, (key, prompt, path) in enumerate(zip(weights, prompts, paths)):
            depth = sum(rows[block] > 1 for block in path)  # a prompt's shared blocks come first
            if depth > len(self._cached(key, prompt, depth)):
                ends.setdefault(path[depth - 1], row)
        inner = {block for end, row in ends.items() for block in paths[row][: paths[row].index(end)]}
        return [(row, (paths[row].index(end) + 1) * self.block_tokens) for end, row in ends.items() if end not in inner]

    def _path(self, weights: WeightsKey, prompt: list[int], ids: dict[tuple, int]) -> list[int]:
        """Ids (from ``ids``, which grows) of the whole blocks of ``prompt`` short of its last token."""
        path, parent, size = [], weights, self.block_tokens
        for start in range(0, (len(prompt) - 1) // size * size, size):
            parent = ids.setdefault((parent, tuple(prompt[start: start + size])), len(ids))
            path.append(parent)
        return path

    def _cached(self, weights: WeightsKey, prompt: list[int], most: int) -> list[Block]:
        """The cached blocks that begin ``prompt``, ``most`` at most, first first."""
        chain, parent, size = [], weights, self.block_tokens
        for start in range(0, most * size, size):
            block = self._blocks.get((parent, tuple(prompt[start: start + size])))
            if block is None:
                break
            chain.append(block)
            parent = block.serial
        return chain

    def _partial(self, parent: WeightsKey | int, tokens: list[int]) -> tuple[Block | None, int]:
        """The block of ``parent`` whose tokens begin with the most of ``tokens`` (the oldest of equals), and how many
        it shares; (None, 0) if none shares a first token."""
        best, shared = None, 0
        for key in self._children.get(parent, ()):
            common = common_prefix(key[1], tokens)
            if common > shared:
                best, shared = self._blocks[key], common
        return best, shared

    def _insert(self, key: tuple, kv: torch.Tensor, chain: list[Block]) -> Block | None:
        """A new block of ``kv``, evicting the least recently used blocks that are not in ``chain`` (which
        sit last) as long as it does not fit; None, and nothing evicted, if it cannot fit."""
        if kv.nbytes > self.max_bytes - sum(block.kv.nbytes for block in chain):
            return None
        while self.nbytes + kv.nbytes > self.max_bytes:
            self._drop(next(iter(self._blocks)))
        block = Block(key, next(self._serials), kv)
        self._blocks[key] = block
        self._children.setdefault(key[0], {})[key] = None
        self.nbytes += kv.nbytes
        return block

    def _drop(self, key: tuple) -> None:
        """Forget the block of ``key``."""
        self.nbytes -= self._blocks.pop(key).kv.nbytes
        siblings = self._children[key[0]]
        del siblings[key]
        if not siblings:
            del self._children[key[0]]

    def _touch(self, chain: list[Block]) -> None:
        """Mark ``chain`` used, its first block most recently (it outlives the blocks after it)."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)


def common_prefix(first: tuple[int, ...], second: list[int]) -> int:
    """How many tokens ``first`` and ``second`` share from their start."""
    return next((index for index, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
