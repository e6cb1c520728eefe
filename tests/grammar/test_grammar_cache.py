"""The compile cache: hits, byte bound, tokenizer-keyed entries, off-loop compiles that coalesce,
and timeouts that surface as a clear GrammarError."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import xgrammar as xgr

from agentrt.errors import GrammarError, InvalidRequestError
from agentrt.grammar import CompileCache, Constraint, GrammarCompiler, JsonSchema, Regex

pytestmark = pytest.mark.anyio


class SlowRegex(Constraint):
    """A regex whose build takes `delay` seconds and counts how often it ran."""

    def __init__(self, pattern: str, delay: float) -> None:
        self.pattern, self.delay, self.builds = pattern, delay, 0
        self.lock = threading.Lock()

    def _identity(self):
        return [self.pattern, self.delay]

    def build(self):
        with self.lock:
            self.builds += 1
        time.sleep(self.delay)
        return xgr.Grammar.from_regex(self.pattern), []


def byte_tokenizer() -> xgr.TokenizerInfo:
    return xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b"</s>"], stop_token_ids=[256])


@pytest.fixture
def fresh(compiler) -> GrammarCompiler:
    return GrammarCompiler(compiler.info, cache=CompileCache(max_bytes=64 << 20), timeout=5)


async def test_cache_hit_returns_the_same_compiled_grammar(fresh):
    a = fresh.compile(JsonSchema({"type": "integer"}))
    b = fresh.compile(JsonSchema({"type": "integer"}))
    assert a is b
    assert len(fresh.cache) == 1 and fresh.cache.size_bytes == a.memory_size_bytes > 0


async def test_cache_is_bounded_in_bytes(compiler):
    size = compiler.compile(Regex("[a-z]{3}")).memory_size_bytes
    cache = CompileCache(max_bytes=int(size * 2.5))
    gc = GrammarCompiler(compiler.info, cache=cache)
    compiled = [gc.compile(Regex(f"[a-z]{{{n}}}")) for n in range(3, 9)]
    assert cache.size_bytes <= cache.max_bytes
    assert 1 <= len(cache) < len(compiled)
    assert gc.compile(Regex("[a-z]{8}")) is compiled[-1]  # most recent kept
    assert gc.compile(Regex("[a-z]{3}")) is not compiled[0]  # oldest evicted, recompiled


async def test_cache_keys_include_the_tokenizer(compiler):
    cache = CompileCache()
    smol = GrammarCompiler(compiler.info, cache=cache)
    raw = GrammarCompiler(byte_tokenizer(), cache=cache)
    a, b = smol.compile(Regex("ab")), raw.compile(Regex("ab"))
    assert a is not b and len(cache) == 2
    assert b.grammar.tokenizer_info.vocab_size == 257


async def test_concurrent_identical_compiles_coalesce(fresh):
    slow = SlowRegex("x+y", delay=0.3)
    results = []

    async def one():
        results.append(await fresh.compile_async(slow))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert slow.builds == 1
    assert all(r is results[0] for r in results)


async def test_compile_runs_off_the_event_loop(fresh):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await fresh.compile_async(SlowRegex("a+", delay=0.3))
        tg.cancel_scope.cancel()
    assert ticks >= 10  # the loop kept running while the compile slept in its thread


async def test_timeout_raises_a_clear_error_and_the_compile_still_fills_the_cache(fresh):
    slow = SlowRegex("t+", delay=0.6)
    with pytest.raises(GrammarError, match="took longer than 0.1s") as info:
        await fresh.compile_async(slow, timeout=0.1)
    assert isinstance(info.value, InvalidRequestError)
    await anyio.sleep(0.8)
    t0 = time.perf_counter()
    await fresh.compile_async(slow, timeout=0.1)
    assert time.perf_counter() - t0 < 0.1 and slow.builds == 1


async def test_compile_errors_reach_every_waiter(fresh):
    bad = Regex("(unclosed")
    for _ in range(2):
        with pytest.raises(GrammarError, match="regex"):
            await fresh.compile_async(bad)
    with pytest.raises(GrammarError):
        fresh.compile(bad)
