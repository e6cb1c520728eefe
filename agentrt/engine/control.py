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

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from agentrt.engine.scheduler import PruneInfo

if TYPE_CHECKING:
    from agentrt.engine.kv import KVSequence
    from agentrt.engine.scheduler import Scheduler
    from agentrt.engine.sequence import Sequence

__all__ = ["SequenceController", "SequenceHandle", "PruneInfo"]


class SequenceController(Protocol):
    def on_tokens(self, seq: SequenceHandle, token_ids: list[int]) -> None:
        """Engine thread: `token_ids` were just accepted by the request's constraint and streamed out.

        Must not block: start slow work elsewhere and call `seq.resume(...)` when it is done."""


class SequenceHandle:
    """One running request as its controller sees it. Token indices count the request's output tokens
    (everything generated or injected, pruned ones included), as in `output_ids`.

    `resume(seq, inject)` is the engine's: it queues the resumption for the engine thread."""

    def __init__(self, seq: Sequence, scheduler: Scheduler, rotary,
                 resume: Callable[[Sequence, list[int]], None]) -> None:
        self._seq, self._scheduler, self._rotary, self._resume = seq, scheduler, rotary, resume

    @property
    def request_id(self) -> int:
        return self._seq.id

    @property
    def output_ids(self) -> list[int]:
        return self._seq.output_ids

    @property
    def live_tokens(self) -> int:
        """Tokens the sequence attends over (prompt and kept output): its live KV cache."""
        return self._seq.context_length

    @property
    def kept_ids(self) -> list[int]:
        """The prompt and the output less pruned spans: what the sequence attends over, in order."""
        return self._seq.kept_ids()

    @property
    def kv(self) -> KVSequence | None:
        """The sequence's cache: K/V of the first `kv.length` kept tokens (None while preempted)."""
        return self._seq.kv

    # --- engine thread ---------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop scheduling the sequence after this step; it keeps its pages. Other requests go on."""
        self._seq.paused = True

    def prune(self, start: int, end: int, *, max_recompute: int | None = None) -> PruneInfo:
        """Drop output tokens [start, end) from the KV cache (already-pruned ones inside are skipped).

        The kept tokens after the gap are recomputed by prefill at dense positions (exact) when there are
        at most `max_recompute` of them (None: always), else re-rotated in place (approximate)."""
        return self._scheduler.prune(self._seq, start, end, self._rotary, max_recompute)

    # --- any thread ------------------------------------------------------------------------------
    def resume(self, inject: list[int] = ()) -> None:
        """Schedule the sequence again, first writing `inject` into it: the tokens are accepted by the
        request's constraint, appear in its output, and are fed by prefill in the next step."""
        self._resume(self._seq, list(inject))
