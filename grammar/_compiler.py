"""Compiling constraints for one tokenizer, with a byte-bounded cache shared across compilers.

The cache key is (tokenizer fingerprint, constraint key). Compiles run off the event loop, time out
with a `GrammarError` (in worker processes killed at the deadline, for the server), are limited in
number and in grammar size, and identical concurrent compiles coalesce into one (XGrammar's
first-request compile latency is the trap this contains).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import pickle
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import xgrammar as xgr

from agentrt.errors import GrammarError, OverloadedError
from agentrt.grammar._bounds import DEFAULT_LIMITS, GrammarLimits, check_grammar
from agentrt.grammar._constraints import Constraint, JsonSchema
from agentrt.grammar._isolate import (
    COMPILE_CLIENT,
    Compiled,
    RestartBudget,
    WorkerPool,
    compile_checked,
    constraint_param,
    describe,
    mark_recoverable,
    recoverable,
)
from agentrt.grammar._llguidance import LLGuidanceGrammar, compile_schema

if TYPE_CHECKING:
    from agentrt.grammar._matcher import Matcher

__all__ = ["DEFAULT_CACHE", "CompileCache", "CompiledConstraint", "GrammarCompiler", "tokenizer_info"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled for one tokenizer; `matcher()` gives a fresh per-sequence matcher."""

    grammar: xgr.CompiledGrammar | LLGuidanceGrammar
    key: str
    warnings: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    tokenizer: str = ""  # the fingerprint of the tokenizer it was compiled for

    @property
    def memory_size_bytes(self) -> int:
        return int(self.grammar.memory_size_bytes)

    @property
    def backend(self) -> str:
        """Which library serves the grammar: "xgrammar" or "llguidance"."""
        return "llguidance" if isinstance(self.grammar, LLGuidanceGrammar) else "xgrammar"

    def matcher(self, *, stop_token_ids: list[int] | None = None) -> Matcher:
        """A fresh matcher at the start of the grammar; `stop_token_ids` overrides the tokenizer's."""
        from agentrt.grammar._matcher import Matcher

        return Matcher(self, stop_token_ids=stop_token_ids)


class CompileCache:
    """LRU of compiled grammars, bounded by their total `memory_size_bytes`."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], CompiledConstraint] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, str]) -> CompiledConstraint | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str], item: CompiledConstraint) -> None:
        size = item.memory_size_bytes
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).memory_size_bytes
            if size > self.max_bytes:
                log.info("compiled grammar of %d bytes exceeds the cache bound; not cached", size)
                return
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.memory_size_bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


DEFAULT_CACHE = CompileCache()


def tokenizer_info(tokenizer: Any, vocab_size: int | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of a Hugging Face tokenizer; `vocab_size` is the model's logits width."""
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)


