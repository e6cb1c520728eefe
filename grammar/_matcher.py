"""The per-sequence matcher the engine drives (agentrt.engine.constraint.TokenConstraint over xgrammar's
GrammarMatcher, or llguidance's where that backend serves the grammar): the engine's one mask filler
(agentrt.engine.sampling.MaskFiller) asks it for its row of the step's bitmask while the forward runs
(XGrammar's overlap). Near the end of a token budget a matcher can steer JSON to close (`close_by`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import xgrammar as xgr

from agentrt.engine.constraint import TokenConstraint, bitmask_width
from agentrt.grammar._boundary import TokenBoundaries
from agentrt.grammar._llguidance import LLGuidanceGrammar

if TYPE_CHECKING:
    from agentrt.grammar._compiler import CompiledConstraint

__all__ = ["MAX_JUMP_FORWARD", "Matcher"]

MAX_JUMP_FORWARD = 256


class Matcher:
    """Tracks one sequence's position in its grammar; implements `TokenConstraint`.

    `stop_token_ids` overrides the tokenizer's end-of-sequence ids (the grammar then ends with
    one of these). `warnings` are the compiled constraint's warnings.
    """

    def __init__(self, compiled: CompiledConstraint, *, stop_token_ids: list[int] | None = None) -> None:
        self.compiled = compiled
        info = compiled.grammar.tokenizer_info
        self.vocab_size = int(info.vocab_size)
        self.stop_token_ids = list(stop_token_ids if stop_token_ids is not None else info.stop_token_ids)
        # the backend's own matcher: xgrammar's, or llguidance's behind the same methods
        self.xgr = (compiled.grammar.matcher(self.stop_token_ids) if isinstance(compiled.grammar, LLGuidanceGrammar)
                    else xgr.GrammarMatcher(compiled.grammar, override_stop_tokens=stop_token_ids))
        self._vocab = _boundaries(compiled).vocab  # each token's bytes (one list per tokenizer)
        self.num_accepted = 0
        self.closing_from: int | None = None  # see close_by
        self.max_tokens: int | None = None
        self.text = bytearray()  # the accepted tokens' bytes
        self.in_string = False  # whether `text` ends inside a JSON string (see _feed)
        self._escaped = False
        self.depth = 0  # brackets open outside strings
        self._marks: list[tuple[int, bool, bool, int]] = []  # per accepted token: (len(text), in_string, escaped, depth) before it
        # after jump-forward: (tokens accepted once its commit is in, the forced rest's first canonical token)
        self._rest: tuple[int, int] | None = None

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
        self._canonical(bitmask, index)
        self._steer(bitmask, index)

    def _canonical(self, bitmask: torch.Tensor, index: int) -> None:
        """Where forced text is left to the sampler (`forced_tokens`), mask the tokens that spell only
        part of its first canonical token (see agentrt.grammar._boundary)."""
        if self._rest is None or self._rest[0] != self.num_accepted:
            return
        row, first = bitmask[index], self._rest[1]
        if not int(row[first // 32]) & _bit(first % 32):
            return  # the canonical token is not allowed here: leave the grammar's mask alone
        for t in _boundaries(self.compiled).strict_prefixes(first):
            row[t // 32] &= ~_bit(t % 32)

    @property
    def near_budget(self) -> bool:
        """Past `close_by`'s reserve, or with barely more tokens left than brackets to close."""
        if self.closing_from is None or self.max_tokens is None:
            return False
        return self.num_accepted >= self.closing_from or self.max_tokens - self.num_accepted <= self.depth + 4

    def _steer(self, bitmask: torch.Tensor, index: int) -> None:
        if not self.near_budget or self.is_completed():
            return
        words = bitmask.shape[-1]
        # inside a string only a closing quote closes it (a '}' there would be string content)
        for kind in (("string",) if self.in_string else ("brackets", "any")):
            closing = bitmask[index] & _closers(self.compiled, words, kind)
            if bool(closing.any()):
                bitmask[index] = closing
                return

    def _stop_row(self, like: torch.Tensor) -> torch.Tensor:
        """A bitmask row with only the stop tokens' bits set."""
        row = torch.zeros_like(like)
        for t in self.stop_token_ids:
            if 0 <= t < row.shape[0] * 32:
                row[t // 32] |= _bit(t % 32)
        return row

    def _end_only(self, bitmask: torch.Tensor, index: int) -> None:
        """Allow only the stop tokens, when the grammar can end here (else leave the mask as it is)."""
        ends = bitmask[index] & self._stop_row(bitmask[index])
        if bool(ends.any()):
            bitmask[index] = ends

    def close_by(self, max_tokens: int, reserve: int | None = None) -> None:
        """Steer open JSON values to close within `max_tokens` accepted tokens: once `reserve` or
        fewer are left (default max_tokens // 8 within 16..32: room for a few closing brackets and
        a tool call's end tag) and the grammar cannot end yet, only closing tokens are allowed
        whenever the grammar allows one: inside a string a closing quote (`"`, `"}`, ...), outside
        one brackets (`}`, `]}`, ...), else anything that starts with `"`, `]` or `}`. A weak
        model looping inside a tool call then ends it with a complete, shortened value instead of
        running out of tokens mid-value; outputs that end earlier are untouched."""
        reserve = min(32, max(16, max_tokens // 8)) if reserve is None else reserve
        self.closing_from = max(0, max_tokens - reserve)
        self.max_tokens = max_tokens

    def accept_token(self, token_id: int) -> bool:
        ok = bool(self.xgr.accept_token(int(token_id)))
        if ok:
            self.num_accepted += 1
            self._marks.append((len(self.text), self.in_string, self._escaped, self.depth))
            if not self.xgr.is_terminated() and 0 <= token_id < len(self._vocab):
                self._feed(self._vocab[token_id])
        return ok

    def _feed(self, piece: bytes) -> None:
        """Append accepted bytes and follow JSON string state (quotes, backslash escapes)."""
        self.text += piece
        in_string, escaped, depth = self.in_string, self._escaped, self.depth
        for b in piece:
            if escaped:
                escaped = False
            elif in_string and b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = not in_string
            elif not in_string and b in b"{[":
                depth += 1
            elif not in_string and b in b"}]":
                depth = max(0, depth - 1)
        self.in_string, self._escaped, self.depth = in_string, escaped, depth

    def accept_string(self, text: str) -> bool:
        """Advance past forced text (jump-forward) without tokens; rollback does not undo this."""
        return bool(self.xgr.accept_string(text))

    def is_terminated(self) -> bool:
        return bool(self.xgr.is_terminated())

    def is_completed(self) -> bool:
        """True when the output so far is a complete match (a stop token would be accepted)."""
        return bool(self.xgr.is_completed())

    def find_jump_forward_string(self) -> str:
        """The text the grammar forces next, at most MAX_JUMP_FORWARD characters of it (a long forced
        run is taken a piece per step; `agentrt.grammar` refuses grammars that force endless ones)."""
        return str(self.xgr.find_jump_forward_string())[:MAX_JUMP_FORWARD]

    def forced_tokens(self, encode: Callable[[str], list[int]]) -> list[int]:
        """Tokens of the forced text (`encode` gives its canonical tokenisation) that end before any
        token could straddle its end (`TokenBoundaries`); not yet accepted."""
        forced = self.find_jump_forward_string()
        self._rest = None
        if not forced:
            return []
        ids, bounds = encode(forced), _boundaries(self.compiled)
        commit = bounds.commit(forced, ids)
        if len(ids) > len(commit) and bounds.spells(forced, ids):
            self._rest = (self.num_accepted + len(commit), int(ids[len(commit)]))
        return commit

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: only {self.num_accepted} accepted")
        self.xgr.rollback(num_tokens)
        self.num_accepted -= num_tokens
        if num_tokens:
            n, self.in_string, self._escaped, self.depth = self._marks[-num_tokens]
            del self._marks[-num_tokens:], self.text[n:]

    def reset(self) -> None:
        self.xgr.reset()
        self.num_accepted = 0
        self.text.clear()
        self._marks.clear()
        self.in_string = self._escaped = False
        self.depth = 0


assert issubclass(Matcher, TokenConstraint)

_BOUNDARIES: dict[str, TokenBoundaries] = {}  # tokenizer fingerprint -> its token prefixes


def _boundaries(compiled: CompiledConstraint) -> TokenBoundaries:
    b = _BOUNDARIES.get(compiled.tokenizer) if compiled.tokenizer else None
    if b is None:
        b = TokenBoundaries(compiled.grammar.tokenizer_info.decoded_vocab)
        if compiled.tokenizer:
            _BOUNDARIES[compiled.tokenizer] = b
    return b


_CLOSERS: dict[tuple[str, int, str], torch.Tensor] = {}  # (tokenizer fingerprint, words, kind) -> packed row
_CLOSER_TEXT = {
    "string": re.compile(rb'"[\]}\s]*'),  # a closing quote, then brackets: '"', '"}', '"]}'
    "brackets": re.compile(rb"[\]}][\]}\s]*"),  # only brackets and whitespace: '}', ']}', '}}'
    "any": re.compile(rb'["\]}].*', re.DOTALL),  # starts with one ('"' may open a value that must come)
}


def _bit(i: int) -> int:
    return (1 << i) - (1 << 32) if i == 31 else 1 << i  # bit i of an int32 word


def _closers(compiled: CompiledConstraint, words: int, kind: str) -> torch.Tensor:
    """One packed bitmask row: the tokens whose text closes open JSON in the way `kind` says."""
    key = (compiled.tokenizer, words, kind)
    if key not in _CLOSERS or not compiled.tokenizer:
        vocab = _boundaries(compiled).vocab
        pattern = _CLOSER_TEXT[kind]
        bits = np.zeros(words * 32, dtype=np.uint64)
        bits[[i for i, t in enumerate(vocab) if t and pattern.fullmatch(t)]] = 1
        packed = (bits.reshape(words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
        _CLOSERS[key] = torch.from_numpy(packed.astype(np.uint32).view(np.int32))
    return _CLOSERS[key]

