"""The per-sequence token constraint the engine drives (filled in by agentrt.grammar).

The shape follows xgrammar's GrammarMatcher so a matcher can serve directly: the engine asks each
constrained sequence to fill its row of a packed int32 bitmask ([batch, ceil(vocab / 32)], bit set
= token allowed) while the forward step runs, applies the mask to the logits, samples, and then
reports the sampled token back with `accept_token`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["TokenConstraint", "bitmask_width", "allocate_bitmask", "jump_forward_tokens"]


@runtime_checkable
class TokenConstraint(Protocol):
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed-token bits for the next token into row `index` of `bitmask`."""

    def accept_token(self, token_id: int) -> bool:
        """Advance past a sampled or forced token; False if the grammar rejects it."""

    def is_terminated(self) -> bool:
        """True once the grammar has accepted a stop token: the sequence ends with `stop`."""

    def find_jump_forward_string(self) -> str:
        """A string the grammar forces next ("" when nothing is forced); not yet accepted."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """[batch, ceil(V / 32)] int32, all bits set (every token allowed). Pinned, its copy to a GPU is
    async; pinning is slow, so keep a pinned one and reuse it (the engine does)."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def jump_forward_tokens(constraint: TokenConstraint, tokenizer) -> list[int]:
    """The tokens of `constraint`'s forced text that are safe to commit without sampling (not yet
    accepted). A constraint that knows its vocabulary (`forced_tokens`, as agentrt.grammar's Matcher)
    stops where no token can straddle the end of the forced text; any other keeps back the last
    token of its canonical tokenisation, which is the one that could merge with what follows."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    forced_tokens = getattr(constraint, "forced_tokens", None)
    if callable(forced_tokens):
        return forced_tokens(encode)
    forced = constraint.find_jump_forward_string()
    return encode(forced)[:-1] if forced else []
