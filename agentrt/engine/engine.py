"""The engine: one thread owns the model, the KV pool and the device; callers stream tokens from it.

A step reads as the engine room is laid out: the scheduler picks the work (continuous batching,
chunked prefill, preemption), the mask filler starts the grammar masks on a CPU thread, the runner
runs the forward, the masks are applied and the rows sampled, and the output processor turns the
tokens into Outputs, which the engine delivers (one wake-up per event loop per step). With `overlap`
(the overlap scheduler) the output processing of a step's tokens runs while the next forward does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import torch

from agentrt.engine.config import switch
from agentrt.engine.constraint import TokenConstraint
from agentrt.engine.control import SequenceController, SequenceHandle
from agentrt.engine.delivery import LoopQueue, Outbox, drop, in_future
from agentrt.engine.exact import DETERMINISTIC_TILES, PREFILL_TILES, Tiles
from agentrt.engine.kv import KVPool, OutOfPagesError
from agentrt.engine.loader import load_model
from agentrt.engine.model import Transformer
from agentrt.engine.output import OutputProcessor, Processed
from agentrt.engine.runner import ModelRunner
from agentrt.engine.sampling import MaskFiller, SamplingParams, constrained_rows, sample_sequences
from agentrt.engine.scheduler import Scheduler
from agentrt.engine.sequence import Completion, Output, Sequence
from agentrt.engine.tokens import prompt_ids, template_ids
from agentrt.errors import ContextLengthError, EngineClosedError, EngineError, InvalidRequestError, KVCacheError

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: Transformer, tokenizer, *, eos_token_ids: list[int] | None = None,
                 kv_tokens: int = 32768, page_size: int = 16, max_batch_tokens: int = 512,
                 max_batch_size: int = 32, name: str = "", mask_overlap: bool | None = None,
                 cuda_graphs: bool | None = None, deterministic: bool | None = None,
                 overlap: bool | None = None) -> None:
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
        self.eos_token_ids = set(eos_token_ids or []) | ({tokenizer.eos_token_id} - {None})
        # Prefills always run the batch-invariant kernels (agentrt.engine.exact), so a prefix read from the cache
        # equals a fresh prefill. Deterministic mode runs every row through them, decode steps included:
        # a request's tokens then never depend on what shares its batch (costlier decode; RESULTS.md).
        self.deterministic = switch(deterministic, "AGENTRT_DETERMINISTIC", False)
        self.tiles: Tiles = DETERMINISTIC_TILES if self.deterministic else PREFILL_TILES
        # The overlap scheduler (SGLang's zero-overhead scheduler): a step's forward is launched before the last
        # step's tokens are taken (grammar, detokenising, stop checks, delivery), which happens while it runs.
        # Same tokens either way (tests/agentrt/test_overlap.py); on by default on CUDA (RESULTS.md: CPU).
        self.overlap = switch(overlap, "AGENTRT_OVERLAP", self.device.type == "cuda")
        self.scheduler = Scheduler(self.pool, max_batch_size, max_batch_tokens, self.deterministic)
        self.runner = ModelRunner(model, self.pool, self.tiles, max_batch_tokens=max_batch_tokens,
                                  max_batch_size=max_batch_size, max_context=self.max_context,
                                  cuda_graphs=cuda_graphs, deterministic=self.deterministic)
        self.masks = MaskFiller(self.vocab_size, self.device, max_batch_size, overlap=mask_overlap)
        self.output = OutputProcessor(tokenizer, self.max_context, self._handle)
        self._ids = itertools.count(1)
        self._outbox = Outbox()  # async consumers' Outputs of this step
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._sampled: list[tuple] = []  # overlap: the last step's (seq, token, logprob, top), not yet taken
        self.steps = 0
        # a CUDA forward returns before it is computed: outputs are delivered while it runs
        self._async_forward = self.device.type == "cuda"

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, model: str = "smollm2-135m", *, device: str | None = None,
             dtype: torch.dtype | str | None = None, quant: str | None = None, **kwargs) -> Engine:
        """Resolve a model name (embedded, tiny-random, local dir, hub id) and build an engine for it.

        dtype: a torch dtype or its name; None or "auto" picks bf16 where the hardware runs it natively
        (CUDA, CPUs with AVX512-BF16 / AMX), else fp32 (see `resolve_dtype`). quant: "gguf", "int8",
        "none" or None / "auto" (weight-only quantized linears on the CPU, see `agentrt.engine.quant`)."""
        net, tok, eos = load_model(model, device=device, dtype=dtype, quant=quant)
        return cls(net, tok, eos_token_ids=eos, name=str(model), **kwargs)

    # --- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Token ids of `messages` under the model's chat template, ready for the assistant's turn."""
        return template_ids(self.tokenizer, messages, **template_kwargs)

    def encode(self, prompt: str | list[int]) -> list[int]:
        return prompt_ids(self.tokenizer, prompt, self.vocab_size)

    # --- public API (any thread) -------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               constraint: TokenConstraint | None = None, *, emit: Callable[[Output], None],
               control: SequenceController | None = None) -> int:
        """Queue a request; `emit` is called on the engine thread with each Output. Returns its id.

        `control` (thread mode) sees each accepted token on the engine thread and may pause the sequence,
        write tokens into it and prune its KV cache (see agentrt.engine.control)."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(ids) >= self.max_context:
            raise ContextLengthError(len(ids), self.max_context)
        seq = Sequence.new(next(self._ids), ids, params, constraint, emit, self.tokenizer, self.eos_token_ids,
                           self.device, control)
        self._send(lambda: self.scheduler.add(seq))
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Stop a request; its pages return to the pool before the next step."""
        if not self._closed:
            self._send(lambda: self._cancel(request_id))

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between two steps (for KV surgery: prune, fork)."""
        fut, run = in_future(lambda: fn(self))
        self._send(run)
        return fut

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     constraint: TokenConstraint | None = None, *, control: SequenceController | None = None
                     ) -> AsyncIterator[Output]:
        """Async iterator of Outputs; leaving it early (break, cancellation) cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Output] = asyncio.Queue()
        rid = self.submit(prompt, params, constraint, emit=LoopQueue(loop, events), control=control)
        out = None
        try:
            while out is None or out.finish_reason is None:
                out = await events.get()
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if out is None or out.finish_reason is None:  # left early: the request goes too
                self.cancel(rid)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       constraint: TokenConstraint | None = None) -> Completion:
        return Completion.of([o async for o in self.stream(prompt, params, constraint)])

    def stream_sync(self, prompt: str | list[int], params: SamplingParams | None = None,
                    constraint: TokenConstraint | None = None) -> Iterator[Output]:
        """Blocking twin of `stream` for scripts and the CLI (not from inside an event loop)."""
        events: queue.SimpleQueue[Output] = queue.SimpleQueue()
        rid, out = self.submit(prompt, params, constraint, emit=events.put), None
        try:
            while out is None or out.finish_reason is None:
                out = events.get()
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if out is None or out.finish_reason is None:  # left early: the request goes too
                self.cancel(rid)

    def generate_sync(self, prompt: str | list[int], params: SamplingParams | None = None,
                      constraint: TokenConstraint | None = None) -> Completion:
        """Blocking twin of `generate`."""
        return Completion.of(list(self.stream_sync(prompt, params, constraint)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._commands.put(lambda: None)
        if self._thread is not None:
            self._thread.join()
        self.masks.close()
        self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps replay captured CUDA graphs of the fused step (off CUDA: never)."""
        return self.runner.graphs is not None

    @property
    def num_active(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)

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
        sched = self.scheduler
        while True:
            for cmd in self._queued_commands():
                cmd()
            if not self._async_forward:
                self._flush()
            if self._closed:
                for seq in sched.sequences:
                    self._finish(seq, "cancelled", error=EngineClosedError("the engine was closed"))
                self._flush()
                return
            if sched.running or sched.waiting:
                try:
                    self.step()
                except Exception as exc:  # an engine fault fails the requests in flight, not the loop
                    log.exception("engine step failed")
                    for seq in list(sched.running):
                        self._finish(seq, "cancelled", error=EngineError(f"engine step failed: {exc}"))
            if not (self._async_forward and sched.can_step()):  # else the next step delivers, see step()
                self._flush()

    def _queued_commands(self) -> Iterator[Callable[[], None]]:
        """The commands queued now, without waiting while a sequence can step; blocks while every sequence
        is paused (a tool runs), polling briefly when requests wait that may fit once one ends."""
        try:
            if self._closed or self.scheduler.can_step():
                yield self._commands.get_nowait()
            else:
                yield self._commands.get(timeout=0.01 if self.scheduler.waiting else None)
            while True:
                yield self._commands.get_nowait()
        except queue.Empty:
            return

    def step(self) -> None:
        """One engine step: schedule, launch the forward (overlap: take the last step's tokens while it runs),
        fill and apply the masks, sample, take the tokens (overlap: in the next step)."""
        now, ahead = self.scheduler.queue_ahead(self._sampled, self.max_context)
        self._sampled = []
        self._take(now)
        for seq, error in self.scheduler.admit():
            self._finish(seq, "cancelled", error=error)
        try:
            work = self.scheduler.schedule()
        except OutOfPagesError as exc:
            for seq in list(self.scheduler.running):
                self._finish(seq, "cancelled", error=KVCacheError(str(exc)))
            return
        rows = [w for w in work if w.samples]
        keep = range(len(rows))
        if not ahead:  # the masks fill while the forward runs
            self.masks.start(constrained_rows([w.seq for w in rows]), len(rows))
        logits = self.runner.launch(work, self.overlap) if work else None  # [M, V] once computed
        if ahead:  # the forward runs: take the queued tokens, then fill the masks that follow them
            self._take(ahead, queued=True)
            # rows whose sequence ended, or whose next token follows forced ones (next step), sample nothing
            keep = [i for i, w in enumerate(rows) if not w.seq.done and len(w.seq.pending) == w.n]
            self.masks.start(constrained_rows([rows[i].seq for i in keep]), len(keep))
        if self._async_forward or ahead:  # the device is computing: outputs go out meanwhile
            self._flush()
        if logits is None:
            return
        logits = logits() if len(keep) == len(rows) else logits()[keep]
        self.masks.apply(logits)
        sampling = [rows[i].seq for i in keep]
        out = sample_sequences(logits, sampling)
        self.steps += 1
        self.scheduler.postprocess(work)
        sampled = list(zip(sampling, out.tokens, out.logprobs, out.top_logprobs))
        if self.overlap:
            self._sampled = sampled
        else:
            self._take(sampled)

    def _take(self, sampled: list[tuple], queued: bool = False) -> None:
        """Output processing of sampled (seq, token, logprob, top) rows."""
        for seq, token, logprob, top in sampled:
            if not seq.done:
                self._process(self.output.sampled, seq, token, logprob, top, queued)

    def _process(self, take: Callable[..., Processed], seq: Sequence, *args) -> None:
        """Run one output-processing call `take(seq, *args)`, deliver its Outputs, end `seq` if it ended."""
        try:
            done = take(seq, *args)
        except Exception as exc:  # a faulty constraint or controller fails its own request only
            log.exception("request %d failed", seq.id)
            self._finish(seq, "cancelled", error=exc if isinstance(exc, EngineError) else
                         EngineError(f"request failed: {exc}"))
            return
        for out in done.outputs:
            self._emit(seq, out)
        if done.finish is not None:
            self._finish(seq, done.finish)

    def _handle(self, seq: Sequence) -> SequenceHandle:
        return SequenceHandle(seq, self.scheduler, self.model.rotary,
                              lambda s, inject: self._send(lambda: self._resume(s, inject)))

    def _resume(self, seq: Sequence, inject: list[int]) -> None:
        """Unpause `seq`, first writing `inject` into it (accepted by its constraint, fed by prefill)."""
        if not seq.done:
            seq.paused = False
            self._process(self.output.injected, seq, inject)

    # --- delivery (engine thread) ------------------------------------------------------------------
    def _flush(self) -> None:
        """Deliver the step's Outputs for async consumers (see agentrt.engine.delivery)."""
        for seq in self._outbox.flush():
            self._lose(seq)

    def _cancel(self, request_id: int) -> None:
        for seq in self.scheduler.sequences:
            if seq.id == request_id:
                self._finish(seq, "cancelled")

    def _emit(self, seq: Sequence, out: Output) -> None:
        """Hand an Output to the caller; a caller that is gone (closed event loop) loses its request."""
        if not (seq.done and out.finish_reason is None) and not self._outbox.send(seq, out):
            self._lose(seq)  # (an Output made after its sequence ended is dropped)

    def _lose(self, seq: Sequence) -> None:
        if not seq.done:
            log.warning("request %d: its consumer is gone; cancelling it", seq.id)
            seq.emit = drop
            self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.scheduler.remove(seq)
        self._emit(seq, self.output.final(seq, reason, error))
