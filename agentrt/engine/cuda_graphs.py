"""The decode step captured in CUDA graphs: one graph per batch-size bucket, replayed every step.

The fused decode step (`Transformer.decode`) has shapes that depend only on the number of new
tokens: each finds its keys through its sequence's page table and its own key count, read from
device memory, so a graph captured once serves every context length (gpt-fast captures a static
cache the same way), and a step that mixes decodes with jump-forward chunks still replays a graph.
A step's inputs go from one pinned host buffer to the device in two copies; padding rows write no
K/V and attend to nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from agentrt.engine.kv import KVPool, KVSequence
from agentrt.engine.model import DecodeInput, Transformer

__all__ = ["DecodeGraphs", "batch_buckets"]

log = logging.getLogger(__name__)

_FIELDS = 4  # per new token: id, position, write slot, key count; then the logits rows, then page tables


def batch_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture: 1, 2, 4, steps of 8 up to 64, then 96, 128, 192, 256, ... up to max_tokens."""
    sizes, b = [1, 2, 4, *range(8, 65, 8)], 64
    while b < max_tokens:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 64 -> 96 -> 128 -> 192 -> 256 ...
        sizes.append(b)
    return [s for s in sizes if s < max_tokens] + [max_tokens]


class DecodeGraphs:
    """Captured fused steps over `pool`. Engine steps address keys through page tables; with
    `views=True` (the hogwild pool) each row carries a slot table and a position delta per key."""

    def __init__(self, model: Transformer, pool: KVPool, max_tokens: int, max_rows: int, max_context: int,
                 *, views: bool = False) -> None:
        self.model, self.pool = model, pool
        self.device = pool.k.device
        self.sizes = batch_buckets(max_tokens)
        self.max_tokens = m = self.sizes[-1]
        self.max_rows = max_rows  # rows whose logits one step computes
        self.page_size = 1 if views else pool.page_size
        self.width = max_context if views else -(-max_context // pool.page_size)  # table columns
        self.views = views
        self._head = _FIELDS * m + max_rows  # the part copied whole every step
        n = self._head + m * self.width * (2 if views else 1)
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=cuda)
        self._np = self._host.numpy()  # host writes through numpy: no per-element torch dispatch
        self._dev = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event() if cuda else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def fits(self, num_tokens: int, num_rows: int, longest: int) -> bool:
        return (0 < num_tokens <= self.max_tokens and num_rows <= self.max_rows
                and longest <= self.width * self.page_size)

    def _views(self, flat, b: int, num_logits: int | None = None) -> DecodeInput:
        m, w = self.max_tokens, self.width
        head = flat[:_FIELDS * m].reshape(_FIELDS, m)
        rows = flat[_FIELDS * m:self._head][:num_logits]
        table = flat[self._head:self._head + m * w].reshape(m, w)
        delta = flat[self._head + m * w:].reshape(m, w)[:b] if self.views else None
        return DecodeInput(head[0, :b], head[1, :b], head[2, :b], table[:b], head[3, :b], rows, delta)

    def host(self) -> DecodeInput:
        """The host-side inputs as numpy arrays, for a caller to fill before `launch`: per new token
        its id, position, write slot (-1: none), key count and table row; the logits rows."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the host buffer
        return self._views(self._np, self.max_tokens)

    def launch(self, rows: int, cols: int, num_logits: int) -> torch.Tensor:
        """Run the step for the first `rows` tokens of `host()` (tables filled up to `cols` columns):
        the logits of its first `num_logits` logits rows, [num_logits, V] fp32."""
        b = next(s for s in self.sizes if s >= rows)
        host = self._views(self._np, self.max_tokens)
        host.input_ids[rows:] = host.positions[rows:] = host.lengths[rows:] = 0  # padding rows
        host.write_slots[rows:] = -1
        host.logits_rows[num_logits:] = 0
        self._dev[:self._head].copy_(self._host[:self._head], non_blocking=True)
        dev, src = self._views(self._dev, b), self._views(self._host, b)
        dev.page_table[:rows, :cols].copy_(src.page_table[:rows, :cols], non_blocking=True)
        if self.views:
            dev.key_delta[:rows, :cols].copy_(src.key_delta[:rows, :cols], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.device.type != "cuda":  # no graphs off CUDA: the same fused step, run eagerly, no padding
            eager = self._views(self._dev, rows, num_logits)
            out = self.model.decode(eager, self.pool.k, self.pool.v, self.page_size)
        else:
            graph, out = self._graph(b)
            graph.replay()
        return out[:num_logits]

    def replay_eager(self, rows: int) -> torch.Tensor:
        """The step `run` last launched, run again as the same fused step without its graph (to time it)."""
        return self.model.decode(self._views(self._dev, rows), self.pool.k, self.pool.v, self.page_size)

    def run(self, feeds: list[tuple[KVSequence, list[int]]], want: list[int]) -> torch.Tensor:
        """Feed each (seq, tokens): tokens are the last len(tokens) tokens of seq, already appended.

        Every new token is a row of its own with its sequence's page table and its own key count, so
        decode steps, jump-forward chunks and prefill chunks all run in the same graphs. Returns the
        logits of the last token of feeds[i] for i in `want`: [len(want), V] fp32.
        """
        ps = self.page_size
        host = self.host()
        rows, last, cols = 0, [], 1
        for seq, toks in feeds:
            n = len(toks)
            end = seq.length
            idx = np.arange(end - n, end)
            table = np.asarray(seq.pages, dtype=np.int32)
            host.input_ids[rows:rows + n] = toks
            host.positions[rows:rows + n] = seq.positions[end - n:end]
            host.write_slots[rows:rows + n] = table[idx // ps] * ps + idx % ps
            host.lengths[rows:rows + n] = idx + 1  # causal: each token sees its prefix and itself
            host.page_table[rows:rows + n, :len(table)] = table
            cols = max(cols, len(table))
            rows += n
            last.append(rows - 1)
        host.logits_rows[:len(want)] = [last[i] for i in want]
        return self.launch(rows, cols, len(want))

    def _graph(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if b in self._graphs:
            return self._graphs[b]
        # warm-up and capture run with padding inputs (no K/V written), the live ones restored after
        live = self._dev.clone()
        inputs = self._views(self._dev, b)
        inputs.write_slots.fill_(-1)
        inputs.lengths.zero_()
        inputs.logits_rows.zero_()
        k, v, ps = self.pool.k, self.pool.v, self.page_size
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # Triton JIT, cuBLAS workspaces: outside the capture
            for _ in range(2):
                self.model.decode(inputs, k, v, ps)
        torch.cuda.current_stream().wait_stream(stream)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self.model.decode(inputs, k, v, ps)
        self._dev.copy_(live)
        self._graphs[b] = (graph, out)
        log.info("captured the decode step for batch %d in a CUDA graph", b)
        return graph, out
