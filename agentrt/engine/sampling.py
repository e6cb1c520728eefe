"""Sampling parameters, the grammar masks, and next-token sampling: the step's logits in, tokens out.

Greedy rows are one argmax over the batch; sampled rows apply temperature, top-k and top-p and draw
from a per-request seeded generator, so a seeded request gives the same tokens whatever it shares
the batch with.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
from dataclasses import dataclass, field

import torch

from agentrt.engine.constraint import TokenConstraint, allocate_bitmask
from agentrt.errors import SamplingParamError

__all__ = ["SamplingParams", "MaskFiller", "Sampled", "sample_step", "sample_sequences", "constrained_rows",
           "apply_penalties"]

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's EOS ids
    ignore_eos: bool = False
    logprobs: bool = False  # report each sampled token's log-probability (Output.logprobs)
    top_logprobs: int = 0  # 0..20 most likely alternatives per token (Output.top_logprobs); implies logprobs
    # OpenAI's penalties over the output so far (logit -= frequency * count + presence * [count > 0]) and
    # vLLM's repetition penalty over prompt and output (positive logits divided by it, negative multiplied)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(param: str, why: str) -> SamplingParamError:
            return SamplingParamError(f"invalid {param}: {why}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0.0 <= self.temperature <= 100.0):
            raise bad("temperature", f"must be between 0 and 100, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.top_logprobs:
            self.logprobs = True
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2.0 <= v <= 2.0):
                raise bad(name, f"must be between -2 and 2, got {v!r}")
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and 0.0 < rp <= 100.0):
            raise bad("repetition_penalty", f"must be in (0, 100], got {rp!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


@torch.inference_mode()
def apply_penalties(logits: torch.Tensor, rows: list[tuple[int, SamplingParams, list[int], list[int]]]) -> None:
    """Penalise rows of `logits` in place: (row, params, prompt ids, output ids) for each penalised row."""
    vocab = logits.shape[-1]
    for i, p, prompt, output in rows:
        row = logits[i]
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(output, device=row.device), minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), device=row.device)
            vals = row.index_select(0, seen)
            row.index_copy_(0, seen, torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty))


@dataclass
class Sampled:
    """One step's sampling, row by row: the token, and its log-probabilities where they were asked for."""

    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


@torch.inference_mode()
def sample_step(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                histories: list[tuple[list[int], list[int]]] | None = None) -> Sampled:
    """Sample every row of `logits` ([M, V] fp32, masked already): penalties (with each row's (prompt,
    output) `histories`), then the token, then its log-probabilities from the same distribution (after
    the mask and the penalties, at temperature 1). The tokens and log-probabilities stay on the device
    until one copy to the host at the end: one host sync per step."""
    m = len(params)
    if m == 0:
        return Sampled([], [], [])
    if histories is not None:
        penalized = [(i, p, *h) for i, (p, h) in enumerate(zip(params, histories)) if p.penalized]
        if penalized:
            apply_penalties(logits, penalized)
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _draw(logits[i], p, generators[i])
    rows = [i for i, p in enumerate(params) if p.logprobs]
    k = max((params[i].top_logprobs for i in rows), default=0)
    parts = [tokens.to(torch.float64)]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, index), dim=-1)
        parts.append(logp.gather(1, tokens.index_select(0, index)[:, None]).view(-1).to(torch.float64))
        if k:
            best = logp.topk(k, dim=-1)
            parts += [best.values.reshape(-1).to(torch.float64), best.indices.reshape(-1).to(torch.float64)]
    host = torch.cat(parts).tolist()  # the one sync
    out = Sampled([int(t) for t in host[:m]], [None] * m, [None] * m)
    r = len(rows)
    values, top_v, top_i = host[m:m + r], host[m + r:m + r * (1 + k)], host[m + r * (1 + k):]
    for j, i in enumerate(rows):
        out.logprobs[i] = values[j]
        n = params[i].top_logprobs
        if n:
            pairs = zip(top_i[j * k:j * k + n], top_v[j * k:j * k + n])
            out.top_logprobs[i] = {int(t): lp for t, lp in pairs if lp != float("-inf")}
    return out


