"""Which sequences run this step, and with how many tokens: admission, preemption, the token budget, and
the operations on a running sequence's pages (pause, resume, prune).

Every step each running sequence feeds its pending tokens (one for a decoding sequence, a chunk of the
prompt for a prefilling one, forced tokens after jump-forward) within `max_batch_tokens`; decodes go
first. A sequence that cannot get pages preempts the newest other one, which is recomputed later from
its kept tokens. Page management itself is `KVPool`'s.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass

from agentrt.engine.kv import KVPool, KVSequence, OutOfPagesError
from agentrt.engine.sampling import SamplingParams
from agentrt.engine.sequence import Sequence
from agentrt.errors import KVCacheError

__all__ = ["Scheduler", "Work", "PruneInfo"]

log = logging.getLogger(__name__)


@dataclass
class Work:
    seq: Sequence
    n: int  # tokens fed this step
    samples: bool  # its pending runs out this step: sample a next token
    exact: bool = False  # fed by the batch-invariant kernels (prefill; every row when deterministic)

    @classmethod
    def decode(cls, kv: KVSequence, token: int) -> Work:
        """One decode row feeding `token` to `kv` (its slot already appended), outside any request: for
        benchmarks that time the runner's step alone."""
        seq = Sequence(0, [token], SamplingParams(), None, lambda _: None, set(), None, None, None,
                       kv=kv, pending=[token])
        return cls(seq, 1, True)


@dataclass
class PruneInfo:
    removed: int  # tokens dropped from the cache
    recomputed: int = 0  # kept tokens after the gap, re-fed by prefill at dense positions (exact)
    rerotated: int = 0  # kept tokens after the gap, moved by RoPE re-rotation only (approximate)


