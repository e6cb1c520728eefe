"""What a step's tokens do to their sequence: the grammar accepts them, jump-forward extends them, stop
strings, EOS and the length limits end them, controllers see them; the caller gets `Output`s.

The processor changes sequences and returns what to send; delivering and freeing are the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agentrt.engine.constraint import jump_forward_tokens
from agentrt.engine.sequence import Output, Sequence
from agentrt.errors import EngineError

if TYPE_CHECKING:
    from agentrt.engine.control import SequenceHandle

__all__ = ["OutputProcessor", "Processed"]


@dataclass
class Processed:
    """The result of taking tokens: Outputs to stream, and the finish reason if the sequence ended."""

    outputs: list[Output] = field(default_factory=list)
    finish: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer, max_context: int, handle: Callable[[Sequence], SequenceHandle]) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._handle = handle  # the handle a controller acts through

    def sampled(self, seq: Sequence, token: int, logprob: float | None = None,
                top: dict[int, float] | None = None, queued: bool = False) -> Processed:
        """Take a sampled token: grammar, stop conditions, jump-forward. `queued`: the token is on the
        sequence's pending already (the overlap scheduler feeds it before taking it)."""
        c = seq.constraint
        if c is not None and not c.accept_token(token):
            raise EngineError(f"grammar rejected sampled token {token}")
        seq.output_ids.append(token)
        if token in seq.stop_ids and (c is None or c.is_terminated()):
            return Processed(finish="stop")
        return self._take(seq, [token], logprob, top, queued)

    def injected(self, seq: Sequence, tokens: list[int]) -> Processed:
        """Take tokens a controller writes into the sequence (accepted by its constraint, fed by prefill)."""
        c = seq.constraint
        for i, t in enumerate(tokens):
            if c is not None and not c.accept_token(t):
                raise EngineError(f"the grammar rejected injected token {t} "
                                  f"({self.tokenizer.decode(tokens[:i + 1])!r})")
        if not tokens:
            return Processed()
        seq.output_ids.extend(tokens)
        return self._take(seq, list(tokens))

    def final(self, seq: Sequence, reason: str, error: BaseException | None = None) -> Output:
        """The last Output of a sequence that ends with `reason`."""
        incomplete = reason == "length" and seq.constraint is not None and not seq.constraint.is_terminated()
        tail = "" if seq.stopper.stopped else seq.stopper.flush()
        return Output(tail, [], reason, len(seq.prompt_ids), len(seq.output_ids), incomplete, error,
                      cached_tokens=seq.cached_tokens or 0)

    def _take(self, seq: Sequence, new: list[int], logprob: float | None = None,
              top: dict[int, float] | None = None, queued: bool = False) -> Processed:
        """Tokens accepted and appended to the output: jump-forward, stop conditions, stream out, control."""
        c = seq.constraint
        if c is not None and not c.is_terminated():
            new += self._jump_forward(seq)
        text = seq.stopper.push(seq.detok.push(new))
        ended = seq.stopper.stopped or (c is not None and c.is_terminated())
        if not ended:
            seq.pending.extend(new[1:] if queued else new)
        pad = [None] * (len(new) - 1)
        out = Output(text, new, logprobs=[logprob] + pad if seq.params.logprobs else None,
                     top_logprobs=[top] + pad if seq.params.top_logprobs else None)
        if seq.control is not None:
            seq.control.on_tokens(self._handle(seq), new)
        if ended:
            return Processed([out], "stop")
        if len(seq.output_ids) >= seq.params.max_tokens or seq.context_length >= self.max_context:
            return Processed([out], "length")
        return Processed([out])

    def _jump_forward(self, seq: Sequence) -> list[int]:
        ids = jump_forward_tokens(seq.constraint, self.tokenizer)  # up to a safe token boundary
        accepted: list[int] = []
        for t in ids[: seq.params.max_tokens - len(seq.output_ids)]:
            if not seq.constraint.accept_token(t):
                break
            accepted.append(t)
        seq.output_ids.extend(accepted)
        return accepted
