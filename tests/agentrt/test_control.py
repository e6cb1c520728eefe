"""The engine's per-request control hook: pause while others decode, inject by prefill, prune (with the
kept tail recomputed)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from agentrt.engine import feed_sequence
from agentrt.errors import EngineError
from agentrt.engine.kv import KVSequence
from agentrt.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=70, ignore_eos=True)
PROMPT = [int(t) for t in range(300, 340)]  # 40 tokens: two and a half pages


def logit_gap(engine, seq) -> float:
    """Max |logits| difference between the sequence's cached K/V and a fresh prefill of its kept tokens,
    for the token after its pending ones (runs on the engine thread, inside on_tokens)."""
    pool, model, kv, kept = engine.pool, engine.model, seq.kv, seq.kept_ids
    assert kv.positions == list(range(kv.length)), "positions must stay dense"
    pending = kept[kv.length:]
    fork = pool.fork(kv)
    fresh = KVSequence()
    try:
        ours = feed_sequence(model, pool, fork, pending, tiles=engine.tiles)[-1]
        ref = feed_sequence(model, pool, fresh, kept, tiles=engine.tiles)[-1]
    finally:
        pool.free(fork)
        pool.free(fresh)
    return (ours - ref).abs().max().item()


class Pruner:
    """Prunes output spans once the output reaches given lengths; measures the logit gap one step later."""

    def __init__(self, engine, plan: list[tuple[int, int, int]], max_recompute: int | None,
                 measure: bool = True) -> None:
        self.engine, self.plan, self.max_recompute, self.measure = engine, list(plan), max_recompute, measure
        self.gaps: list[float] = []
        self.infos = []
        self.pruned_kv, self.readmitted = None, False
        self.check = False

    def on_tokens(self, seq, token_ids) -> None:
        if self.infos and seq.kv is not self.pruned_kv:  # preempted since its prune, then re-admitted
            self.readmitted = True
        if self.check:
            self.gaps.append(logit_gap(self.engine, seq))
            self.check = False
        if self.plan and len(seq.output_ids) >= self.plan[0][0]:
            _, a, b = self.plan.pop(0)
            before = seq.live_tokens
            self.infos.append(seq.prune(a, b, max_recompute=self.max_recompute))
            self.pruned_kv = seq.kv
            assert seq.live_tokens == before - self.infos[-1].removed
            self.check = self.measure


# spans at different places; the last overlaps the first two (already-pruned tokens are skipped)
PLAN = [(20, 5, 12), (35, 18, 30), (50, 0, 33)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_pruning_with_tail_recompute_equals_a_fresh_prefill_of_the_kept_tokens(make_engine, deterministic):
    tiny_engine = make_engine(deterministic=deterministic)
    pruner = Pruner(tiny_engine, PLAN, max_recompute=None)
    out = _run(tiny_engine, pruner)
    # deterministic: bit for bit; default: the kept outputs' K/V came from decode kernels, whose rounding
    # differs from a prefill's (an ulp of a bf16 logit is 2**-8 near 1)
    fp32 = tiny_engine.model.embed.weight.dtype == torch.float32
    tolerance = 0.0 if deterministic else 1e-4 if fp32 else 2 ** -5
    assert len(pruner.gaps) == 3 and max(pruner.gaps) <= tolerance, pruner.gaps
    assert [i.removed for i in pruner.infos] == [7, 12, 33 - 7 - 12]
    assert all(i.recomputed > 0 and i.rerotated == 0 for i in pruner.infos)
    assert len(out.token_ids) == GREEDY.max_tokens  # the output keeps every token; only the cache shrank
    assert tiny_engine.pool.num_in_use == 0


def test_rerotation_alone_is_only_approximate_in_deeper_layers(tiny_engine):
    pruner = Pruner(tiny_engine, PLAN, max_recompute=0)
    _run(tiny_engine, pruner)
    assert all(i.rerotated > 0 and i.recomputed == 0 for i in pruner.infos)
    assert max(pruner.gaps) > 1e-3  # the tail's layer-1 K/V still carry what they read from the span
    assert tiny_engine.pool.num_in_use == 0


def test_pruned_pages_never_enter_the_prefix_cache(tiny_engine):
    out = _run(tiny_engine, Pruner(tiny_engine, [(50, 5, 30)], max_recompute=0))
    tokens = PROMPT + out.token_ids
    matched = tiny_engine.call(lambda e: _matched(e, tokens)).result()
    assert matched <= (len(PROMPT) + 5) // 16 * 16  # nothing past the pruned span's page
    plain = tiny_engine.generate_sync(PROMPT + [7], GREEDY)  # a sequence that was never pruned ...
    tokens = PROMPT + [7] + plain.token_ids
    # ... offers the full pages of its prefill (decoded tokens' K/V come from other kernels than a
    # fresh prefill's, so the default mode keeps them out; deterministic mode offers them too)
    assert tiny_engine.call(lambda e: _matched(e, tokens)).result() == (len(PROMPT) + 1) // 16 * 16


def test_deterministic_mode_offers_decoded_pages_too(make_engine):
    engine = make_engine(deterministic=True)
    out = engine.generate_sync(PROMPT + [7], GREEDY)
    tokens = PROMPT + [7] + out.token_ids
    assert len(tokens) >= 96 and engine.call(lambda e: _matched(e, tokens)).result() == (len(tokens) - 1) // 16 * 16


def _matched(engine, tokens) -> int:
    seq = engine.pool.match_prefix(tokens)
    length = seq.length
    engine.pool.free(seq)
    return length


class Pauser:
    """Pauses the sequence once its output reaches `at` tokens and tells the test."""

    def __init__(self, at: int) -> None:
        self.at, self.paused, self.handle = at, threading.Event(), None

    def on_tokens(self, seq, token_ids) -> None:
        if self.handle is None and len(seq.output_ids) >= self.at:
            seq.pause()
            self.handle = seq
            self.paused.set()


def test_a_paused_sequence_lets_others_decode_and_takes_injected_tokens_by_prefill(tiny_engine):
    pauser = Pauser(at=5)
    inject = tiny_engine.encode(" the tool said 42")

    async def go():
        controlled = asyncio.ensure_future(_generate(tiny_engine, PROMPT, pauser))
        while not pauser.paused.is_set():
            await asyncio.sleep(0.005)
        steps = tiny_engine.steps
        other = await tiny_engine.generate([11, 12, 13], GREEDY)  # finishes while the first one waits
        assert tiny_engine.steps - steps >= GREEDY.max_tokens - 1 and not controlled.done()
        pauser.handle.resume(inject)
        return await controlled, other

    out, other = asyncio.run(go())
    assert len(other.token_ids) == GREEDY.max_tokens
    head = out.token_ids[:5]
    assert out.token_ids[5:5 + len(inject)] == inject and " the tool said 42" in out.text
    # the injected tokens were fed like a prompt: the rest is what a fresh request would generate
    rest = tiny_engine.generate_sync(PROMPT + head + inject, SamplingParams(max_tokens=10, ignore_eos=True))
    assert out.token_ids[5 + len(inject):][:10] == rest.token_ids
    assert tiny_engine.pool.num_in_use == 0


def test_injected_tokens_go_through_the_grammar(tiny_engine):
    from agentrt.grammar import GrammarCompiler, Regex

    compiler = GrammarCompiler(tiny_engine.tokenizer, vocab_size=tiny_engine.vocab_size)
    compiled = compiler.compile(Regex("[a-z]+[0-9]{5}"))

    def attempt(inject: str) -> str:
        pauser = Pauser(at=1)

        async def go():
            task = asyncio.ensure_future(_generate(tiny_engine, PROMPT, pauser, compiled.matcher()))
            while not pauser.paused.is_set():
                await asyncio.sleep(0.005)
            pauser.handle.resume(tiny_engine.encode(inject))
            return await task

        return asyncio.run(go()).text

    assert attempt("123").endswith("123") is False and "123" in attempt("123")  # then two digits of its own
    with pytest.raises(EngineError, match="rejected injected token"):
        attempt("!!")
    assert tiny_engine.pool.num_in_use == 0


async def _generate(engine, prompt, control, constraint=None, params=GREEDY):
    parts = [o async for o in engine.stream(prompt, params, constraint, control=control)]
    return _Result("".join(p.text for p in parts), [t for p in parts for t in p.token_ids])


class _Result:
    def __init__(self, text, token_ids) -> None:
        self.text, self.token_ids = text, token_ids


def _run(engine, control):
    return asyncio.run(_generate(engine, PROMPT, control))


def test_a_pruned_sequence_that_is_preempted_comes_back_exactly(make_engine):
    plan = [(12, 5, 10)]
    alone = make_engine()
    expected = _run(alone, Pruner(alone, plan, None, measure=False))
    engine = make_engine()
    pruner = Pruner(engine, plan, None, measure=False)

    async def go():
        task = asyncio.ensure_future(_generate(engine, PROMPT, pruner))
        while not pruner.infos:
            await asyncio.sleep(0.001)
        engine.call(lambda e: e.scheduler.preempt(keep=None)).result()  # what a full KV cache does to it
        return await task

    out = asyncio.run(go())
    assert pruner.readmitted  # re-admitted by a fresh prefill of its kept tokens ...
    assert out.token_ids == expected.token_ids  # ... which is what exact pruning had in its cache
    assert engine.pool.num_in_use == 0