class Scheduler:
    def __init__(self, pool: KVPool, max_batch_size: int, max_batch_tokens: int, deterministic: bool) -> None:
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.deterministic = deterministic
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def can_step(self) -> bool:
        """Whether a step would do work: a running sequence is not paused, or one waits on an idle engine."""
        return any(not s.paused for s in self.running) or bool(self.waiting and not self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and return its pages to the pool."""
        if seq.kv is not None:
            self.pool.free(seq.kv)
            seq.kv = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def admit(self) -> list[tuple[Sequence, KVCacheError]]:
        """Start waiting sequences while pages allow; returns those that can never fit (to be failed)."""
        refused = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            tokens = seq.kept_ids()  # output tokens too after a preemption (less pruned spans)
            kv = self.pool.match_prefix(tokens)
            if self.pool.pages_needed(kv, len(tokens) - kv.length) > self.pool.num_free:
                self.pool.free(kv)
                if self.running:
                    break  # it fits once others finish
                self.waiting.popleft()
                refused.append((seq, KVCacheError(
                    f"request needs {len(tokens)} tokens of KV cache; the pool holds "
                    f"{self.pool.num_pages * self.pool.page_size}: raise kv_tokens")))
                continue
            self.waiting.popleft()
            seq.kv, seq.fed_ids, seq.pending = kv, tokens[:kv.length], tokens[kv.length:]
            if seq.cached_tokens is None:  # a re-admission after preemption is not a cache hit of the prompt
                seq.cached_tokens = min(kv.length, len(seq.prompt_ids))
            seq.prefill_until = len(tokens)
            self.running.append(seq)
        return refused

    def schedule(self) -> list[Work]:
        """This step's work within the token budget (decodes first); raises OutOfPagesError when even
        preempting every other sequence leaves one without pages."""
        budget, work = self.max_batch_tokens, []
        for seq in sorted(self.running, key=lambda s: len(s.pending)):  # decodes first
            n = min(len(seq.pending), budget)
            if n == 0 or seq.kv is None or seq.paused:  # out of budget, preempted a moment ago, or paused
                continue
            while True:
                try:
                    self.pool.reserve(seq.kv, n)
                    break
                except OutOfPagesError:
                    if not self.preempt(keep=seq):
                        raise
            budget -= n
            exact = self.deterministic or len(seq.fed_ids) < seq.prefill_until
            work.append(Work(seq, n, n == len(seq.pending), exact))
        # rows of the fastest kernels first, then the batch-invariant ones (BatchInput.exact)
        return sorted((w for w in work if w.seq.kv is not None), key=lambda w: w.exact)

    def queue_ahead(self, sampled: list[tuple], max_context: int) -> tuple[list[tuple], list[tuple]]:
        """The overlap scheduler's split of the last step's sampled rows (seq, token, ...): the rows to take
        before this step's forward (the token ends its sequence by a stop token or a length limit, or a
        controller must see it first), and the rows whose token is queued on its sequence's pending now, to
        be fed by this step's forward and taken while it runs. Ended sequences' rows are dropped."""
        now, ahead = [], []
        for row in sampled:
            seq, token = row[0], row[1]
            if seq.done:
                continue
            ends = token in seq.stop_ids or len(seq.output_ids) + 1 >= seq.params.max_tokens \
                or seq.context_length + 1 >= max_context
            if ends or seq.control is not None:
                now.append(row)
            else:
                seq.pending.append(token)
                ahead.append(row)
        return now, ahead

    def postprocess(self, work: list[Work]) -> None:
        """After the forward: the fed tokens' K/V are cached; offer the cacheable ones to other requests."""
        for w in work:
            seq = w.seq
            if seq.kv is None:  # ended while the forward ran (the overlap scheduler took its last token)
                continue
            seq.fed_ids.extend(seq.pending[:w.n])
            del seq.pending[:w.n]
            # the cache offers only keys a fresh prefill would compute bit for bit
            self.pool.register_prefix(seq.kv, seq.fed_ids if self.deterministic else
                                      seq.fed_ids[:seq.prefill_until])

    def preempt(self, keep: Sequence | None) -> bool:
        """Free the newest other sequence (it will be recomputed later); False if there is none."""
        for victim in reversed(self.running):
            if victim is not keep:
                self.pool.free(victim.kv)
                victim.kv, victim.fed_ids, victim.pending = None, [], []
                self.running.remove(victim)
                self.waiting.appendleft(victim)
                log.info("preempted request %d (KV cache full)", victim.id)
                return True
        return False

    # --- a running sequence's pages (thread mode) ---------------------------------------------------
    def prune(self, seq: Sequence, start: int, end: int, rotary, max_recompute: int | None = None) -> PruneInfo:
        """Drop output tokens [start, end) from `seq`'s cache (see agentrt.engine.control for exactness)."""
        pool = self.pool
        if not 0 <= start <= end <= len(seq.output_ids):
            raise KVCacheError(f"prune span [{start}, {end}) outside the {len(seq.output_ids)} output tokens")
        lo, hi = _kept_before(seq.removed, start), _kept_before(seq.removed, end)
        if hi == lo:
            return PruneInfo(0)
        _remove(seq.removed, start, end)
        p = len(seq.prompt_ids)
        s, e = p + lo, p + hi  # the span in the kept stream: fed_ids + pending
        if seq.kv is None:  # preempted: re-admission prefills the kept tokens
            return PruneInfo(hi - lo)
        fed = len(seq.fed_ids)
        tail = max(0, fed - e)
        seq.kv.canonical = False
        if e >= fed or max_recompute is None or tail <= max_recompute:
            stream = seq.fed_ids + seq.pending
            kept = stream[:s] + stream[e:]
            cut = min(s, fed)
            pool.truncate(seq.kv, cut)
            seq.fed_ids, seq.pending = kept[:cut], kept[cut:]
            return PruneInfo(hi - lo, recomputed=tail)
        pool.prune(seq.kv, s, e, rotary=rotary)
        seq.fed_ids = seq.fed_ids[:s] + seq.fed_ids[e:]
        return PruneInfo(hi - lo, rerotated=tail)


def _kept_before(removed: list[tuple[int, int]], j: int) -> int:
    """How many output indices below `j` are not inside a removed interval."""
    gone = 0
    for a, b in removed:
        if a >= j:
            break
        gone += min(b, j) - a
    return j - gone


def _remove(removed: list[tuple[int, int]], start: int, end: int) -> None:
    """Add [start, end) to the sorted, disjoint intervals in `removed`, merging overlaps."""
    i = bisect.bisect_left(removed, (start, start))
    if i and removed[i - 1][1] >= start:
        i -= 1
    j = i
    while j < len(removed) and removed[j][0] <= end:
        start, end = min(start, removed[j][0]), max(end, removed[j][1])
        j += 1
    removed[i:j] = [(start, end)]
