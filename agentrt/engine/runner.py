"""The model runner: turns the scheduler's work into one batched forward and returns its logits.

Two kinds of batch: the engine's (each sequence feeds its pending tokens over its own pages: one
attention group per multi-token chunk, one for the single-token rows of each kernel kind) and hogwild's
views (each row attends over a list of blocks whose keys are re-rotated to the row's own positions).
Either replays a captured CUDA graph of the fused step where one fits, else runs the eager forward.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from agentrt.engine.cuda_graphs import DecodeGraphs
from agentrt.engine.kv import KVPool, KVSequence
from agentrt.engine.scheduler import Work
from agentrt.engine.sequence import PromptLogprobs
from agentrt.errors import InvalidRequestError
from agentrt.engine.exact import PREFILL_TILES, Tiles
from agentrt.engine.kernels import triton_ready
from agentrt.engine.model import AttentionGroup, BatchInput, ExactRows, Transformer, shared_prefix

__all__ = ["ModelRunner", "ViewRow", "chunk_group", "feed_sequence", "graphable", "view_keys"]


@dataclass(eq=False)
class ViewRow:
    """One row of a hogwild forward: `tokens` fed into the block `own`, attending over the blocks of
    `context` (in view order) and then `own`."""

    context: list[KVSequence]
    own: KVSequence
    tokens: list[int]

    @property
    def blocks(self) -> list[KVSequence]:
        return [*self.context, self.own]


class ModelRunner:
    def __init__(self, model: Transformer, pool: KVPool, tiles: Tiles, *, max_batch_tokens: int,
                 max_batch_size: int, max_context: int, cuda_graphs: bool | None = None,
                 deterministic: bool = False) -> None:
        self.model, self.pool, self.tiles = model, pool, tiles
        self.device = pool.k.device
        self.max_context = max_context
        # decode steps replay CUDA graphs of the fused step (default: on CUDA when Triton is there): every
        # step the scheduler builds (decodes, jump-forward and prefill chunks) replays a graph
        if cuda_graphs is None:
            cuda_graphs = triton_ready(self.device) and graphable(model.cfg) and not deterministic
        if cuda_graphs and deterministic:
            raise InvalidRequestError("deterministic mode runs the batch-invariant kernels, not CUDA graphs",
                                      param="cuda_graphs")
        self.graphs = DecodeGraphs(model, pool, max_batch_tokens, max_batch_size, max_context) if cuda_graphs \
            else None
        self._view_graphs: DecodeGraphs | None = None
        self._background: concurrent.futures.ThreadPoolExecutor | None = None  # see launch

    def run(self, work: list[Work]) -> torch.Tensor:
        """Logits for the step's sampling rows ([M, V]), from a replayed CUDA graph where there is one."""
        return self.launch(work)()

    def launch(self, work: list[Work], background: bool = False) -> Callable[[], torch.Tensor]:
        """Start the step's forward; returns the call that waits for its logits ([M, V]). What it reads of
        the sequences (tokens, page tables) is read now, so they may change while it runs. A CUDA forward
        returns before it is computed; off CUDA, `background` runs it on a thread of its own (the overlap
        scheduler: the engine thread takes the last step's tokens meanwhile)."""
        graphs = self.graphs
        if graphs is not None and not any(w.exact for w in work) and graphs.fits(
                sum(w.n for w in work), sum(w.samples for w in work), max(w.seq.kv.length for w in work)):
            logits = graphs.run([(w.seq.kv, w.seq.pending[:w.n]) for w in work],
                                [i for i, w in enumerate(work) if w.samples])
            return lambda: logits
        batch = self.build_batch(work)
        if background and self.device.type != "cuda":
            if self._background is None:
                self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agentrt-forward")
            return self._background.submit(self.model, batch, self.pool.k, self.pool.v).result
        logits = self.model(batch, self.pool.k, self.pool.v)
        return lambda: logits

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)

    def build_batch(self, work: list[Work]) -> BatchInput:
        """The step's rows in `work` order (fast rows, then batch-invariant ones): one attention group
        per multi-token chunk, one for the single-token rows of each kind."""
        ids, positions, slots, groups, logits_rows = [], [], [], [], []
        singles: dict[bool, tuple[list[int], list[torch.Tensor]]] = {False: ([], []), True: ([], [])}
        row, exact_row, exact_logit = 0, None, None
        for w in work:
            seq, total = w.seq.kv, w.seq.kv.length
            start = total - w.n
            if w.exact and exact_row is None:
                exact_row, exact_logit = row, len(logits_rows)
            ids.extend(w.seq.pending[:w.n])
            positions.extend(seq.positions[start:])
            slots.append(self.pool.slots(seq, start, total))
            if w.n == 1:
                singles[w.exact][0].append(row)
                singles[w.exact][1].append(self.pool.slots(seq))
            else:
                groups.append(chunk_group(self.pool, seq, row, w.n, exact=w.exact))
            row += w.n
            if w.samples:
                logits_rows.append(row - 1)
        for exact, (rows, seq_slots) in singles.items():
            if rows:
                groups.append(single_token_group(rows, seq_slots, exact))
        dev = self.device
        return BatchInput(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            write_slots=torch.cat(slots).to(dev),
            groups=[g.to(dev) for g in groups],
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            exact=None if exact_row is None else ExactRows(exact_row, exact_logit, self.tiles),
        )

    @torch.inference_mode()
    def score_prompt(self, tokens: list[int], top: int = 0, chunk: int = 256) -> PromptLogprobs:
        """Each token's log-probability (and rank, and the `top` most likely tokens) given the ones before
        it, from one prefill of `tokens` on pages of its own, as the engine prefills (batch-invariant kernels,
        in chunks of `chunk`). Its full pages then enter the prefix cache: a request for the same prompt
        that follows reads them instead of prefilling again. On the engine thread (Engine.call); raises
        OutOfPagesError when the pool has no room for the prompt now."""
        pool = self.pool
        held = pool.match_prefix(tokens)  # a lookup only: what the cache offered before this pass
        cached = held.length
        pool.free(held)
        pool.prefix_hit_tokens -= cached
        out = PromptLogprobs([None], [None], [None], cached_tokens=cached)
        kv = KVSequence()
        try:
            for start in range(0, len(tokens), chunk):
                targets = tokens[start + 1:start + chunk + 1]  # what each fed token's logits predict
                logits = feed_sequence(self.model, pool, kv, tokens[start:start + chunk], tiles=self.tiles)
                if targets:
                    _score_rows(logits[:len(targets)], targets, top, out)
            pool.register_prefix(kv, tokens)
        finally:
            pool.free(kv)
        return out

    # --- hogwild views ------------------------------------------------------------------------------
    def view_graphs(self) -> DecodeGraphs:
        """The fused step for hogwild views (slot tables and key deltas), shared by every pool on this
        engine so graphs are captured once: at most 64 new tokens and 67 rows (64 workers and 3 headers)."""
        if self._view_graphs is None:
            self._view_graphs = DecodeGraphs(self.model, self.pool, max_tokens=64, max_rows=67,
                                             max_context=self.max_context, views=True)
        return self._view_graphs

    def run_views(self, rows: list[ViewRow], fused: bool, keys: dict | None = None) -> torch.Tensor:
        """One forward over hogwild views: each row's tokens are appended to its own block at the
        positions its view gives them (after every block before it, this forward's new tokens of the
        other rows included, so rows see each other's tokens at once) and attend over the view's keys,
        re-rotated to the view's dense positions. Next-token logits after each row's last token: [R, V].
        `keys`: the blocks' slots and positions, kept between forwards by the caller (see `view_keys`)."""
        pool = self.pool
        grows = {id(r.own): len(r.tokens) for r in rows}
        ids, positions, writes = [], [], []
        starts = [sum(b.length + grows.get(id(b), 0) for b in r.context) + r.own.length for r in rows]
        for r, start in zip(rows, starts):
            pos = list(range(start, start + len(r.tokens)))
            writes.append(pool.append(r.own, len(r.tokens), pos))
            ids += r.tokens
            positions += pos
        keys = {} if keys is None else keys  # each block's, read once per forward at least
        views = [view_keys(pool, r.blocks, keys) for r in rows]
        slots = [s for s, _ in views]  # [T_r] each
        stored = [p for _, p in views]  # [T_r] position each key was written at
        qs = [len(r.tokens) for r in rows]
        graphs = self.view_graphs() if fused else None
        if graphs is not None and graphs.fits(sum(qs), len(qs), max(s.numel() for s in slots)):
            return self._run_views_fused(graphs, ids, positions, writes, slots, stored, qs)
        return self._run_views_eager(ids, positions, writes, slots, stored, qs)

    def _run_views_eager(self, ids, positions, writes, slots, stored, qs) -> torch.Tensor:
        """The batched forward with attention groups: each view's keys gathered and re-rotated."""
        pool, dev = self.pool, self.device
        rows = range(len(qs))
        first = [sum(qs[:r]) for r in rows]  # each row's first token in the batch
        groups = []
        for q in sorted(set(qs)):  # rows feeding the same number of tokens attend together
            members = [r for r in rows if qs[r] == q]
            tmax = max(slots[r].numel() for r in members)
            g_slots = torch.zeros(len(members), tmax, dtype=torch.long)  # [b, T], padding masked out
            g_delta = torch.zeros(len(members), tmax, dtype=torch.long)  # [b, T] view pos - stored pos
            g_mask = torch.zeros(len(members), 1, q, tmax, dtype=torch.bool)  # [b, 1, q, T]
            for i, r in enumerate(members):
                t = slots[r].numel()
                g_slots[i, :t], g_delta[i, :t] = slots[r], torch.arange(t) - stored[r]
                g_mask[i, 0] = torch.arange(tmax)[None, :] < torch.arange(t - q + 1, t + 1)[:, None]  # causal
            g_rows = torch.tensor(first)[members][:, None] + torch.arange(q)  # [b, q]
            moved = g_delta.to(dev) if bool(g_delta.any()) else None  # None: every key where it was written
            # the history is re-positioned as it joins (see _join): its keys need no rotation per view
            still = int((g_delta != 0).int().argmax(dim=1)[g_delta.any(dim=1)].min()) if moved is not None else 0
            shared = shared_prefix(g_slots, [slots[r].numel() - q for r in members], g_delta)
            groups.append(AttentionGroup(g_rows.to(dev), g_slots.to(dev), g_mask.to(dev), moved, still, shared))
        last = [f + q - 1 for f, q in zip(first, qs)]
        batch = BatchInput(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                           torch.cat(writes).to(dev), groups, torch.tensor(last, device=dev))
        return self.model(batch, pool.k, pool.v)  # [R, V]

    @staticmethod
    def _run_views_fused(graphs, ids, positions, writes, slots, stored, qs) -> torch.Tensor:
        """The fused step: every new token a row with its view's slot table, key deltas and key count."""
        host = graphs.host()
        n = len(ids)
        host.input_ids[:n], host.positions[:n] = ids, positions
        host.write_slots[:n] = torch.cat(writes).numpy()
        r, cols, last = 0, 1, []
        for s, p, q in zip(slots, stored, qs):
            t = s.numel()
            table, delta = s.numpy(), np.arange(t) - p.numpy()  # view position - stored position
            for j in range(q):  # causal among the row's own new tokens
                host.lengths[r] = t - q + 1 + j
                host.page_table[r, :t] = table
                host.key_delta[r, :t] = delta
                r += 1
            last.append(r - 1)
            cols = max(cols, t)
        host.logits_rows[:len(last)] = last
        return graphs.launch(r, cols, len(last))


