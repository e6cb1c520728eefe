"""Which subtask lists to prune, and when (TIM/TIMRUN's subtask pruning with a pruning buffer).

A task's closed subtask list becomes prunable when the task starts its conclusion: the conclusion is
what the rest of the tree needs, the subtasks' contents are not. The `PruneBuffer` keeps the most recent
`size` prunable lists in the cache and hands back older ones to prune. Spans are in output tokens; the
tracker reports bytes, so `TokenBytes` maps byte spans to the tokens lying wholly inside them.
The KV surgery itself (and its exactness) is `agentrt.engine.control.SequenceHandle.prune`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from agentrt.engine.control import PruneInfo

__all__ = ["PruneBuffer", "TokenBytes", "ThreadStats"]

Span = tuple[int, int]


class PruneBuffer:
    """The `size` most recently closed subtask lists stay; `push` returns the lists to prune now.

    A list pushed while it contains earlier lists of the buffer (a parent closing after its children)
    replaces them: they are kept or pruned together with it."""

    def __init__(self, size: int = 1) -> None:
        if size < 0:
            raise ValueError(f"the pruning buffer size must be >= 0, got {size}")
        self.size = size
        self.spans: list[Span] = []  # oldest first

    def push(self, span: Span) -> list[Span]:
        a, b = span
        self.spans = [s for s in self.spans if not (a <= s[0] and s[1] <= b)]
        self.spans.append(span)
        out = self.spans[:-self.size] if self.size else list(self.spans)
        self.spans = self.spans[len(out):]
        return out


class TokenBytes:
    """Byte offsets of a token stream: which tokens lie wholly inside a byte span."""

    def __init__(self) -> None:
        self.starts: list[int] = []  # byte offset where each token starts
        self.end = 0

    def add(self, nbytes: int) -> None:
        self.starts.append(self.end)
        self.end += nbytes

    def inside(self, start: int, end: int) -> Span:
        """Tokens [i, j) whose bytes all lie in [start, end)."""
        i = bisect.bisect_left(self.starts, start)
        m = bisect.bisect_right(self.starts, end)  # tokens starting at or before `end`
        j = m if end >= self.end else m - 1  # the last of them crosses `end` unless the stream ends there
        return i, max(i, j)


@dataclass
class ThreadStats:
    """What one thread run generated and pruned."""

    pruning: bool = True
    generated_tokens: int = 0  # output tokens (sampled, forced and injected tool results)
    injected_tokens: int = 0  # tool results written into the sequence
    tool_calls: int = 0
    prunes: int = 0
    pruned_tokens: int = 0
    recomputed_tokens: int = 0  # kept tokens re-fed by prefill after a gap (exact pruning)
    rerotated_tokens: int = 0  # kept tokens moved by re-rotation only (approximate pruning)
    peak_kv_tokens: int = 0  # most tokens the sequence attended over at once (prompt included)
    prompt_tokens: int = 0
    decode_seconds: float = 0.0  # from the first generated token to the last
    prunable: list[Span] = field(default_factory=list, repr=False)  # lists that became prunable

    @property
    def prunable_tokens(self) -> int:
        """Output tokens inside subtask lists that became prunable (nested lists counted once)."""
        total, reach = 0, 0
        for a, b in sorted(self.prunable):
            a = max(a, reach)
            if b > a:
                total += b - a
                reach = b
        return total

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def add(self, info: PruneInfo) -> None:
        self.prunes += info.removed > 0
        self.pruned_tokens += info.removed
        self.recomputed_tokens += info.recomputed
        self.rerotated_tokens += info.rerotated

    def to_dict(self) -> dict:
        return {"pruning": self.pruning, "generated_tokens": self.generated_tokens,
                "injected_tokens": self.injected_tokens, "tool_calls": self.tool_calls, "prunes": self.prunes,
                "pruned_tokens": self.pruned_tokens, "prunable_tokens": self.prunable_tokens,
                "recomputed_tokens": self.recomputed_tokens, "rerotated_tokens": self.rerotated_tokens,
                "peak_kv_tokens": self.peak_kv_tokens, "prompt_tokens": self.prompt_tokens,
                "decode_seconds": round(self.decode_seconds, 4)}
