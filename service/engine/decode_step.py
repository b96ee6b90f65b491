"""One decoding step for every running row over a ``RowKVCache``: eager, or a replayed CUDA graph.

A step feeds each row one token, or that token and draft tokens after it (speculative decoding,
``running_batch``): rows fed fewer than the most are padded with token 0 at the positions after theirs,
whose keys and values no query of theirs reads before a later step writes them anew. A step of one token
per row may be a CUDA graph; one with drafts always runs eagerly.

On the GPU a step of a small model is bound by the host launching ~2,000 kernels, not by the GPU. A
CUDA graph per bucket (rows rounded up to a power of two, cache columns to a multiple of 256, LoRA on
or off) records the step once and replays it with one launch. Its inputs live in static buffers; rows
past the batch in a bucket are padding (token 0 at position 0 of an unused cache row, no adapter).
Graphs are dropped when the cache or the LoRA banks are reallocated (their addresses are baked in).
"""
from __future__ import annotations

import logging

import torch

from service.engine.kv_cache import RowKVCache, column_bucket, row_bucket
from service.lora.layers import LoraLayers
from service.model.base_model import cache_keyword
from service.model.malloc import give_back
from service.model.onednn_linear import padded_rows, pads_rows

log = logging.getLogger(__name__)


class DecodeStep:
    """Feeds each row its tokens from its position on and returns the next-token logits after each (fp32)."""

    def __init__(self, model, lora: LoraLayers, cuda_graphs: bool, max_rows: int):
        self.model, self.lora = model, lora  # the step reads the LoRA banks and the row-to-slot mapping
        self.device = next(model.parameters()).device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # graphs bake in the cache's address: it is allocated for the largest batch at once; otherwise it grows
        self.cache = RowKVCache(min_rows=row_bucket(max_rows) if self.cuda_graphs else 1)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._captured_over: tuple[int, int, int] | None = None  # (cache, banks, mask) storage of the graphs
        self._inputs = torch.zeros(2, row_bucket(max_rows), dtype=torch.long, device=self.device)  # [ids; positions]
        self._pool = None
        self._pads_rows = pads_rows(model)

    def widest(self, rows: int, tokens: int) -> int:
        """The most tokens (``tokens`` or more) each of ``rows`` rows may be fed in a step that costs about what a
        step of ``tokens`` each does: on the CPU the linear layers, most of a step's time, compute the rows x tokens
        padded up (``onednn_linear.padded_rows``), so tokens in the padding cost them nothing (a step of one row took
        about as long with 5 tokens as with 8: docs/benchmarks.md, "Drafts in the padding, grouped heads packed");
        elsewhere ``tokens``."""
        return padded_rows(rows * tokens) // rows if self._pads_rows else tokens

    def __call__(self, fed: list[list[int]], positions: list[int]) -> torch.Tensor:
        """Feed row i the tokens ``fed[i]`` (at least one) at positions ``positions[i]`` on; returns the next-token
        logits after each fed token [rows, most fed, vocab] (fp32; past a row's own tokens, padding's)."""
        rows, most = len(fed), max(map(len, fed))
        width = max(positions) + most
        padded = row_bucket(rows) if self.cuda_graphs and most == 1 else rows
        self.cache.reserve(padded, width, used=(rows, width - most))
        ids = torch.tensor([tokens + [0] * (most - len(tokens)) for tokens in fed], device=self.device)
        offsets, lengths = torch.arange(most), torch.tensor([len(tokens) for tokens in fed])
        columns = torch.tensor(positions)[:, None] + offsets  # [rows, most]: the cache columns each row writes
        inputs = torch.stack([ids, columns.to(self.device)])  # [2, rows, most]
        if not self.cuda_graphs or most > 1:  # padding's positions repeat the row's last: none past the model's
            clamped = columns - (offsets - lengths[:, None] + 1).clamp(min=0)
            return self._forward(inputs[0], inputs[1], width, clamped.to(self.device))
        if padded > self._inputs.shape[1]:
            self._inputs = torch.zeros(2, padded, dtype=torch.long, device=self.device)
            self._drop_graphs()
        self._inputs[:, :padded].zero_()
        self._inputs[:, :rows] = inputs[:, :, 0]
        try:
            graph, logits = self._graph(padded, column_bucket(width))
        except RuntimeError as exc:  # a model whose step cannot be captured still decodes, eagerly
            log.warning("CUDA graph capture failed, decoding without graphs from now on: %s", exc)
            self.cuda_graphs = False
            return self._forward(inputs[0], inputs[1], width)
        graph.replay()
        return logits[:rows]

    def _forward(self, ids: torch.Tensor, columns: torch.Tensor, width: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """The step itself over ``ids`` written to cache ``columns`` [rows, q] at ``positions`` [rows, q] (None: the
        columns; a row's tokens are at the positions of their columns, its padding may not be): a causal mask from
        the columns, the model over the cache's first ``width`` columns; logits [rows, q, vocab] (fp32)."""
        self.cache.positions, self.cache.width = columns, width
        dtype = self.cache.keys[0].dtype
        unseen = torch.arange(width, device=ids.device)[None, None, :] > columns[:, :, None]  # [rows, q, width]
        mask = torch.zeros(unseen.shape, dtype=dtype, device=ids.device).masked_fill_(unseen, torch.finfo(dtype).min)
        out = self.model(input_ids=ids, attention_mask=mask[:, None],
                         position_ids=columns if positions is None else positions,
                         **{cache_keyword(self.model): self.cache}, use_cache=True)
        return out.logits.float()

    def idle(self) -> None:
        """When the engine rests (``Engine._rest``: no work for a while, or after a batch that failed or held
        non-finite logits): without CUDA graphs the KV cache is freed (the next batch allocates what its rows and
        prompts need), and on the CPU what the batches freed leaves malloc's arenas (``malloc.give_back``), so that
        memory held follows the traffic, not the largest burst ever served."""
        if not self.cuda_graphs:
            self.cache.release()
        if self.device.type == "cpu":
            give_back()

    @property
    def graphs(self) -> int:
        """How many decoding steps are captured as CUDA graphs now (one per bucket used since the last drop)."""
        return len(self._graphs)

    def _drop_graphs(self) -> None:
        """Forget every captured step, and their memory pool with them (a pool outlives no graph)."""
        self._graphs.clear()
        self._pool = None

    def _graph(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured step for this bucket, capturing it on first use."""
        over = (self.cache.storage, self.lora.banks.storage, self.lora.mapping.storage)
        if over != self._captured_over:
            self._drop_graphs()
            self._captured_over = over
        key = (rows, width, self.lora.mapping.rank > 0)
        if key not in self._graphs:
            ids, positions = self._inputs[0, :rows, None], self._inputs[1, :rows, None]  # [rows, 1]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (kernel selection, workspaces) outside the capture
                self._forward(ids, positions, width)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(ids, positions, width)
            self._pool = graph.pool()
            self._graphs[key] = (graph, logits)
            log.info("captured a decoding step for %d rows x %d columns (LoRA %s)", rows, width, key[2])
        return self._graphs[key]
