"""The engine: one thread owns the model, the KV pool and the device; callers stream tokens from it.

Continuous batching: every step, running sequences feed their pending tokens (one for a decoding
sequence, a chunk of the prompt for a prefilling one, forced tokens after jump-forward), within a
token budget. Grammar masks for the sequences that sample this step are filled on a CPU thread
while the forward runs, then applied before sampling (XGrammar's overlap).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from agentrt.constraint import TokenConstraint, allocate_bitmask, jump_forward_tokens
from agentrt.control import SequenceController, SequenceHandle
from agentrt.errors import (ContextLengthError, EngineClosedError, EngineError, InvalidRequestError,
                            KVCacheError)
from agentrt.kv import KVPool, KVSequence, OutOfPagesError
from agentrt.exact import DETERMINISTIC_TILES, PREFILL_TILES, Tiles
from agentrt.model import AttentionGroup, BatchInput, ExactRows, Transformer, shared_prefix
from agentrt.sampling import Detokenizer, SamplingParams, StopChecker, apply_penalties, sample, token_logprobs

__all__ = ["Engine", "Output", "Completion", "feed_sequence"]

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None
    emit: Callable[[Output], None]
    stop_ids: set[int]
    detok: Detokenizer
    stopper: StopChecker
    generator: torch.Generator | None
    seq: KVSequence | None = None
    fed_ids: list[int] = field(default_factory=list)  # tokens whose K/V are in `seq`
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    control: SequenceController | None = None  # sees every accepted token; may pause, inject, prune
    paused: bool = False  # keeps its pages but is not scheduled (a tool is running)
    removed: list[tuple[int, int]] = field(default_factory=list)  # pruned output spans [a, b), sorted
    prefill_until: int = 0  # fed tokens before this index came by prefill (batch-invariant kernels)

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


@dataclass
class _Work:
    req: _Request
    n: int  # tokens fed this step
    samples: bool  # its pending runs out this step: sample a next token
    exact: bool = False  # fed by the batch-invariant kernels (prefill; every row when deterministic)


class Engine:
    def __init__(self, model: Transformer, tokenizer, *, eos_token_ids: list[int] | None = None,
                 kv_tokens: int = 32768, page_size: int = 16, max_batch_tokens: int = 512,
                 max_batch_size: int = 32, name: str = "", mask_overlap: bool | None = None,
                 cuda_graphs: bool | None = None, deterministic: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.cfg
        self.device = model.embed.weight.device
        self.vocab_size = cfg.vocab_size
        num_pages = -(-kv_tokens // page_size)
        self.pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_pages, page_size,
                           dtype=model.embed.weight.dtype, device=self.device)
        self.max_context = min(cfg.max_position, num_pages * page_size)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        # Grammar masks are filled on a CPU thread while the forward runs, where that thread has a core
        # of its own: on an accelerator, or when torch's threads leave one free. When the forward's
        # threads take every core, the mask thread pre-empts one and the whole forward waits on it
        # (2-core CPU, batch 8: 68 ms/token overlapped vs 56 filled before the forward).
        if mask_overlap is None:
            mask_overlap = self.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)
        self.mask_overlap = mask_overlap  # False: fill the masks before the forward
        self.mask_seconds: list[float] = []  # per step, time spent filling masks (bounded list)
        eos = set(eos_token_ids or [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        # Prefills always run the batch-invariant kernels (agentrt.exact), so a prefix read from the cache
        # equals a fresh prefill. Deterministic mode runs every row through them, decode steps included:
        # a request's tokens then never depend on what shares its batch (costlier decode; RESULTS.md).
        if deterministic is None:
            deterministic = os.environ.get("AGENTRT_DETERMINISTIC", "") not in ("", "0")
        self.deterministic = bool(deterministic)
        self._tiles = DETERMINISTIC_TILES if self.deterministic else PREFILL_TILES
        self._ids = itertools.count(1)
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # async consumers' Outputs of this step
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agentrt-mask")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.steps = 0
        # decode steps replay CUDA graphs of the fused step (default: on CUDA when Triton is there)
        if cuda_graphs is None:
            from agentrt.kernels import triton_ready

            cuda_graphs = triton_ready(self.device) and _graphable(cfg) and not self.deterministic
        if cuda_graphs and self.deterministic:
            raise InvalidRequestError("deterministic mode runs the batch-invariant kernels, not CUDA graphs",
                                      param="cuda_graphs")
        self._masks: torch.Tensor | None = None  # grammar bitmasks, reused step to step
        # a CUDA forward returns before it is computed: outputs are delivered while it runs
        self._async_forward = self.device.type == "cuda"
        self._graphs = self._view_graphs = None
        if cuda_graphs:
            from agentrt.cuda_graphs import DecodeGraphs

            # every step the scheduler builds (decodes, jump-forward and prefill chunks) replays a graph
            self._graphs = DecodeGraphs(model, self.pool, max_batch_tokens, max_batch_size, self.max_context)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, model: str = "smollm2-135m", *, device: str | None = None,
             dtype: torch.dtype | str | None = None, quant: str | None = None, **kwargs) -> Engine:
        """Resolve a model name (embedded, tiny-random, local dir, hub id) and build an engine for it.

        dtype: a torch dtype or its name; None or "auto" picks bf16 where the hardware runs it natively
        (CUDA, CPUs with AVX512-BF16 / AMX), else fp32 (see `resolve_dtype`). quant: "gguf", "int8",
        "none" or None / "auto" (weight-only quantized linears on the CPU, see `agentrt.quant`)."""
        from agentrt.model import load_transformer, read_generation_eos, resolve_dtype
        from agentrt.models import resolve_model
        from transformers import AutoTokenizer

        path = resolve_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dtype = resolve_dtype(dtype, device)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="dtype") from None
        tok = AutoTokenizer.from_pretrained(path)
        net = load_transformer(path, dtype=dtype, device=device, quant=quant)
        return cls(net, tok, eos_token_ids=read_generation_eos(path), name=str(model), **kwargs)

    # --- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of `messages` under the model's chat template, ready for the assistant's turn."""
        return template_ids(self.tokenizer, messages, **template_kwargs)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not prompt or any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError("prompt token ids must be a non-empty list of ids within the vocabulary",
                                      param="prompt")
        return list(prompt)

    # --- public API (any thread) -------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               constraint: TokenConstraint | None = None, *, emit: Callable[[Output], None],
               control: SequenceController | None = None) -> int:
        """Queue a request; `emit` is called on the engine thread with each Output. Returns its id.

        `control` (thread mode) sees each accepted token on the engine thread and may pause the sequence,
        write tokens into it and prune its KV cache (see agentrt.control)."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(ids) >= self.max_context:
            raise ContextLengthError(len(ids), self.max_context)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        req = _Request(next(self._ids), ids, params, constraint, emit, stop_ids, Detokenizer(self.tokenizer),
                       StopChecker(params.stop), gen, control=control)
        self._send(lambda: self._waiting.append(req))
        return req.id

    def cancel(self, request_id: int) -> None:
        """Stop a request; its pages return to the pool before the next step."""
        if not self._closed:
            self._send(lambda: self._cancel(request_id))

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between two steps (for KV surgery: prune, fork)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():  # the caller gave up before we got to it
                return
            try:
                fut.set_result(fn(self))
            except BaseException as exc:  # handed to the caller through the future
                fut.set_exception(exc)

        self._send(run)
        return fut

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     constraint: TokenConstraint | None = None, *, control: SequenceController | None = None
                     ) -> AsyncIterator[Output]:
        """Async iterator of Outputs; leaving it early (break, cancellation) cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Output] = asyncio.Queue()
        rid = self.submit(prompt, params, constraint, emit=_LoopQueue(loop, events), control=control)
        finished = False
        try:
            while True:
                out = await events.get()
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(rid)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       constraint: TokenConstraint | None = None) -> Completion:
        parts: list[Output] = [o async for o in self.stream(prompt, params, constraint)]
        return _collect(parts)

    def generate_sync(self, prompt: str | list[int], params: SamplingParams | None = None,
                      constraint: TokenConstraint | None = None) -> Completion:
        """Blocking twin of `generate` for scripts and the CLI (not from inside an event loop)."""
        events: queue.SimpleQueue[Output] = queue.SimpleQueue()
        self.submit(prompt, params, constraint, emit=events.put)
        parts: list[Output] = []
        while not parts or parts[-1].finish_reason is None:
            out = events.get()
            if out.error is not None:
                raise out.error
            parts.append(out)
        return _collect(parts)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._commands.put(lambda: None)
        if self._thread is not None:
            self._thread.join()
        self._mask_pool.shutdown(wait=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tiles(self) -> Tiles:
        """The batch-invariant kernels' shapes this engine prefills with (every row, when deterministic)."""
        return self._tiles

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps replay captured CUDA graphs of the fused step (off CUDA: never)."""
        return self._graphs is not None

    def view_graphs(self):
        """The fused step for hogwild views (slot tables and key deltas), shared by every pool on this
        engine so graphs are captured once: at most 64 new tokens and 67 rows (64 workers and 3 headers)."""
        if self._view_graphs is None:
            from agentrt.cuda_graphs import DecodeGraphs

            self._view_graphs = DecodeGraphs(self.model, self.pool, max_tokens=64, max_rows=67,
                                             max_context=self.max_context, views=True)
        return self._view_graphs

    @property
    def num_active(self) -> int:
        return len(self._running) + len(self._waiting)

    # --- the loop (engine thread) -------------------------------------------------------------
    def _send(self, command: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="agentrt-engine", daemon=True)
                self._thread.start()
        self._commands.put(command)

    def _loop(self) -> None:
        while True:
            cmd = self._next_command()
            while cmd is not None:
                cmd()
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if not self._async_forward:
                self._flush()
            if self._closed:
                for req in [*self._running, *self._waiting]:
                    self._finish(req, "cancelled", error=EngineClosedError("the engine was closed"))
                self._flush()
                return
            if self._running or self._waiting:
                try:
                    self.step()
                except Exception as exc:  # an engine fault fails the requests in flight, not the loop
                    log.exception("engine step failed")
                    for req in list(self._running):
                        self._finish(req, "cancelled", error=EngineError(f"engine step failed: {exc}"))
            if not (self._async_forward and self._can_step()):  # else the next step delivers, see step()
                self._flush()

    def _can_step(self) -> bool:
        return any(not r.paused for r in self._running) or bool(self._waiting and not self._running)

    def _next_command(self) -> Callable[[], None] | None:
        """The next command, without waiting while a sequence can step; blocks while every sequence is
        paused (a tool runs), polling briefly when requests wait that may fit once one ends."""
        try:
            if self._closed or self._can_step():
                return self._commands.get_nowait()
            return self._commands.get(timeout=0.01 if self._waiting else None)
        except queue.Empty:
            return None

    def _flush(self) -> None:
        """Deliver the step's Outputs for async consumers: one wake-up per event loop, not per token
        (with many streams, per-token wake-ups steal the cores the forward runs on)."""
        while self._outbox:
            loop, items = self._outbox.popitem()
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: its consumers are gone
                for req, _, _ in items:
                    if not req.done:
                        log.warning("request %d: its consumer is gone; cancelling it", req.id)
                        req.emit = _drop
                        self._finish(req, "cancelled")

    def _cancel(self, request_id: int) -> None:
        for req in [*self._running, *self._waiting]:
            if req.id == request_id:
                self._finish(req, "cancelled")

    def _emit(self, req: _Request, out: Output) -> None:
        """Hand an Output to the caller; a caller that is gone (closed event loop) loses its request."""
        if isinstance(req.emit, _LoopQueue):
            self._outbox.setdefault(req.emit.loop, []).append((req, req.emit.queue, out))
            return
        try:
            req.emit(out)
        except Exception:
            log.warning("request %d: its consumer is gone; cancelling it", req.id)
            if not req.done and out.finish_reason is None:
                req.emit = _drop
                self._finish(req, "cancelled")

    def _finish(self, req: _Request, reason: str, error: BaseException | None = None) -> None:
        if req.done:
            return
        req.done = True
        if req.seq is not None:
            self.pool.free(req.seq)
            req.seq = None
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        incomplete = reason == "length" and req.constraint is not None and not req.constraint.is_terminated()
        tail = "" if req.stopper.stopped else req.stopper.flush()
        self._emit(req, Output(tail, [], reason, len(req.prompt_ids), len(req.output_ids), incomplete, error))

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            req = self._waiting[0]
            tokens = req.kept_ids()  # output tokens too after a preemption (less pruned spans)
            seq = self.pool.match_prefix(tokens)
            if self.pool.pages_needed(seq, len(tokens) - seq.length) > self.pool.num_free:
                self.pool.free(seq)
                if not self._running:
                    self._finish(req, "cancelled", error=KVCacheError(
                        f"request needs {len(tokens)} tokens of KV cache; the pool holds "
                        f"{self.pool.num_pages * self.pool.page_size}: raise kv_tokens"))
                    continue
                return
            self._waiting.popleft()
            req.seq, req.fed_ids, req.pending = seq, tokens[:seq.length], tokens[seq.length:]
            req.prefill_until = len(tokens)
            self._running.append(req)

    def _preempt(self, keep: _Request) -> bool:
        """Free the newest other sequence (it will be recomputed later); False if there is none."""
        for victim in reversed(self._running):
            if victim is not keep:
                self.pool.free(victim.seq)
                victim.seq, victim.fed_ids, victim.pending = None, [], []
                self._running.remove(victim)
                self._waiting.appendleft(victim)
                log.info("preempted request %d (KV cache full)", victim.id)
                return True
        return False

    def _schedule(self) -> list[_Work]:
        budget, work = self.max_batch_tokens, []
        for req in sorted(self._running, key=lambda r: len(r.pending)):  # decodes first
            n = min(len(req.pending), budget)
            if n == 0 or req.seq is None or req.paused:  # out of budget, preempted a moment ago, or paused
                continue
            while True:
                try:
                    self.pool.reserve(req.seq, n)
                    break
                except OutOfPagesError:
                    if not self._preempt(keep=req):
                        raise
            budget -= n
            exact = self.deterministic or len(req.fed_ids) < req.prefill_until
            work.append(_Work(req, n, n == len(req.pending), exact))
        # rows of the fastest kernels first, then the batch-invariant ones (BatchInput.exact)
        return sorted((w for w in work if w.req.seq is not None), key=lambda w: w.exact)

    def step(self) -> None:
        """One engine step: admit, schedule, forward (masks filled meanwhile), sample, stream out."""
        self._admit()
        try:
            work = self._schedule()
        except OutOfPagesError as exc:
            for req in list(self._running):
                self._finish(req, "cancelled", error=KVCacheError(str(exc)))
            return
        if not work:
            self._flush()
            return
        sampling = [w for w in work if w.samples]
        constrained = [(i, w.req.constraint) for i, w in enumerate(sampling) if w.req.constraint is not None]
        bitmask = masks_done = None
        if constrained:
            bitmask = self._bitmask(len(sampling))
            masks_done = self._mask_pool.submit(_fill_masks, constrained, bitmask, self.mask_seconds)
            if not self.mask_overlap:
                masks_done.result()
        logits = self._forward(work)  # [M, V]
        if self._async_forward:  # the device is computing: the last step's outputs go out meanwhile
            self._flush()
        if masks_done is not None:
            masks_done.result()
            import xgrammar

            rows = [i for i, _ in constrained]
            xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
        params = [w.req.params for w in sampling]
        penalized = [(i, w.req.params, w.req.prompt_ids, w.req.output_ids) for i, w in enumerate(sampling)
                     if w.req.params.penalized]
        if penalized:
            apply_penalties(logits, penalized)
        tokens = sample(logits, params, [w.req.generator for w in sampling]) if sampling else []
        logprobs, top_logprobs = token_logprobs(logits, tokens, params)
        self.steps += 1
        for w in work:
            req = w.req
            req.fed_ids.extend(req.pending[:w.n])
            del req.pending[:w.n]
            # the cache offers only keys a fresh prefill would compute bit for bit
            self.pool.register_prefix(req.seq, req.fed_ids if self.deterministic else
                                      req.fed_ids[:req.prefill_until])
        for w, token, logprob, top in zip(sampling, tokens, logprobs, top_logprobs):
            try:
                self._advance(w.req, token, logprob, top)
            except Exception as exc:  # a faulty constraint fails its own request only
                log.exception("request %d failed", w.req.id)
                self._finish(w.req, "cancelled", error=EngineError(f"request failed: {exc}"))

    def _bitmask(self, rows: int) -> torch.Tensor:
        """This step's token masks: [rows, ceil(V / 32)] int32, all allowed; one reused (pinned) buffer."""
        if self._masks is None or self._masks.shape[0] < rows:
            self._masks = allocate_bitmask(max(rows, self.max_batch_size), self.vocab_size,
                                           pin_memory=self.device.type == "cuda")
        return self._masks[:rows].fill_(-1)

    def _forward(self, work: list[_Work]) -> torch.Tensor:
        """Logits for the step's sampling rows, from a replayed CUDA graph where there is one."""
        graphs = self._graphs
        if graphs is not None and not any(w.exact for w in work) and graphs.fits(
                sum(w.n for w in work), sum(w.samples for w in work), max(w.req.seq.length for w in work)):
            return graphs.run([(w.req.seq, w.req.pending[:w.n]) for w in work],
                              [i for i, w in enumerate(work) if w.samples])
        return self.model(self._build_batch(work), self.pool.k, self.pool.v)

    def _build_batch(self, work: list[_Work]) -> BatchInput:
        """The step's rows in `work` order (fast rows, then batch-invariant ones): one attention group
        per multi-token chunk, one for the single-token rows of each kind."""
        ids, positions, slots, groups, logits_rows = [], [], [], [], []
        singles: dict[bool, tuple[list[int], list[torch.Tensor]]] = {False: ([], []), True: ([], [])}
        row, exact_row, exact_logit = 0, None, None
        for w in work:
            seq, total = w.req.seq, w.req.seq.length
            start = total - w.n
            if w.exact and exact_row is None:
                exact_row, exact_logit = row, len(logits_rows)
            ids.extend(w.req.pending[:w.n])
            positions.extend(seq.positions[start:])
            slots.append(self.pool.slots(seq, start, total))
            if w.n == 1:
                singles[w.exact][0].append(row)
                singles[w.exact][1].append(self.pool.slots(seq))
            else:
                groups.append(chunk_group(self.pool, seq, row, w.n, exact=w.exact))
            row += w.n
            if w.samples:
                logits_rows.append(row - 1)
        for exact, (rows, seq_slots) in singles.items():
            if rows:
                groups.append(_single_token_group(rows, seq_slots, exact))
        dev = self.device
        return BatchInput(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            write_slots=torch.cat(slots).to(dev),
            groups=[g.to(dev) for g in groups],
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            exact=None if exact_row is None else ExactRows(exact_row, exact_logit, self._tiles),
        )

    def _advance(self, req: _Request, token: int, logprob: float | None = None,
                 top: dict[int, float] | None = None) -> None:
        """Take a sampled token: grammar, stop conditions, jump-forward, stream the text out."""
        c = req.constraint
        if c is not None and not c.accept_token(token):
            raise EngineError(f"grammar rejected sampled token {token}")
        req.output_ids.append(token)
        if token in req.stop_ids and (c is None or c.is_terminated()):
            return self._finish(req, "stop")
        self._take(req, [token], logprob, top)

    def _take(self, req: _Request, new: list[int], logprob: float | None = None,
              top: dict[int, float] | None = None) -> None:
        """Tokens accepted and appended to the output: jump-forward, stop conditions, stream out, control."""
        c = req.constraint
        if c is not None and not c.is_terminated():
            new += self._jump_forward(req)
        text = req.stopper.push(req.detok.push(new))
        ended = req.stopper.stopped or (c is not None and c.is_terminated())
        if not ended:
            req.pending.extend(new)
        pad = [None] * (len(new) - 1)
        logprobs = [logprob] + pad if req.params.logprobs else None
        tops = [top] + pad if req.params.top_logprobs else None
        self._emit(req, Output(text, new, logprobs=logprobs, top_logprobs=tops))
        if req.control is not None and not req.done:
            req.control.on_tokens(SequenceHandle(self, req), new)
        if ended:
            return self._finish(req, "stop")
        if req.done:  # its consumer went away
            return
        if len(req.output_ids) >= req.params.max_tokens or req.context_length >= self.max_context:
            self._finish(req, "length")

    def _resume(self, req: _Request, inject: list[int]) -> None:
        """Unpause `req`, first writing `inject` into it (accepted by its constraint, fed by prefill)."""
        if req.done:
            return
        req.paused = False
        c = req.constraint
        try:
            for i, t in enumerate(inject):
                if c is not None and not c.accept_token(t):
                    raise EngineError(f"the grammar rejected injected token {t} "
                                      f"({self.tokenizer.decode(inject[:i + 1])!r})")
            if inject:
                req.output_ids.extend(inject)
                self._take(req, list(inject))
        except Exception as exc:  # a faulty injection or controller fails its own request only
            log.exception("request %d failed", req.id)
            self._finish(req, "cancelled", error=exc if isinstance(exc, EngineError) else
                         EngineError(f"request failed: {exc}"))

    def _jump_forward(self, req: _Request) -> list[int]:
        ids = jump_forward_tokens(req.constraint, self.tokenizer)  # up to a safe token boundary
        accepted: list[int] = []
        for t in ids[: req.params.max_tokens - len(req.output_ids)]:
            if not req.constraint.accept_token(t):
                break
            accepted.append(t)
        req.output_ids.extend(accepted)
        return accepted


def template_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of `messages` under `tokenizer`'s chat template, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **template_kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # some tokenizers return a BatchEncoding anyway
        out = out["input_ids"]
    return list(out)


def chunk_group(pool: KVPool, seq: KVSequence, row: int, n: int, exact: bool = False) -> AttentionGroup:
    """Attention for the last `n` tokens of `seq` (already appended), fed at batch rows row..row+n-1;
    `exact`: by the batch-invariant kernel."""
    total, start = seq.length, seq.length - n
    rows = torch.arange(row, row + n).view(1, -1)
    if start == 0 and not exact:
        return AttentionGroup(rows, None, None)  # plain causal over the fresh keys
    mask = torch.ones(n, total, dtype=torch.bool).tril(diagonal=start)  # query i sees keys 0 .. start + i
    return AttentionGroup(rows, pool.slots(seq).view(1, -1), mask.view(1, 1, n, total), exact=exact)


def _single_token_group(rows: list[int], seq_slots: list[torch.Tensor], exact: bool) -> AttentionGroup:
    """One new token per sequence at `rows`, each over its own keys (padded to the longest)."""
    t = max(len(s) for s in seq_slots)
    padded = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), 1, 1, t, dtype=torch.bool)
    for i, s in enumerate(seq_slots):
        padded[i, :len(s)] = s
        mask[i, 0, 0, :len(s)] = True
    # requests whose prompts share cached pages read those keys once (cascade, on CPU)
    shared = 0 if exact else shared_prefix(padded, [len(s) for s in seq_slots])
    return AttentionGroup(torch.tensor(rows).view(-1, 1), padded, mask, shared=shared, exact=exact)


