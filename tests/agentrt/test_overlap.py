"""The overlap scheduler: each step's forward is launched before the last step's tokens are taken (grammar,
detokenising, stop checks, delivery), which happens while it runs. A request's tokens must not change:
checked against the same requests with it off, on the tiny-random model, greedy and seeded, constrained
(jump-forward included) and not, concurrent, and under preemption."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agentrt.engine.sampling import SamplingParams
from agentrt.grammar import GrammarCompiler, JsonSchema

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "size": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["name", "size", "ok"]}


def _requests(engine) -> list[tuple[list[int], SamplingParams, object]]:
    """(prompt, params, constraint factory or None) for a mixed batch of requests."""
    compiled = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size).compile(JsonSchema(SCHEMA))
    stop = sorted(engine.eos_token_ids)

    def json():
        return compiled.matcher(stop_token_ids=stop)

    prompt = [engine.chat_prompt([{"role": "user", "content": f"({i}) Describe a box as JSON."}]) for i in range(7)]
    return [
        (prompt[0], SamplingParams(max_tokens=30), None),
        (prompt[1], SamplingParams(max_tokens=25, temperature=1.0, seed=7, logprobs=True), None),
        (prompt[2], SamplingParams(max_tokens=60), json),
        (prompt[3], SamplingParams(max_tokens=60, temperature=1.0, top_p=0.9, seed=11), json),
        (prompt[4], SamplingParams(max_tokens=40, temperature=0.8, seed=3, stop=["e"]), None),
        (prompt[5], SamplingParams(max_tokens=20, repetition_penalty=1.3, top_logprobs=2), None),
        (prompt[6][:9], SamplingParams(max_tokens=35, ignore_eos=True), None),
    ]


def _run(engine, requests) -> list[tuple]:
    async def go():
        return await asyncio.gather(*[engine.generate(p, params, c() if c else None) for p, params, c in requests])

    done = asyncio.run(go())
    assert engine.pool.num_in_use == 0
    return [(c.token_ids, c.text, c.finish_reason, c.logprobs, c.top_logprobs, c.incomplete) for c in done]


def _queued_takes(engine) -> list[bool]:
    """Record, for every sampled token taken, whether the forward had been launched with it first."""
    seen, sampled = [], engine.output.sampled

    def spy(seq, token, logprob=None, top=None, queued=False):
        seen.append(queued)
        return sampled(seq, token, logprob, top, queued)

    engine.output.sampled = spy
    return seen


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_overlap_gives_the_same_tokens(make_engine, deterministic):
    off, on = make_engine(overlap=False, deterministic=deterministic), make_engine(overlap=True,
                                                                                  deterministic=deterministic)
    assert (off.overlap, on.overlap) == (False, True)
    queued = _queued_takes(on)
    requests = _requests(off)
    if not deterministic:  # batch composition may differ by a step (a finished row, forced tokens): alone
        for r in requests:
            assert _run(on, [r]) == _run(off, [r])
    else:  # every row by the batch-invariant kernels: the whole mixed batch at once
        want = _run(off, requests)
        assert _run(on, requests) == want
        assert any(out[0] and out[2] == "stop" for out in want) and any(out[5] is False and out[0] for out in want)
    assert sum(queued) > len(queued) // 2  # most tokens were taken while the next forward ran


def test_overlap_gives_the_same_tokens_under_preemption(make_engine, caplog):
    # a pool too small for every request at once: the newest is preempted and recomputed later
    off, on = (make_engine(overlap=o, deterministic=True, kv_tokens=160, max_batch_size=4) for o in (False, True))
    requests = [(p[:30], SamplingParams(max_tokens=30, ignore_eos=True, temperature=1.0, seed=i), None)
                for i, (p, _, _) in enumerate(_requests(off)[:5])]
    with caplog.at_level(logging.INFO, logger="agentrt.engine.scheduler"):
        want = _run(off, requests)
        preempted = sum("preempted" in r.message for r in caplog.records)
        assert preempted
        assert _run(on, requests) == want
    assert sum("preempted" in r.message for r in caplog.records) > preempted  # preempted with overlap too


def test_overlap_streams_and_cancels(make_engine):
    engine = make_engine(overlap=True)
    prompt = engine.chat_prompt([{"role": "user", "content": "Count."}])

    async def go():
        outs = []
        async for out in engine.stream(prompt, SamplingParams(max_tokens=50, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 5:
                break  # leaving the stream cancels the request
        return outs

    assert [len(o.token_ids) for o in asyncio.run(go())] == [1] * 5
    alone = engine.generate_sync(prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    assert alone.completion_tokens == 5 and engine.pool.num_in_use == 0
