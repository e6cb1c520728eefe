"""One request as the engine room sees it (`Sequence`), and what its caller receives (`Output`, `Completion`).

A Sequence is everything the scheduler, the runner, the sampler and the output processor share about a
request: its tokens (prompt, fed, pending, output), its KV pages, its sampling state and its constraint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from agentrt.engine.constraint import TokenConstraint
from agentrt.engine.kv import KVSequence
from agentrt.engine.sampling import SamplingParams
from agentrt.engine.tokens import Detokenizer, StopChecker

__all__ = ["Sequence", "Output", "Completion", "PromptLogprobs"]


@dataclass
class Output:
    """One streamed event: new text and tokens since the last event; the last one has a finish_reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    incomplete: bool = False  # a constrained output cut short before its grammar could end
    error: BaseException | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (the last Output says)
    # with SamplingParams(logprobs=True): each token's log-probability under the model's distribution
    # after the grammar's mask (temperature 1); None for tokens the grammar forced or a controller wrote
    logprobs: list[float | None] | None = None
    # with SamplingParams(top_logprobs=k): per token, the k most likely tokens {id: log-probability} of the
    # same distribution; None for forced or written tokens
    top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    incomplete: bool = False
    logprobs: list[float | None] | None = None
    top_logprobs: list[dict[int, float] | None] | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of prefilled

    @classmethod
    def of(cls, parts: list[Output]) -> Completion:
        """The whole completion a stream of Outputs adds up to."""
        last = parts[-1]
        return cls(
            text="".join(p.text for p in parts),
            token_ids=[t for p in parts for t in p.token_ids],
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            incomplete=last.incomplete,
            cached_tokens=last.cached_tokens,
            logprobs=[lp for p in parts for lp in p.logprobs or []] if any(p.logprobs for p in parts) else None,
            top_logprobs=([t for p in parts for t in p.top_logprobs or []]
                          if any(p.top_logprobs for p in parts) else None),
        )


@dataclass
class PromptLogprobs:
    """How likely the model found each prompt token given the ones before it (`ModelRunner.score_prompt`):
    the model's own distribution, no temperature, penalty or grammar. Index 0 (the first token, which
    nothing predicts) is None in every list."""

    logprobs: list[float | None]
    ranks: list[int | None]  # 1: the model's most likely token there
    top_logprobs: list[dict[int, float] | None]  # the k most likely tokens at each position, best first
    cached_tokens: int = 0  # prompt tokens the prefix cache held before the pass (it prefills them all)


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None
    emit: Callable[[Output], None]  # the caller's end of the stream (see Engine._emit)
    stop_ids: set[int]
    detok: Detokenizer
    stopper: StopChecker
    generator: torch.Generator | None
    control: object | None = None  # a SequenceController: sees every accepted token; may pause, inject, prune
    kv: KVSequence | None = None  # its pages (None while waiting or preempted)
    fed_ids: list[int] = field(default_factory=list)  # tokens whose K/V are in `kv`
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    paused: bool = False  # keeps its pages but is not scheduled (a tool is running)
    removed: list[tuple[int, int]] = field(default_factory=list)  # pruned output spans [a, b), sorted
    prefill_until: int = 0  # fed tokens before this index came by prefill (batch-invariant kernels)
    cached_tokens: int | None = None  # prompt tokens the prefix cache gave it at its first admission

    @classmethod
    def new(cls, id: int, prompt_ids: list[int], params: SamplingParams, constraint: TokenConstraint | None,
            emit: Callable[[Output], None], tokenizer, eos_ids: set[int], device: torch.device,
            control: object | None = None) -> Sequence:
        """A fresh request: its stop ids (EOS unless ignored), detokeniser, stop checker, seeded generator."""
        gen = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        return cls(id, prompt_ids, params, constraint, emit, stop_ids, Detokenizer(tokenizer),
                   StopChecker(params.stop), gen, control=control)

    @property
    def context_length(self) -> int:
        """Tokens the sequence attends over: the prompt and the output less its pruned spans."""
        return len(self.prompt_ids) + len(self.output_ids) - sum(b - a for a, b in self.removed)

    def kept_ids(self) -> list[int]:
        """The prompt and the output less its pruned spans: what a (re-)admission prefills."""
        out, pos = list(self.prompt_ids), 0
        for a, b in self.removed:
            out += self.output_ids[pos:a]
            pos = b
        return out + self.output_ids[pos:]
