"""Compiling constraints for one tokenizer, with a byte-bounded cache shared across compilers.

The cache key is (tokenizer fingerprint, constraint key). Compiles run off the event loop
(`anyio.to_thread`), time out with a `GrammarError`, and identical concurrent compiles coalesce
into one (XGrammar's first-request compile latency is the trap this contains).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import xgrammar as xgr

from agentrt.errors import GrammarError
from agentrt.grammar._constraints import Constraint

if TYPE_CHECKING:
    from agentrt.grammar._matcher import Matcher

__all__ = ["CompiledConstraint", "CompileCache", "GrammarCompiler", "tokenizer_info", "DEFAULT_CACHE"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled for one tokenizer; `matcher()` gives a fresh per-sequence matcher."""

    grammar: xgr.CompiledGrammar
    key: str
    warnings: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    tokenizer: str = ""  # the fingerprint of the tokenizer it was compiled for

    @property
    def memory_size_bytes(self) -> int:
        return int(self.grammar.memory_size_bytes)

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

    `vocab_size` must be the model's logits width when it differs from `len(tokenizer)`.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        *,
        cache: CompileCache | None = None,
        timeout: float = 30.0,
        max_threads: int = 2,
    ) -> None:
        self.info = (
            tokenizer if isinstance(tokenizer, xgr.TokenizerInfo) else tokenizer_info(tokenizer, vocab_size)
        )
        self.vocab_size = int(self.info.vocab_size)
        self.fingerprint = _fingerprint(self.info)
        self.cache = DEFAULT_CACHE if cache is None else cache
        self.timeout = timeout
        self._xgr = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._inflight: dict[str, cf.Future[CompiledConstraint]] = {}
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> CompiledConstraint:
        """Compile (or fetch from the cache) on the calling thread; no timeout."""
        fut, owner = self._claim(constraint)
        if owner:
            self._run(constraint, fut)
        return fut.result()

    async def compile_async(
        self, constraint: Constraint, *, timeout: float | None = None
    ) -> CompiledConstraint:
        """Compile in a worker thread; raise `GrammarError` after `timeout` seconds (default: the
        compiler's). A compile that times out keeps running and still fills the cache."""
        limit = self.timeout if timeout is None else timeout
        fut, owner = self._claim(constraint)
        if fut.done():
            return fut.result()
        done = anyio.Event()
        token = anyio.lowlevel.current_token()

        def wake(_: cf.Future[CompiledConstraint]) -> None:
            try:
                anyio.from_thread.run_sync(done.set, token=token)
            except RuntimeError:  # already on the loop thread, or the loop is gone
                done.set()

        fut.add_done_callback(wake)
        with anyio.move_on_after(limit):
            if owner:  # abandoned on timeout: the compile finishes in its thread and fills the cache
                await anyio.to_thread.run_sync(self._run, constraint, fut, abandon_on_cancel=True)
            await done.wait()
        if not fut.done():
            raise GrammarError(
                f"compiling {constraint!r} took longer than {limit:g}s; simplify the schema or grammar, "
                "or raise the compile timeout",
                param="grammar",
            )
        return fut.result()

    def _claim(self, constraint: Constraint) -> tuple[cf.Future[CompiledConstraint], bool]:
        """The future for this constraint's result, and whether the caller must run the compile."""
        ckey = (self.fingerprint, constraint.key)
        with self._lock:
            fut = self._inflight.get(constraint.key)
            if fut is not None:
                return fut, False
            fut = cf.Future()
            hit = self.cache.get(ckey)
            if hit is not None:
                fut.set_result(hit)
                return fut, False
            self._inflight[constraint.key] = fut
            return fut, True

    def _run(self, constraint: Constraint, fut: cf.Future[CompiledConstraint]) -> None:
        try:
            t0 = time.perf_counter()
            grammar, warnings = constraint.build()
            try:
                compiled = self._xgr.compile_grammar(grammar)
            except RuntimeError as e:
                raise GrammarError(f"cannot compile {constraint!r}: {e}", param="grammar") from e
            result = CompiledConstraint(
                compiled, constraint.key, warnings, time.perf_counter() - t0, self.fingerprint
            )
            for w in warnings:
                log.warning("grammar %s: %s", constraint.key[:12], w)
            self.cache.put((self.fingerprint, constraint.key), result)
            fut.set_result(result)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            fut.set_exception(e)
        finally:
            with self._lock:
                self._inflight.pop(constraint.key, None)


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