def sample_sequences(logits: torch.Tensor, seqs: list) -> Sampled:
    """`sample_step` for sequences (`agentrt.engine.sequence.Sequence`), row i being seqs[i]'s: each
    with its own parameters, seeded generator and (prompt, output) history for the penalties."""
    return sample_step(logits, [s.params for s in seqs], [s.generator for s in seqs],
                       [(s.prompt_ids, s.output_ids) for s in seqs])


def constrained_rows(seqs: list) -> list[tuple[int, TokenConstraint]]:
    """(row, constraint) of the constrained ones among `seqs` (row i: seqs[i]), for `MaskFiller`."""
    return [(i, s.constraint) for i, s in enumerate(seqs) if s.constraint is not None]


def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token from `row` under temperature, top-k and top-p, as a device tensor."""
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.shape[-1])).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[0]


class MaskFiller:
    """The one place the engine room fills and applies grammar token masks.

    `start` fills one bitmask row per constrained sampling row: on a CPU thread while the forward runs
    (XGrammar's overlap), or at once when `overlap` is off; `apply` waits for it and masks the logits."""

    def __init__(self, vocab_size: int, device: torch.device, max_rows: int, overlap: bool | None = None) -> None:
        # Masks are filled on a CPU thread while the forward runs where that thread has a core of its own:
        # on an accelerator, or when torch's threads leave one free. When the forward's threads take every
        # core, the mask thread pre-empts one and the whole forward waits on it (2-core CPU, batch 8:
        # 68 ms/token overlapped vs 56 filled before the forward).
        if overlap is None:
            overlap = device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
        self.vocab_size, self.device, self.max_rows, self.overlap = vocab_size, device, max_rows, overlap
        self.seconds: list[float] = []  # per step, time spent filling masks per row (bounded list)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agentrt-mask")
        self._masks: torch.Tensor | None = None  # reused step to step (pinned on CUDA)
        self._pending: tuple[list[int], torch.Tensor, concurrent.futures.Future] | None = None

    def start(self, constrained: list[tuple[int, TokenConstraint]], rows: int) -> None:
        """Begin filling masks for `constrained` (row, constraint) pairs of a step sampling `rows` rows."""
        self._pending = None
        if not constrained:
            return
        bitmask = self._bitmask(rows)
        done = self._thread.submit(self._fill, constrained, bitmask)
        if not self.overlap:
            done.result()
        self._pending = ([i for i, _ in constrained], bitmask, done)

    def apply(self, logits: torch.Tensor) -> None:
        """Mask `logits` ([rows, V]) with the masks `start` filled (a no-op for a step without constraints)."""
        if self._pending is None:
            return
        rows, bitmask, done = self._pending
        self._pending = None
        done.result()
        _apply_bitmask(logits, bitmask, rows)

    def mask(self, logits: torch.Tensor, constrained: list[tuple[int, TokenConstraint]]) -> None:
        """Fill and apply at once, on this thread (no forward to overlap with)."""
        if constrained:
            bitmask = self._bitmask(logits.shape[0])
            self._fill(constrained, bitmask)
            _apply_bitmask(logits, bitmask, [i for i, _ in constrained])

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(V / 32)] int32, all allowed; one reused buffer."""
        if self._masks is None or self._masks.shape[0] < rows:
            self._masks = allocate_bitmask(max(rows, self.max_rows), self.vocab_size,
                                           pin_memory=self.device.type == "cuda")
        return self._masks[:rows].fill_(-1)

    def _fill(self, constrained: list[tuple[int, TokenConstraint]], bitmask: torch.Tensor) -> None:
        start = time.perf_counter()
        for row, constraint in constrained:
            constraint.fill_next_token_bitmask(bitmask, row)
        if len(self.seconds) < 100_000:
            self.seconds.append((time.perf_counter() - start) / len(constrained))


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    import xgrammar  # its kernels load on the first constrained step

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