def feed_sequence(model: Transformer, pool: KVPool, seq: KVSequence, tokens: list[int],
                  positions: list[int] | None = None, exact: bool = True, tiles: Tiles = PREFILL_TILES
                  ) -> torch.Tensor:
    """Feed `tokens` to one sequence outside the engine loop, as the engine prefills (by the batch-invariant
    kernels of `tiles`, an engine's `tiles`; `exact=False`: by the fastest ones); logits for each: [n, V].

    For tests, benchmarks and KV surgery checks (a fresh prefill to compare a pruned sequence against).
    """
    n = len(tokens)
    slots = pool.append(seq, n, positions)
    dev = pool.k.device
    g = chunk_group(pool, seq, 0, n, exact=exact).to(dev)
    batch = BatchInput(torch.tensor(tokens, device=dev), torch.tensor(seq.positions[-n:], device=dev),
                       slots.to(dev), [g], torch.arange(n, device=dev), ExactRows(0, 0, tiles) if exact else None)
    return model(batch, pool.k, pool.v)


def _graphable(cfg) -> bool:
    """The fused kernels need a power-of-two head size (Triton block shapes)."""
    return cfg.head_dim >= 16 and cfg.head_dim & (cfg.head_dim - 1) == 0


def _drop(_: Output) -> None:
    pass


@dataclass(frozen=True)
class _LoopQueue:
    """`emit` of an async consumer: Outputs go to `queue` on `loop`, batched per engine step."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, out: Output) -> None:  # direct use outside the engine loop
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)


def _deliver(items: list) -> None:
    for _, q, out in items:
        q.put_nowait(out)


def _fill_masks(constrained: list[tuple[int, TokenConstraint]], bitmask: torch.Tensor, record: list[float]) -> None:
    start = time.perf_counter()
    for row, constraint in constrained:
        constraint.fill_next_token_bitmask(bitmask, row)
    if len(record) < 100_000:
        record.append((time.perf_counter() - start) / len(constrained))


def _collect(parts: list[Output]) -> Completion:
    last = parts[-1]
    return Completion(
        text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        finish_reason=last.finish_reason or "stop",
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        incomplete=last.incomplete,
        logprobs=[lp for p in parts for lp in p.logprobs or []] if any(p.logprobs for p in parts) else None,
        top_logprobs=([t for p in parts for t in p.top_logprobs or []]
                      if any(p.top_logprobs for p in parts) else None),
    )
