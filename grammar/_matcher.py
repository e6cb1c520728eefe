"""The per-sequence matcher the engine drives (agentrt.constraint.TokenConstraint over xgrammar's
GrammarMatcher), and `MaskFiller`, which fills a whole batch's bitmask on the CPU while the forward
step runs: `start()` right after launching the forward, `wait()` before sampling (XGrammar's overlap).
Near the end of a token budget a matcher can steer JSON to close (`close_by`).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import xgrammar as xgr

from agentrt.constraint import TokenConstraint, bitmask_width

if TYPE_CHECKING:
    from agentrt.grammar._compiler import CompiledConstraint

__all__ = ["Matcher", "MaskFiller"]


class Matcher:
    """Tracks one sequence's position in its grammar; implements `TokenConstraint`.

    `stop_token_ids` overrides the tokenizer's end-of-sequence ids (the grammar then ends with
    one of these). `warnings` are the compiled constraint's warnings.
    """

    def __init__(self, compiled: CompiledConstraint, *, stop_token_ids: list[int] | None = None) -> None:
        self.compiled = compiled
        self.vocab_size = int(compiled.grammar.tokenizer_info.vocab_size)
        self.xgr = xgr.GrammarMatcher(compiled.grammar, override_stop_tokens=stop_token_ids)
        self.num_accepted = 0
        self.closing_from: int | None = None  # see close_by

    @property
    def warnings(self) -> list[str]:
        return self.compiled.warnings

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        if bitmask.shape[-1] != bitmask_width(self.vocab_size):
            raise ValueError(
                f"bitmask has {bitmask.shape[-1]} words per row but the grammar was compiled for a "
                f"vocabulary of {self.vocab_size} ({bitmask_width(self.vocab_size)} words)"
            )
        self.xgr.fill_next_token_bitmask(bitmask, index)
        self._steer(bitmask, index)

    def _steer(self, bitmask: torch.Tensor, index: int) -> None:
        if self.closing_from is not None and self.num_accepted >= self.closing_from and not self.is_completed():
            closing = bitmask[index] & _closers(self.compiled, bitmask.shape[-1])
            if bool(closing.any()):
                bitmask[index] = closing

    def close_by(self, max_tokens: int, reserve: int | None = None) -> None:
        """Steer open JSON values to close within `max_tokens` accepted tokens: once `reserve` or
        fewer are left (default max_tokens // 8 within 16..32: room for a few closing brackets and
        a tool call's end tag) and the grammar cannot end yet, only tokens that start by closing a
        string, array or object (`"`, `]`, `}`) are allowed whenever the grammar allows one. A weak
        model looping inside a tool call then ends it with a complete, shortened value instead of
        running out of tokens mid-value; outputs that end earlier are untouched."""
        reserve = min(32, max(16, max_tokens // 8)) if reserve is None else reserve
        self.closing_from = max(0, max_tokens - reserve)

    def accept_token(self, token_id: int) -> bool:
        ok = bool(self.xgr.accept_token(int(token_id)))
        self.num_accepted += ok
        return ok

    def accept_string(self, text: str) -> bool:
        """Advance past forced text (jump-forward) without tokens; rollback does not undo this."""
        return bool(self.xgr.accept_string(text))

    def is_terminated(self) -> bool:
        return bool(self.xgr.is_terminated())

    def is_completed(self) -> bool:
        """True when the output so far is a complete match (a stop token would be accepted)."""
        return bool(self.xgr.is_completed())

    def find_jump_forward_string(self) -> str:
        return str(self.xgr.find_jump_forward_string())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: only {self.num_accepted} accepted")
        self.xgr.rollback(num_tokens)
        self.num_accepted -= num_tokens

    def reset(self) -> None:
        self.xgr.reset()
        self.num_accepted = 0


assert issubclass(Matcher, TokenConstraint)

_CLOSERS: dict[tuple[str, int], torch.Tensor] = {}  # (tokenizer fingerprint, words) -> packed row


def _closers(compiled: CompiledConstraint, words: int) -> torch.Tensor:
    """One packed bitmask row: the tokens whose text starts with `"`, `]` or `}`."""
    key = (compiled.tokenizer, words)
    if key not in _CLOSERS or not compiled.tokenizer:
        vocab = compiled.grammar.tokenizer_info.decoded_vocab
        bits = np.zeros(words * 32, dtype=np.uint64)
        bits[[i for i, t in enumerate(vocab) if t[:1] in (b'"', b"]", b"}")]] = 1
        packed = (bits.reshape(words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
        _CLOSERS[key] = torch.from_numpy(packed.astype(np.uint32).view(np.int32))
    return _CLOSERS[key]


class MaskFiller:
    """Fills one bitmask row per sequence: constrained rows from their matcher, others all-allowed.

    `fill()` is synchronous; `start()` runs the same fill on a background thread and `wait()` joins
    it (re-raising its error), so the CPU work overlaps the accelerator's forward step.
    """

    def __init__(self, max_threads: int | None = None) -> None:
        self._batch = xgr.BatchGrammarMatcher(max_threads if max_threads else "auto")
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mask-fill")
        self._pending: cf.Future[torch.Tensor] | None = None

    def fill(self, matchers: Sequence[TokenConstraint | None], bitmask: torch.Tensor) -> torch.Tensor:
        """Row i of `bitmask` gets `matchers[i]`'s mask; a None (unconstrained) row allows every token."""
        if bitmask.shape[0] < len(matchers):
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(matchers)} sequences")
        ours: list[Matcher] = []
        rows: list[int] = []
        for i, m in enumerate(matchers):
            if m is None:
                bitmask[i].fill_(-1)
            elif isinstance(m, Matcher):
                if bitmask.shape[-1] != bitmask_width(m.vocab_size):
                    m.fill_next_token_bitmask(bitmask, i)  # raises with the explanation
                ours.append(m)
                rows.append(i)
            else:
                m.fill_next_token_bitmask(bitmask, i)
        if ours:
            self._batch.batch_fill_next_token_bitmask([m.xgr for m in ours], bitmask, rows)
            for m, i in zip(ours, rows):
                m._steer(bitmask, i)
        return bitmask

    def start(
        self, matchers: Sequence[TokenConstraint | None], bitmask: torch.Tensor
    ) -> cf.Future[torch.Tensor]:
        if self._pending is not None and not self._pending.done():
            raise RuntimeError("MaskFiller.start called again before wait()")
        self._pending = self._pool.submit(self.fill, list(matchers), bitmask)
        return self._pending

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError("MaskFiller.wait called without start()")
        fut, self._pending = self._pending, None
        return fut.result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