def view_keys(pool: KVPool, blocks: list[KVSequence], memo: dict | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool slot and the stored position (where its key was rotated) of every key of `blocks`, in
    order: ([T], [T]). `memo` keeps each block's by id between calls: a block is read again when its
    length changed; one re-positioned in place must be dropped from it by the caller."""
    memo = {} if memo is None else memo
    parts = []
    for b in blocks:
        hit = memo.get(id(b))
        if hit is None or hit[0] is not b or hit[1].numel() != b.length:
            hit = memo[id(b)] = (b, pool.slots(b), torch.tensor(b.positions, dtype=torch.long))
        parts.append(hit)
    return torch.cat([s for _, s, _ in parts]), torch.cat([p for _, _, p in parts])


def chunk_group(pool: KVPool, seq: KVSequence, row: int, n: int, exact: bool = False) -> AttentionGroup:
    """Attention for the last `n` tokens of `seq` (already appended), fed at batch rows row..row+n-1;
    `exact`: by the batch-invariant kernel."""
    total, start = seq.length, seq.length - n
    rows = torch.arange(row, row + n).view(1, -1)
    if start == 0 and not exact:
        return AttentionGroup(rows, None, None)  # plain causal over the fresh keys
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=start)  # query i sees keys 0 .. start + i
    return AttentionGroup(rows, pool.slots(seq).view(1, -1), mask.view(1, 1, n, total), exact=exact)


def single_token_group(rows: list[int], seq_slots: list[torch.Tensor], exact: bool) -> AttentionGroup:
    """One new token per sequence at `rows`, each over its own keys (padded to the longest)."""
    t = max(len(s) for s in seq_slots)
    padded = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), 1, 1, t, dtype=torch.bool)
    for i, s in enumerate(seq_slots):
        padded[i, :len(s)] = s
        mask[i, 0, 0, :len(s)] = True
    # requests whose prompts share cached pages read those keys once (cascade, on CPU)
    shared = 0 if exact else shared_prefix(padded, [len(s) for s in seq_slots])
    return AttentionGroup(torch.tensor(rows).view(-1, 1), padded, mask, shared=shared, exact=exact)


def feed_sequence(model: Transformer, pool: KVPool, seq: KVSequence, tokens: list[int],
                  positions: list[int] | None = None, exact: bool = True, tiles: Tiles = PREFILL_TILES
                  ) -> torch.Tensor:
    """Feed `tokens` to one sequence outside the engine loop, as the engine prefills (by the batch-invariant
    kernels of `tiles`, an engine's `tiles`; `exact=False`: by the fastest ones); logits for each: [n, V].

    For tests, benchmarks and KV surgery checks (a fresh prefill to compare a pruned sequence against).
    """
    n = len(tokens)
    slots = pool.append(seq, n, positions)
    dev = pool.k.device
    g = chunk_group(pool, seq, 0, n, exact=exact).to(dev)
    batch = BatchInput(torch.tensor(tokens, device=dev), torch.tensor(seq.positions[-n:], device=dev),
                       slots.to(dev), [g], torch.arange(n, device=dev), ExactRows(0, 0, tiles) if exact else None)
    return model(batch, pool.k, pool.v)


def _score_rows(logits: torch.Tensor, targets: list[int], top: int, out: PromptLogprobs) -> None:
    """Append to `out` each row's log-probability and rank of its target, and its `top` best tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    want = torch.tensor(targets, device=logp.device)[:, None]
    chosen = logp.gather(1, want)  # [n, 1]
    parts = [chosen.view(-1).double(), ((logp > chosen).sum(dim=1) + 1).double()]
    if top:
        best = logp.topk(top, dim=-1)
        parts += [best.values.reshape(-1).double(), best.indices.reshape(-1).double()]
    host = torch.cat(parts).tolist()  # one copy to the host
    n = len(targets)
    out.logprobs += host[:n]
    out.ranks += [int(r) for r in host[n:2 * n]]
    values, ids = host[2 * n:2 * n + n * top], host[2 * n + n * top:]
    out.top_logprobs += [{int(t): v for t, v in zip(ids[i * top:(i + 1) * top], values[i * top:(i + 1) * top])}
                         for i in range(n)]


def graphable(cfg) -> bool:
    """The fused kernels need a power-of-two head size (Triton block shapes)."""
    return cfg.head_dim >= 16 and cfg.head_dim & (cfg.head_dim - 1) == 0
