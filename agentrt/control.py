"""Per-request control of a running sequence, for thread mode (TIM/TIMRUN, "Subconscious Threads"): pause
it while a tool runs, write tokens into it by prefill, and prune spans of its KV cache with position reuse.

A `SequenceController` passed to `Engine.submit(..., control=...)` sees every accepted token on the
engine thread (sampled, forced by jump-forward, or injected) and acts through a `SequenceHandle`.

Pruning exactness. Removing a span from a sequence's cache and shifting the kept tail left by RoPE
re-rotation is exact only for the first layer: in deeper layers, the tail's K/V were computed while
attending to the removed span. So `prune` drops the tail after the gap as well and re-feeds those tokens
by prefill at their new, dense positions (they are recomputed in the next engine step). By induction
every kept token's K/V then equal those of a fresh prefill of exactly the kept tokens, and so do the
next-token logits. A tail longer than `max_recompute` tokens is instead moved by re-rotation only
(cheap, approximate: deeper layers still carry what the tail read from the removed span); `PruneInfo`
says which happened. Either way the sequence leaves the prefix cache's reach (`canonical` is cleared),
so pruned pages are never offered to other requests; a sequence preempted later is re-admitted by a
fresh prefill of its kept tokens, which is exact again.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agentrt.errors import KVCacheError

if TYPE_CHECKING:
    from agentrt.engine import Engine, _Request
    from agentrt.kv import KVSequence

__all__ = ["SequenceController", "SequenceHandle", "PruneInfo"]


class SequenceController(Protocol):
    def on_tokens(self, seq: SequenceHandle, token_ids: list[int]) -> None:
        """Engine thread: `token_ids` were just accepted by the request's constraint and streamed out.

        Must not block: start slow work elsewhere and call `seq.resume(...)` when it is done."""


@dataclass
class PruneInfo:
    removed: int  # tokens dropped from the cache
    recomputed: int = 0  # kept tokens after the gap, re-fed by prefill at dense positions (exact)
    rerotated: int = 0  # kept tokens after the gap, moved by RoPE re-rotation only (approximate)


class SequenceHandle:
    """One running request as its controller sees it. Token indices count the request's output tokens
    (everything generated or injected, pruned ones included), as in `output_ids`."""

    def __init__(self, engine: Engine, req: _Request) -> None:
        self._engine = engine
        self._req = req

    @property
    def request_id(self) -> int:
        return self._req.id

    @property
    def output_ids(self) -> list[int]:
        return self._req.output_ids

    @property
    def live_tokens(self) -> int:
        """Tokens the sequence attends over (prompt and kept output): its live KV cache."""
        return self._req.context_length

    @property
    def kept_ids(self) -> list[int]:
        """The prompt and the output less pruned spans: what the sequence attends over, in order."""
        return self._req.kept_ids()

    @property
    def kv(self) -> KVSequence | None:
        """The sequence's cache: K/V of the first `kv.length` kept tokens (None while preempted)."""
        return self._req.seq

    # --- engine thread ---------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop scheduling the sequence after this step; it keeps its pages. Other requests go on."""
        self._req.paused = True

    def prune(self, start: int, end: int, *, max_recompute: int | None = None) -> PruneInfo:
        """Drop output tokens [start, end) from the KV cache (already-pruned ones inside are skipped).

        The kept tokens after the gap are recomputed by prefill at dense positions (exact) when there are
        at most `max_recompute` of them (None: always), else re-rotated in place (approximate)."""
        req, pool = self._req, self._engine.pool
        if not 0 <= start <= end <= len(req.output_ids):
            raise KVCacheError(f"prune span [{start}, {end}) outside the {len(req.output_ids)} output tokens")
        lo, hi = _kept_before(req.removed, start), _kept_before(req.removed, end)
        if hi == lo:
            return PruneInfo(0)
        _remove(req.removed, start, end)
        p = len(req.prompt_ids)
        s, e = p + lo, p + hi  # the span in the kept stream: fed_ids + pending
        if req.seq is None:  # preempted: re-admission prefills the kept tokens
            return PruneInfo(hi - lo)
        fed = len(req.fed_ids)
        tail = max(0, fed - e)
        req.seq.canonical = False
        if e >= fed or max_recompute is None or tail <= max_recompute:
            stream = req.fed_ids + req.pending
            kept = stream[:s] + stream[e:]
            cut = min(s, fed)
            pool.truncate(req.seq, cut)
            req.fed_ids, req.pending = kept[:cut], kept[cut:]
            return PruneInfo(hi - lo, recomputed=tail)
        pool.prune(req.seq, s, e, rotary=self._engine.model.rotary)
        req.fed_ids = req.fed_ids[:s] + req.fed_ids[e:]
        return PruneInfo(hi - lo, rerotated=tail)

    # --- any thread ------------------------------------------------------------------------------
    def resume(self, inject: list[int] = ()) -> None:
        """Schedule the sequence again, first writing `inject` into it: the tokens are accepted by the
        request's constraint, appear in its output, and are fed by prefill in the next step."""
        req, engine = self._req, self._engine
        engine._send(lambda: engine._resume(req, list(inject)))


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