class GrammarCompiler:
    """Compiles constraints for one tokenizer: `compile` (blocking) or `await compile_async`.

    `vocab_size` must be the model's logits width when it differs from `len(tokenizer)`. Every
    grammar is checked against `limits` (size, and rules that can never finish) before it compiles.
    `isolate=True` (what the server uses) runs `compile_async` in worker processes killed at the
    timeout, at most `max_concurrent` at a time, and a client (`compile_client`) whose compiles had
    more workers killed lately than `restarts` allows gets `CompileRateLimitError` for new ones;
    otherwise compiles run in threads and one that times out finishes in the background.

    `backend` picks the library per JSON schema (other constraints are xgrammar's): "auto" serves a
    schema with llguidance where xgrammar would loosen a keyword llguidance enforces (or, `strict`,
    refuse it), where xgrammar cannot take the schema (too large, or its compiler refuses it), and
    where xgrammar's compile runs past `fallback_after` seconds of the deadline; "xgrammar" never
    uses llguidance, "llguidance" uses it for every schema it compiles. llguidance needs a Hugging Face
    fast tokenizer (a compiler made from a `TokenizerInfo` is xgrammar only).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        *,
        cache: CompileCache | None = None,
        timeout: float = 30.0,
        max_threads: int = 2,
        max_concurrent: int = 2,
        limits: GrammarLimits = DEFAULT_LIMITS,
        isolate: bool = False,
        backend: str = "auto",
        fallback_after: float = 5.0,
        restarts: RestartBudget | None = None,
    ) -> None:
        if backend not in ("auto", "xgrammar", "llguidance"):
            raise ValueError(f"backend must be 'auto', 'xgrammar' or 'llguidance', got {backend!r}")
        self.info = (
            tokenizer if isinstance(tokenizer, xgr.TokenizerInfo) else tokenizer_info(tokenizer, vocab_size)
        )
        self.vocab_size = int(self.info.vocab_size)
        self.fingerprint = _fingerprint(self.info)
        self.cache = DEFAULT_CACHE if cache is None else cache
        self.timeout = timeout
        self.limits = limits
        self.isolate = isolate
        self.backend, self.fallback_after = backend, fallback_after
        self._hf = None if isinstance(tokenizer, xgr.TokenizerInfo) or backend == "xgrammar" else tokenizer
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._inflight: dict[str, cf.Future[CompiledConstraint]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrent)  # shared by threads and event loops
        self.pool = _pool(self.info, self.fingerprint, max_threads, limits) if isolate else None
        self.restarts = RestartBudget() if restarts is None else restarts
        self.stats: Counter[str] = Counter()  # compile requests: "compiled", "cached", "joined" (one in flight)

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """Compile (or fetch from the cache) on the calling thread; no timeout."""
        fut, owner = self._claim(constraint)
        if owner:
            self._run(constraint, fut)
        return fut.result()

    async def compile_async(
        self, constraint: Constraint, *, timeout: float | None = None
    ) -> CompiledConstraint:
        """Compile off the event loop; raise `GrammarError` after `timeout` seconds (default: the
        compiler's), or `OverloadedError` if the compile waited that long for a free slot. An
        isolated compile is stopped at the timeout; a threaded one finishes and fills the cache."""
        limit = self.timeout if timeout is None else timeout
        if self.pool is not None:
            self._admit(constraint)
        fut, owner = self._claim(constraint)
        if fut.done():
            return fut.result()
        done = anyio.Event()
        token = anyio.lowlevel.current_token()
        loop_thread = threading.get_ident()

        def wake(_: cf.Future[CompiledConstraint]) -> None:
            if threading.get_ident() == loop_thread:
                done.set()
                return
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except RuntimeError:  # the loop is gone
                pass

        fut.add_done_callback(wake)
        if owner:  # it keeps its own deadlines (a worker's start is not counted against the compile)
            await self._compile_owned(constraint, fut, limit)
        with anyio.move_on_after(0 if owner else limit):
            await done.wait()
        if not fut.done():
            raise GrammarError(
                f"compiling {constraint!r} took longer than {limit:g}s; simplify the schema or grammar, "
                "or raise the compile timeout",
                param="grammar",
            )
        return fut.result()

    async def _compile_owned(self, constraint: Constraint, fut: cf.Future[CompiledConstraint],
                             limit: float) -> None:
        try:
            try:
                with anyio.fail_after(limit):
                    while not self._slots.acquire(blocking=False):
                        await anyio.sleep(0.02)
            except TimeoutError:
                raise OverloadedError(f"{constraint!r} waited {limit:g}s for one of the compile slots, all busy; "
                                      "retry later") from None
            try:
                first = await anyio.to_thread.run_sync(self._llguidance_first, constraint)
                if first is not None:
                    _settle(fut, first)
                    with self._lock:
                        self._inflight.pop(self._key(constraint), None)
                    return
                # llguidance's compile in reserve (ms): xgrammar then has `fallback_after` of the deadline
                spare = await anyio.to_thread.run_sync(self._spare, constraint)
                budget = min(limit, self.fallback_after) if spare is not None else limit
                blob = _pickled(constraint) if self.pool is not None else None
                if blob is None:
                    # abandoned at the deadline: the compile finishes in its thread and fills the cache
                    with anyio.move_on_after(budget):
                        await anyio.to_thread.run_sync(self._run, constraint, fut, False, abandon_on_cancel=True)
                    if not fut.done() and spare is not None:
                        log.info("grammar %s: served by llguidance (xgrammar took over %gs)", constraint.key[:12],
                                 budget)
                        _settle(fut, self._store(constraint, *spare))
                    return
                try:
                    await self._run_isolated(constraint, blob, fut, budget)
                except GrammarError as e:
                    if not (recoverable(e) and spare is not None):
                        raise
                    log.info("grammar %s: served by llguidance (xgrammar: %s)", constraint.key[:12], e)
                    _settle(fut, self._store(constraint, *spare))
                    with self._lock:
                        self._inflight.pop(self._key(constraint), None)
            finally:
                self._slots.release()
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e if isinstance(e, Exception) else
                                  GrammarError(f"compiling {constraint!r} was cancelled", param="grammar"))
            with self._lock:
                self._inflight.pop(self._key(constraint), None)
            if not isinstance(e, Exception):
                raise

    async def _run_isolated(self, constraint: Constraint, blob: bytes, fut: cf.Future[CompiledConstraint],
                            limit: float) -> None:
        worker = self.pool.acquire()
        try:
            try:  # a worker that replaces a killed one may still be importing: not the compile's time
                with anyio.fail_after(WORKER_START_SECONDS):
                    await anyio.to_thread.run_sync(worker.wait_ready, abandon_on_cancel=True)
            except TimeoutError:
                raise OverloadedError(f"no grammar worker started within {WORKER_START_SECONDS:g}s; retry later") from None
            try:
                with anyio.fail_after(limit):
                    reply = await anyio.to_thread.run_sync(worker.run, blob, abandon_on_cancel=True)
            except TimeoutError:
                raise mark_recoverable(GrammarError(
                    f"compiling {constraint!r} took longer than {limit:g}s and was stopped; simplify the schema "
                    "or grammar, or raise the compile timeout", param="grammar")) from None
        except GrammarError as e:
            if "was stopped" in str(e):
                self._kill(worker)
            else:
                self.pool.release(worker)
            raise
        except BaseException:  # cancelled, or a worker that died: no compile keeps running
            self._kill(worker)
            raise
        self.pool.release(worker)
        if reply is None:  # a constraint class the worker cannot import
            with anyio.move_on_after(limit):
                await anyio.to_thread.run_sync(self._run, constraint, fut, False, abandon_on_cancel=True)
            return
        try:
            fut.set_result(await anyio.to_thread.run_sync(self._adopt, constraint, reply))
        finally:
            with self._lock:
                self._inflight.pop(self._key(constraint), None)

    def _admit(self, constraint: Constraint) -> None:
        """Refuse (CompileRateLimitError) a compile for a client whose compiles had too many workers
        killed lately (`restarts`), unless the constraint is compiled already or being compiled."""
        client = COMPILE_CLIENT.get()
        if client is None:
            return
        key = self._key(constraint)
        with self._lock:
            if key in self._inflight or self.cache.get((self.fingerprint, key)) is not None:
                return
        self.restarts.check(client)

    def _kill(self, worker: Any) -> None:
        """Kill `worker` (and so start its replacement), counted against the compile's client."""
        self.restarts.spend(COMPILE_CLIENT.get())
        self.pool.kill(worker)

    def _adopt(self, constraint: Constraint, reply: Compiled) -> CompiledConstraint:
        """A worker's result as ours: its compiled grammar, or a recompile known to be quick."""
        if reply.compiled_json is not None:
            compiled = xgr.CompiledGrammar.deserialize_json(reply.compiled_json, self.info)
        else:
            compiled = self._xgr.compile_grammar(xgr.Grammar.deserialize_json(reply.grammar_json))
        return self._store(constraint, compiled, reply.warnings, reply.seconds)

    def _store(self, constraint: Constraint, compiled: xgr.CompiledGrammar | LLGuidanceGrammar,
               warnings: list[str], seconds: float) -> CompiledConstraint:
        result = CompiledConstraint(compiled, constraint.key, warnings, seconds, self.fingerprint)
        for w in warnings:
            log.warning("grammar %s: %s", constraint.key[:12], w)
        self.cache.put((self.fingerprint, self._key(constraint)), result)
        return result

    def _key(self, constraint: Constraint) -> str:
        """The cache key: a compiler that forces a backend keeps its grammars apart from "auto"'s."""
        return constraint.key if self.backend == "auto" else f"{constraint.key}/{self.backend}"

    def _llguidance_may(self, constraint: Constraint) -> bool:
        return self._hf is not None and isinstance(constraint, JsonSchema)

    def _llguidance(self, constraint: JsonSchema, *, lenient: bool) -> CompiledConstraint:
        return self._store(constraint, *self._llguidance_compile(constraint, lenient=lenient))

    def _llguidance_compile(self, constraint: JsonSchema, *,
                            lenient: bool) -> tuple[LLGuidanceGrammar, list[str], float]:
        t0 = time.perf_counter()
        compiled, warnings = compile_schema(constraint, self.info, hf_tokenizer=self._hf,
                                            fingerprint=self.fingerprint, lenient=lenient)
        return compiled, warnings, time.perf_counter() - t0

    def _spare(self, constraint: Constraint) -> tuple[LLGuidanceGrammar, list[str], float] | None:
        """llguidance's compile of a schema, not stored: what serves it if xgrammar cannot."""
        if not self._llguidance_may(constraint):
            return None
        try:
            return self._llguidance_compile(constraint, lenient=not _strict(constraint))
        except GrammarError as e:
            log.debug("grammar %s: no llguidance reserve (%s)", constraint.key[:12], e)
            return None

    def _llguidance_first(self, constraint: Constraint) -> CompiledConstraint | None:
        """The schema compiled by llguidance, where it should not go to xgrammar at all: xgrammar would
        drop a keyword (or, `strict`, refuse the schema) that llguidance enforces, or the compiler
        forces llguidance. Only a grammar whose every rule can finish (`check_grammar` on xgrammar's
        form of the rest of the schema); None: xgrammar's turn."""
        if not self._llguidance_may(constraint):
            return None
        try:
            norm = constraint.normalized(collect=True)
            if self.backend == "auto" and not norm.loosened:
                return None
            grammar = xgr.Grammar.from_ebnf(constraint.ebnf(collect=True)[0])
            check_grammar(str(grammar), describe(constraint), self.limits, param=constraint_param(constraint))
        except (GrammarError, RuntimeError) as e:
            if not recoverable(e) and not (isinstance(e, GrammarError) and " is too large" in str(e)):
                return None  # xgrammar's path says what is wrong
        try:
            return self._llguidance(constraint, lenient=self.backend == "llguidance" and not _strict(constraint))
        except GrammarError as e:
            log.info("grammar %s: llguidance cannot serve it either (%s)", constraint.key[:12], e)
            return None

    def _fallback(self, constraint: Constraint, error: GrammarError) -> CompiledConstraint:
        """llguidance's compile of a schema xgrammar could not take (`error`, raised again if
        llguidance cannot serve it either)."""
        if not (recoverable(error) and self._llguidance_may(constraint)):
            raise error
        try:
            result = self._llguidance(constraint, lenient=not _strict(constraint))
        except GrammarError as e:
            log.info("grammar %s: llguidance cannot serve it either (%s)", constraint.key[:12], e)
            raise error from None
        log.info("grammar %s: served by llguidance (xgrammar: %s)", constraint.key[:12], error)
        return result

    def _claim(self, constraint: Constraint) -> tuple[cf.Future[CompiledConstraint], bool]:
        """The future for this constraint's result, and whether the caller must run the compile."""
        key = self._key(constraint)
        ckey = (self.fingerprint, key)
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                self.stats["joined"] += 1
                return fut, False
            fut = cf.Future()
            hit = self.cache.get(ckey)
            if hit is not None:
                self.stats["cached"] += 1
                fut.set_result(hit)
                return fut, False
            self.stats["compiled"] += 1
            self._inflight[key] = fut
            return fut, True

    def _run(self, constraint: Constraint, fut: cf.Future[CompiledConstraint], first: bool = True) -> None:
        try:
            t0 = time.perf_counter()
            result = self._llguidance_first(constraint) if first else None
            if result is None:
                try:
                    _, warnings, compiled, _ = compile_checked(self._xgr, constraint, self.limits)
                    result = self._store(constraint, compiled, warnings, time.perf_counter() - t0)
                except GrammarError as e:
                    result = self._fallback(constraint, e)
            _settle(fut, result)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            _settle(fut, error=e)
        finally:
            with self._lock:
                self._inflight.pop(self._key(constraint), None)


def _settle(fut: cf.Future[CompiledConstraint], result: CompiledConstraint | None = None, *,
            error: BaseException | None = None) -> None:
    """Complete `fut` unless another path did first (llguidance while xgrammar's thread ran on)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:
        pass


def _strict(constraint: JsonSchema) -> bool:
    return constraint.strict if constraint.strict is not None else constraint.schema.get("strict") is True


def _pickled(constraint: Constraint) -> bytes | None:
    try:
        return pickle.dumps(constraint)
    except Exception:  # noqa: BLE001 - e.g. a caller's constraint holding a lock: compiled in a thread
        return None


WORKER_START_SECONDS = 120.0  # a fresh interpreter importing xgrammar and torch, on a busy machine

_POOLS: dict[tuple, WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def _pool(info: xgr.TokenizerInfo, fingerprint: str, threads: int, limits: GrammarLimits) -> WorkerPool:
    """One worker pool per tokenizer and settings, shared by every compiler that isolates."""
    with _POOLS_LOCK:
        key = (fingerprint, threads, limits)
        if key not in _POOLS:
            _POOLS[key] = WorkerPool(info, threads=threads, limits=limits)
        return _POOLS[key]


_FINGERPRINTS: dict[int, tuple[xgr.TokenizerInfo, str]] = {}  # id -> (info kept alive, digest)


def _fingerprint(info: xgr.TokenizerInfo) -> str:
    known = _FINGERPRINTS.get(id(info))
    if known is not None and known[0] is info:
        return known[1]
    h = hashlib.sha256()
    h.update(f"{info.vocab_size}|{info.vocab_type}|{info.add_prefix_space}|{info.stop_token_ids}".encode())
    for tok in info.decoded_vocab:
        h.update(tok)
        h.update(b"\0")
    _FINGERPRINTS[id(info)] = (info, h.hexdigest())
    return _FINGERPRINTS[id(info)][1]
