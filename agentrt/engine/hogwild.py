"""Hogwild! inference: N workers decode in one batched forward over one shared, paged KV cache.

Implements Rodionov et al., 2025, "Hogwild! Inference: Parallel LLM Generation via Concurrent Attention"
(arXiv 2504.06261): each block (prompt, finished step, header, a worker's current step) is cached once,
and every worker's view places the blocks at its own offsets by re-rotating keys (RoPE), never recomputing.

Layout of worker w's view (positions dense from 0):
    [common: prompt, finished steps in finishing order] [others header]
    [S_v, pivot  for each other worker v] [own header] [S_w]
Visibility: tokens fed in a forward are visible to every other worker in that same forward (their blocks
sit before the worker's own block, so each view is causal in view order); the logits a worker samples
from are exactly the next-token logits of its view after that forward. Every token's K/V are computed
once, by its writer over the writer's view at that moment; a finished step joins the common history as
the same pages (no copy, no recompute). So, exactly: (1) a worker's logits equal an ordinary forward of
its last token over its view's cached K/V placed at dense positions, for any depth; (2) they equal a fresh
prefill of the view's tokens only where those K/V do not depend on context: the first layer (a one-layer
model). Deeper K/V keep the context their writer saw (Alice's tokens saw Bob's step, which follows them
in Bob's view) - inherent to Hogwild!, which the paper does not recompute either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import torch

from agentrt.engine.collaboration import CollaborationPrompts
from agentrt.engine.constraint import TokenConstraint
from agentrt.engine.delivery import drop
from agentrt.engine.kv import KVSequence
from agentrt.engine.runner import ViewRow, view_keys
from agentrt.engine.sampling import Sampled, SamplingParams, constrained_rows, sample_sequences
from agentrt.engine.sequence import Sequence
from agentrt.errors import EngineClosedError, EngineError, InvalidRequestError

__all__ = ["CollaborationPrompts", "HogwildPool", "HogwildResult", "ViewRecord"]

log = logging.getLogger(__name__)


@dataclass
class HogwildResult:
    answer: str | None  # None when no answer was given and no finisher ran
    texts: list[str]  # what each worker wrote, its step headers included
    token_ids: list[list[int]]  # the same, as token ids (forced headers included, EOS excluded)
    transcript: str  # common history and unfinished steps, as the finisher saw them
    finish_reason: str  # answer | length | stop
    generated_tokens: int  # tokens sampled by the workers (forced text excluded)
    steps: int  # batched forwards


@dataclass
class ViewRecord:
    """What one row attended to in the last forward (kept when `trace=True`, for checks and debugging)."""

    worker: int  # -1: finisher, -2: a header or the prompt
    token_ids: list[int]  # the view's tokens, in view order
    slots: torch.Tensor  # [T] pool slot of each
    stored_positions: torch.Tensor  # [T] position each key was rotated at when written
    logits: torch.Tensor  # [V] next-token logits of the view
    keys: torch.Tensor  # [L, T, KV, D] the keys as attended (finished steps move later, see _join)


@dataclass(eq=False)
class _Block:
    """A run of cached tokens in its own page table; positions are those its writer saw."""

    seq: KVSequence
    ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Worker:
    """A worker (or the finisher): its Sequence, which output processing advances (output_ids: all it
    wrote, forced headers included, its stop token not; pending: what the next forward feeds), and its
    place in the collaboration."""

    index: int
    seq: Sequence
    block: _Block  # its current step
    step_start: int = 0  # where the current step begins in seq.output_ids
    forced: int = 0  # leading forced tokens (the header) of the current step
    step: int = 1
    since_check: int = 0
    ending: bool = False  # the pending token closes the step: join after the next forward
    done: bool = False

    @property
    def step_ids(self) -> list[int]:
        return self.seq.output_ids[self.step_start:]


_Row = tuple[int, list[_Block], _Block, list[int]]  # (label, context blocks, own block, tokens to feed)


class HogwildPool:
    """N workers over one engine's KV pool. `run` / `run_sync` do a whole task; `start`, `step`, `close`
    drive it one batched forward at a time. All model and pool work runs on the engine thread."""

    def __init__(self, engine, workers: int = 2, *, collaborate: bool = True,
                 prompts: CollaborationPrompts | None = None, separator: str = "\n\n",
                 max_step_tokens: int = 256, trace: bool = False, fused: bool | None = None) -> None:
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise InvalidRequestError(f"workers must be an integer from 1 to 64, got {workers!r}", param="workers")
        if max_step_tokens < 1:
            raise InvalidRequestError("max_step_tokens must be >= 1", param="max_step_tokens")
        self.engine = engine
        self.pool = engine.pool
        self.tok = engine.tokenizer
        self.num_workers = workers
        self.prompts = (prompts or CollaborationPrompts()) if collaborate else None
        self.separator = separator
        self.max_step_tokens = max_step_tokens
        self.trace = trace
        self.views: list[ViewRecord] = []  # the last forward's rows, when tracing
        # steps of few tokens run the fused step (CUDA graphs on a GPU): views as slot tables + key deltas
        self._fused = engine.cuda_graphs if fused is None else fused
        self._seqs: list[KVSequence] = []
        self._keys: dict = {}  # the blocks' slots and stored positions between forwards (runner.view_keys)
        self._owner: object | None = None  # the run holding the pages
        self._reset(SamplingParams(), 0, None)

    # --- public API -----------------------------------------------------------------------------
    async def run(self, task: str | list[int], *, max_tokens: int = 512, params: SamplingParams | None = None,
                  answer_tokens: int = 64, constraint: TokenConstraint | None = None) -> HogwildResult:
        """Solve `task` with all workers until an answer or `max_tokens` sampled tokens in total.

        params: temperature / top_p / top_k / seed for the workers (its max_tokens is not used).
        constraint: e.g. an `agentrt.grammar` matcher for a JSON schema; the finisher answers under it.
        Cancelling the call returns every page to the pool.
        """
        owner = object()
        gen = self._drive(task, owner, max_tokens, params, answer_tokens, constraint)
        try:
            fn = next(gen)
            while True:  # shield: a cancelled await must not cancel the engine-side call midway
                fn = gen.send(await asyncio.shield(asyncio.wrap_future(self._call(fn))))
        except StopIteration as stop:
            return stop.value
        finally:
            try:
                await asyncio.shield(asyncio.wrap_future(self._call(lambda: self._release(owner))))
            except EngineClosedError:
                pass  # the pool went away with the engine

    def run_sync(self, task: str | list[int], *, max_tokens: int = 512, params: SamplingParams | None = None,
                 answer_tokens: int = 64, constraint: TokenConstraint | None = None) -> HogwildResult:
        """Blocking twin of `run` (not from inside an event loop)."""
        owner = object()
        gen = self._drive(task, owner, max_tokens, params, answer_tokens, constraint)
        try:
            fn = next(gen)
            while True:
                fn = gen.send(self._call(fn).result())
        except StopIteration as stop:
            return stop.value
        finally:
            self._close(owner)

    def start(self, task: str | list[int], *, max_tokens: int = 512, params: SamplingParams | None = None) -> None:
        """Prefill the task and the workers' openings (sampling their first tokens)."""
        prompt = self._prompt_ids(task)
        self._call(lambda: self._begin(prompt, params or SamplingParams(), max_tokens, object())).result()

    def step(self) -> bool:
        """One batched forward for all workers; False once the run has finished."""
        return bool(self._call(self._step).result())

    def close(self) -> None:
        """Return every page this pool holds (idempotent)."""
        self._close(None)

    def result(self) -> HogwildResult:
        """The run so far (after `start` / `step`; no finisher): texts, tokens, steps, finish reason."""
        return self._call(self._result).result()

    def view_ids(self, worker: int) -> list[int]:
        """Worker `worker`'s view as token ids: what it sees right now."""
        return [t for b in [*self._context(self._workers[worker]), self._workers[worker].block] for t in b.ids]

    # --- driving (sync and async share this) ------------------------------------------------------
    def _call(self, fn: Callable[[], object]):
        return self.engine.call(lambda _engine: fn())

    def _close(self, owner: object | None) -> None:
        try:
            self._call(lambda: self._release(owner)).result()
        except EngineClosedError:
            pass  # the pool went away with the engine

    def _drive(self, task, owner: object, max_tokens: int, params: SamplingParams | None, answer_tokens: int,
               constraint: TokenConstraint | None) -> Generator[Callable[[], object], object, HogwildResult]:
        """Yields the functions to run on the engine thread, one per forward; returns the result."""
        prompt = self._prompt_ids(task)
        yield lambda: self._begin(prompt, params or SamplingParams(), max_tokens, owner)
        while (yield self._step):
            pass
        if self.prompts is not None and (constraint is not None or self._answer is None):
            suffix = self.tok.encode(self.prompts.finisher + self.prompts.answer_marker, add_special_tokens=False)
            yield lambda: self._begin_finisher(suffix, constraint, answer_tokens)
            while (yield self._finisher_step):
                pass
        log.info("hogwild: %d workers, %d tokens in %d steps, %s", self.num_workers, self._generated, self._steps,
                 self._reason)
        return self._result()

    def _prompt_ids(self, task: str | list[int]) -> list[int]:
        if not isinstance(task, str) or self.prompts is None:
            return self.engine.encode(task)
        ids = self.engine.chat_prompt([{"role": "system", "content": self.prompts.system(self.num_workers)},
                                       {"role": "user", "content": task}])
        return ids + self._encode(self.prompts.history_header)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    # --- engine thread: state ----------------------------------------------------------------------
    def _reset(self, params: SamplingParams, max_tokens: int, common: _Block | None) -> None:
        self._params, self._max_tokens = params, max_tokens
        self._common: list[_Block] = [common] if common else []
        self._headers: tuple[_Block, _Block, _Block] | None = None  # others, pivot, own
        self._workers: list[_Worker] = []
        self._finisher: _Worker | None = None
        self._answer: str | None = None
        self._reason = "length"
        self._generated = self._steps = 0
        self._running = False

    def _new_block(self) -> _Block:
        block = _Block(KVSequence())
        self._seqs.append(block.seq)
        return block

    def _release(self, owner: object | None = None) -> None:
        """Free every block's pages (only `owner`'s run, when given: never another run's)."""
        if owner is not None and owner is not self._owner:
            return
        for seq in self._seqs:
            self.pool.free(seq)
        self._seqs.clear()
        self._keys.clear()
        self._running, self._owner = False, None

    def _context(self, me: _Worker | None) -> list[_Block]:
        """The blocks before `me`'s own step in its view (me=None: the finisher's view, everyone's steps)."""
        out = list(self._common)
        others, pivot, own = self._headers or (None, None, None)
        if others is not None:
            out.append(others)
        for w in self._workers:
            if w is not me:
                out.append(w.block)
                if pivot is not None:
                    out.append(pivot)
        if me is not None and own is not None:
            out.append(own)
        return out

    def _begin(self, prompt: list[int], params: SamplingParams, max_tokens: int, owner: object) -> None:
        if self._owner is not None:
            raise EngineError("this HogwildPool is running a task: one run at a time (make another pool)")
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens must be >= 1", param="max_tokens")
        self._owner = owner
        try:
            self._prefill(prompt, params, max_tokens)
        except BaseException:
            self._release()
            raise

    def _prefill(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> None:
        self._reset(params, max_tokens, self._new_block())
        self._running = True
        first = self._run([(-2, [], self._common[0], prompt)])  # [1, V]
        for w in range(self.num_workers):  # worker w draws from seed + w; steps end at the separator
            seed = None if params.seed is None else params.seed + w
            own = replace(params, seed=seed, stop=[], max_tokens=self.engine.max_context)
            self._workers.append(_Worker(w, self._sequence(prompt, own), self._new_block()))
        if self.prompts is None:  # plain mode: every worker samples its first token from the prompt
            self._accept(self._workers, first.expand(self.num_workers, -1).clone())
            return
        p = self.prompts
        self._headers = (self._new_block(), self._new_block(), self._new_block())
        rows: list[_Row] = [(-2, self._common[:], h, self._encode(text))
                            for h, text in zip(self._headers, (p.others_header, p.pivot, p.own_header))]
        for w in self._workers:
            self._force(w, self._encode(p.opening(w.index)))
            rows.append((w.index, self._context(w), w.block, w.seq.pending))
        logits = self._run(rows)
        self._steps += 1
        for w in self._workers:
            w.seq.pending = []
        self._accept(self._workers, logits[3:])

    def _sequence(self, prompt: list[int], params: SamplingParams,
                  constraint: TokenConstraint | None = None) -> Sequence:
        """A Sequence for a worker or the finisher: sampled and advanced as the engine's requests are."""
        return Sequence.new(0, prompt, params, constraint, drop, self.tok, self.engine.eos_token_ids,
                            self.pool.k.device)

    def _force(self, w: _Worker, tokens: list[int]) -> None:
        """Start `w`'s next step with forced text (its header): written into it, fed by the next forward."""
        w.step_start, w.forced = len(w.seq.output_ids), len(tokens)
        self.engine.output.injected(w.seq, tokens)

    # --- engine thread: one step -----------------------------------------------------------------
    def _step(self) -> bool:
        active = [w for w in self._workers if w.seq.pending and not w.done]
        if not self._running or not active:
            return False
        longest = max(sum(len(b.ids) for b in self._context(w)) + len(w.block.ids) for w in active)
        if longest + sum(len(w.seq.pending) for w in active) + 1 >= self.engine.max_context:
            log.info("hogwild: views reached the context limit (%d)", self.engine.max_context)
            self._running = False
            return False
        logits = self._run([(w.index, self._context(w), w.block, w.seq.pending) for w in active])  # [R, V]
        self._steps += 1
        sampling, rows = [], []
        for r, w in enumerate(active):
            w.seq.pending = []
            if w.ending:  # the step's last token is cached: the step joins the common history as is
                self._join(w)
                if w.seq.pending:  # forced text (the next step's header) goes first
                    continue
            sampling.append(w)
            rows.append(r)
        self._accept(sampling, logits[rows])
        return self._running

    def _join(self, w: _Worker) -> None:
        # Re-rotate the finished step once to where it now sits in every view (the history comes
        # first in all of them), so later forwards need not re-rotate it per view and layer. Its
        # tokens were written at their writer's view positions, which jump whenever another worker's
        # step (placed before it) grew: the move is per token, onto dense positions.
        offset = sum(len(b.ids) for b in self._common)
        seq = w.block.seq
        moves = [offset + i - p for i, p in enumerate(seq.positions)]
        if any(moves):
            self.pool.reposition(seq, 0, seq.length, moves, self.engine.model.rotary)
            self._keys.pop(id(seq), None)
        self._common.append(w.block)
        w.block, w.ending, w.step = self._new_block(), False, w.step + 1
        prefix = ""
        if self.prompts is not None:  # a step cut at max_step_tokens still ends its paragraph
            cut = not self.tok.decode(w.step_ids[-2:]).endswith(self.separator)
            prefix = (self.separator if cut else "") + self.prompts.step_prefix(w.index, w.step)
            if w.since_check >= self.prompts.check_every:
                prefix, w.since_check = prefix + self.prompts.check, 0
        self._force(w, self._encode(prefix))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
        """The engine's one mask path and its sampler over the rows of `logits` (row i: seqs[i])."""
        self.engine.masks.mask(logits, constrained_rows(seqs))
        return sample_sequences(logits, seqs)

    def _accept(self, workers: list[_Worker], logits: torch.Tensor) -> None:
        """Sample each worker's next token and take it as the engine takes a request's; then see what it
        means for the run: a step's end, an answer, a worker done (EOS), the budget spent."""
        if not workers:
            return
        out = self._sample(logits, [w.seq for w in workers])
        for w, t, logprob, top in zip(workers, out.tokens, out.logprobs, out.top_logprobs):
            if self._generated >= self._max_tokens:
                self._reason, self._running = "length", False
                return
            if self._take(w, t, logprob, top):
                w.done = True
                self._check_answer(w)
                if all(x.done for x in self._workers) and self._running:
                    self._reason, self._running = "stop", False
                continue
            self._generated += 1
            w.since_check += 1
            written = len(w.step_ids) - w.forced
            if self.separator in self.tok.decode(w.step_ids[-min(2, written):]) or written >= self.max_step_tokens:
                w.ending = True
                self._check_answer(w)
        if self._generated >= self._max_tokens and self._running:
            self._reason, self._running = "length", False

    def _take(self, w: _Worker, token: int, logprob: float | None = None, top: dict | None = None) -> bool:
        """Output processing of a sampled token (the engine's: grammar, stop token, jump-forward, pending);
        True if it ended the sequence, whose stop token then leaves its output."""
        seq = w.seq
        if self.engine.output.sampled(seq, token, logprob, top).finish is None:
            return False
        if seq.output_ids and seq.output_ids[-1] in seq.stop_ids:
            seq.output_ids.pop()
        return True

    def _check_answer(self, w: _Worker) -> None:
        marker = self.prompts.answer_marker if self.prompts is not None else None
        text = self.tok.decode(w.step_ids, skip_special_tokens=True)
        if marker and marker in text and self._answer is None:
            self._answer = text.rsplit(marker, 1)[1].strip()
            self._reason, self._running = "answer", False

    # --- engine thread: the finisher ---------------------------------------------------------------
    def _begin_finisher(self, suffix: list[int], constraint: TokenConstraint | None, answer_tokens: int) -> None:
        seq = self._sequence(suffix, SamplingParams(max_tokens=answer_tokens), constraint)  # greedy
        seq.pending = list(suffix)
        self._finisher = _Worker(-1, seq, self._new_block())

    def _finisher_step(self) -> bool:
        f = self._finisher
        logits = self._run([(-1, self._context(None), f.block, f.seq.pending)])  # [1, V]
        f.seq.pending = []
        ended = self._take(f, self._sample(logits, [f.seq]).tokens[0])
        text = self.tok.decode(f.seq.output_ids, skip_special_tokens=True)
        if ended or (f.seq.constraint is None and "\n" in text.strip()):  # unconstrained: one line
            self._answer = text.strip()
            return False
        return True

    def _result(self) -> HogwildResult:
        ids = [w.seq.output_ids for w in self._workers]
        transcript_blocks = self._context(None)[1:]  # without the prompt
        return HogwildResult(
            answer=self._answer,
            texts=[self.tok.decode(i, skip_special_tokens=True) for i in ids],
            token_ids=ids,
            transcript=self.tok.decode([t for b in transcript_blocks for t in b.ids], skip_special_tokens=True),
            finish_reason=self._reason,
            generated_tokens=self._generated,
            steps=self._steps,
        )

    # --- engine thread: the batched forward ----------------------------------------------------------
    def _run(self, rows: list[_Row]) -> torch.Tensor:
        """The runner's forward over the rows' views (each row's tokens join its own block); rows see
        each other's tokens of this forward. Next-token logits after each row's last token: [R, V]."""
        logits = self.engine.runner.run_views([ViewRow([b.seq for b in ctx], own.seq, new)
                                               for _, ctx, own, new in rows], self._fused, self._keys)
        for _, _, own, new in rows:
            own.ids += new
        if self.trace:
            self.views = []
            for r, (label, ctx, own, _) in enumerate(rows):
                slots, stored = view_keys(self.pool, [b.seq for b in (*ctx, own)], self._keys)
                self.views.append(ViewRecord(label, [x for b in (*ctx, own) for x in b.ids], slots, stored,
                                             logits[r].clone(), self.pool.k[:, slots].clone()))
        return logits
