"""The engine loop: continuous batching, chunked prefill, prefix sharing, sampling, stops, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from agentrt.engine.constraint import TokenConstraint
from agentrt.errors import ContextLengthError, EngineClosedError, InvalidRequestError, SamplingParamError
from agentrt.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[int(t) for t in torch.randint(3, 49000, (5 + 9 * i,), generator=g)] for i in range(n)]


def test_concurrent_greedy_outputs_equal_each_run_alone(make_engine):
    engine = make_engine(max_batch_tokens=96)  # small budget: prompts are chunked across steps
    ps = prompts(16)
    alone = [engine.generate_sync(p, GREEDY).token_ids for p in ps]

    async def together():
        return await asyncio.gather(*(engine.generate(p, GREEDY) for p in ps))

    steps_before = engine.steps
    outs = asyncio.run(together())
    assert [o.token_ids for o in outs] == alone
    assert engine.steps - steps_before < sum(len(a) for a in alone)  # they really shared steps
    assert engine.pool.num_in_use == 0


def test_requests_sharing_cached_pages_read_them_once_and_decode_as_alone(make_engine, monkeypatch):
    # cascade attention: the keys of pages the prefix cache shares are attended once for all rows
    import agentrt.engine.model

    calls = []
    cascade = agentrt.engine.model._cascade
    monkeypatch.setattr(agentrt.engine.model, "_cascade", lambda *a: calls.append(1) or cascade(*a))
    monkeypatch.setattr(agentrt.engine.model, "CASCADE_FROM", 16)
    common = prompts(4)[3] * 2  # 64 tokens: four full pages every request shares
    asks = [common + p[:2 + i] for i, p in enumerate(prompts(4))]
    engine = make_engine()
    alone = [engine.generate_sync(p, GREEDY).token_ids for p in asks]
    assert not calls  # one row at a time: nothing to share

    async def together():
        return await asyncio.gather(*(engine.generate(p, GREEDY) for p in asks))

    assert [c.token_ids for c in asyncio.run(together())] == alone
    assert calls


def test_chunked_prefill_matches_a_single_chunk(make_engine):
    p = prompts(12)[-1]  # 104 tokens
    big = make_engine(max_batch_tokens=1024).generate_sync(p, GREEDY).token_ids
    small = make_engine(max_batch_tokens=16).generate_sync(p, GREEDY).token_ids
    assert small == big


def test_identical_prefixes_share_pages(tiny_engine):
    p = prompts(8)[-1]
    first = tiny_engine.generate_sync(p, GREEDY)
    steps = tiny_engine.steps
    second = tiny_engine.generate_sync(p + [], GREEDY)
    assert second.token_ids == first.token_ids
    # the cached prefix left a single token to prefill: one step per generated token
    assert tiny_engine.steps - steps == len(second.token_ids)


def test_preemption_under_a_small_cache_keeps_outputs_exact(make_engine):
    ps = prompts(6)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = make_engine()
    expected = [roomy.generate_sync(p, params).token_ids for p in ps]
    tight = make_engine(kv_tokens=160, page_size=16)

    async def together():
        return await asyncio.gather(*(tight.generate(p, params) for p in ps))

    assert [o.token_ids for o in asyncio.run(together())] == expected
    assert tight.pool.num_in_use == 0


def test_max_tokens_gives_length(tiny_engine):
    out = tiny_engine.generate_sync([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out.finish_reason == "length" and out.completion_tokens == 3 and len(out.token_ids) == 3


def test_stop_token_ids_end_with_stop(tiny_engine):
    free = tiny_engine.generate_sync([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    target = free.token_ids[3]
    out = tiny_engine.generate_sync([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True,
                                                              stop_token_ids=[target]))
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:free.token_ids.index(target)]


def test_stop_strings_truncate_text_and_never_leak(tiny_engine):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    free = tiny_engine.generate_sync([100, 200, 300], params)
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"

    async def run():
        parts = []
        async for out in tiny_engine.stream([100, 200, 300], SamplingParams(max_tokens=30, ignore_eos=True,
                                                                           stop=[stop])):
            parts.append(out)
        return parts

    parts = asyncio.run(run())
    streamed = "".join(p.text for p in parts)
    assert parts[-1].finish_reason == "stop"
    assert streamed == text[:text.index(stop)]
    assert stop not in streamed


def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = engine.generate_sync([9, 8, 7], params).token_ids

    async def crowded():
        others = [engine.generate(p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
                  for p in prompts(4)]
        return await asyncio.gather(engine.generate([9, 8, 7], params), *others)

    assert asyncio.run(crowded())[0].token_ids == a
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, seed=124, ignore_eos=True)
    assert engine.generate_sync([9, 8, 7], other_seed).token_ids != a


def test_top_k_one_is_greedy(tiny_engine):
    greedy = tiny_engine.generate_sync([1, 2, 3], GREEDY).token_ids
    topk = tiny_engine.generate_sync([1, 2, 3], SamplingParams(max_tokens=12, temperature=5.0, top_k=1,
                                                               ignore_eos=True)).token_ids
    assert topk == greedy


def test_top_logprobs_rank_the_alternatives_of_each_sampled_token(tiny_engine):
    out = tiny_engine.generate_sync([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True, top_logprobs=3))
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy takes the most likely
        assert top[token] == lp and all(v <= lp for v in top.values())
    plain = tiny_engine.generate_sync([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True))
    assert plain.logprobs == out.logprobs and plain.top_logprobs is None


def test_top_logprobs_are_taken_after_the_grammar_mask(make_engine):
    engine = make_engine()
    c = EvenTokensOnly(engine.vocab_size, engine.tokenizer.eos_token_id)
    out = engine.generate_sync([11, 12, 13], SamplingParams(max_tokens=3, top_logprobs=5), c)
    assert all(t % 2 == 0 for top in out.top_logprobs for t in top)  # masked tokens are not alternatives


def test_repetition_penalty_steers_greedy_decoding_off_every_seen_token(tiny_engine):
    prompt = [5, 6, 7, 8]
    plain = tiny_engine.generate_sync(prompt, SamplingParams(max_tokens=24, ignore_eos=True)).token_ids
    out = tiny_engine.generate_sync(prompt, SamplingParams(max_tokens=24, ignore_eos=True,
                                                           repetition_penalty=100.0)).token_ids
    # a random model's positive logits shrink a hundredfold once seen: each token is a new one
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
    assert out != plain or len(set(plain)) == len(plain)


def test_frequency_and_presence_penalties_subtract_per_count():
    from agentrt.engine.sampling import apply_penalties

    logits = torch.zeros(2, 8)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    apply_penalties(logits, [(1, p, [7], [2, 2, 3])])
    assert logits[0].tolist() == [0.0] * 8  # an unpenalised row is untouched
    assert logits[1].tolist() == [0, 0, -2.0, -1.5, 0, 0, 0, 0]  # the prompt's 7 is not counted
    rep = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    apply_penalties(rep, [(0, SamplingParams(repetition_penalty=2.0), [0], [1])])
    assert rep.tolist() == [[1.0, -4.0, 2.0, 1.0]]


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_tokens", 0), ("stop", [""]), ("seed", "x"), ("top_logprobs", 21),
                                         ("top_logprobs", -1), ("frequency_penalty", 2.5),
                                         ("presence_penalty", -3), ("repetition_penalty", 0.0)])
def test_invalid_sampling_values_name_the_parameter(field, value):
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field and field in str(err.value)


def test_prompt_longer_than_context_names_both_numbers(make_engine):
    engine = make_engine(kv_tokens=64)
    with pytest.raises(ContextLengthError) as err:
        engine.generate_sync(list(range(10, 80)), GREEDY)
    assert "70" in str(err.value) and "64" in str(err.value)
    assert engine.pool.num_in_use == 0


def test_bad_prompt_ids_are_rejected(tiny_engine):
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate_sync([10**9], GREEDY)
    with pytest.raises(InvalidRequestError):
        tiny_engine.generate_sync([], GREEDY)


def test_generation_stops_at_the_context_limit(make_engine):
    engine = make_engine(kv_tokens=48)
    out = engine.generate_sync(list(range(10, 40)), SamplingParams(max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length" and 30 + out.completion_tokens <= 48
    assert engine.pool.num_in_use == 0


def test_breaking_out_of_a_stream_cancels_and_frees_pages(tiny_engine):
    async def run():
        got = 0
        async for _ in tiny_engine.stream([4, 5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True)):
            got += 1
            if got == 3:
                break
        for _ in range(100):  # the engine frees the pages before its next step
            if tiny_engine.num_active == 0:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(run()) == 3
    assert tiny_engine.pool.num_in_use == 0 and tiny_engine.num_active == 0


def test_cancelled_task_frees_pages(tiny_engine):
    async def run():
        task = asyncio.create_task(tiny_engine.generate([4, 5, 6], SamplingParams(max_tokens=10_000,
                                                                                   ignore_eos=True)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if tiny_engine.num_active == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert tiny_engine.pool.num_in_use == 0 and tiny_engine.num_active == 0


class EvenTokensOnly:
    """A real TokenConstraint (not a stand-in for ours): allows even token ids, ends after 5 tokens."""

    def __init__(self, vocab: int, stop_id: int) -> None:
        self.vocab, self.stop_id, self.accepted, self.masks = vocab, stop_id, [], 0

    def fill_next_token_bitmask(self, bitmask, index):
        self.masks += 1
        allowed = torch.zeros(bitmask.shape[1] * 32, dtype=torch.bool)
        if len(self.accepted) < 5:
            allowed[0:self.vocab:2] = True
        else:
            allowed[self.stop_id] = True
        packed = np.packbits(allowed.numpy(), bitorder="little").view(np.int32)  # bit i of word w = token 32w+i
        bitmask[index] = torch.from_numpy(packed)

    def accept_token(self, token_id):
        ok = token_id == self.stop_id if len(self.accepted) >= 5 else token_id % 2 == 0
        if ok:
            self.accepted.append(token_id)
        return ok

    def is_terminated(self):
        return bool(self.accepted) and self.accepted[-1] == self.stop_id

    def find_jump_forward_string(self):
        return ""

    def rollback(self, num_tokens):
        del self.accepted[len(self.accepted) - num_tokens:]


@pytest.mark.parametrize("overlap", [True, False], ids=["masks during the forward", "masks before it"])
def test_token_mask_hook_constrains_every_step(make_engine, overlap):
    engine = make_engine(mask_overlap=overlap)
    eos = engine.tokenizer.eos_token_id
    c = EvenTokensOnly(engine.vocab_size, eos)
    assert isinstance(c, TokenConstraint)
    out = engine.generate_sync([11, 12, 13], SamplingParams(max_tokens=50, temperature=1.0, seed=1), c)
    assert out.finish_reason == "stop" and not out.incomplete
    assert len(out.token_ids) == 5 and all(t % 2 == 0 for t in out.token_ids)
    assert c.masks == 6 and c.is_terminated()


def test_masks_overlap_the_forward_only_where_their_thread_gets_a_core(make_engine, monkeypatch):
    import os

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert make_engine().masks.overlap is False  # the forward's threads hold every core
    assert make_engine(mask_overlap=True).masks.overlap is True
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert make_engine().masks.overlap is True


def test_constrained_output_cut_by_max_tokens_is_marked_incomplete(tiny_engine):
    c = EvenTokensOnly(tiny_engine.vocab_size, tiny_engine.tokenizer.eos_token_id)
    out = tiny_engine.generate_sync([11, 12, 13], SamplingParams(max_tokens=3), c)
    assert out.finish_reason == "length" and out.incomplete


def test_a_faulty_constraint_fails_its_request_only(tiny_engine):
    class Broken(EvenTokensOnly):
        def accept_token(self, token_id):
            raise RuntimeError("matcher exploded")

    async def run():
        ok = tiny_engine.generate([1, 2], SamplingParams(max_tokens=8, ignore_eos=True))
        bad = tiny_engine.generate([1, 2], SamplingParams(max_tokens=8), Broken(tiny_engine.vocab_size, 2))
        return await asyncio.gather(ok, bad, return_exceptions=True)

    good, bad = asyncio.run(run())
    assert good.completion_tokens == 8
    assert "matcher exploded" in str(bad)
    assert tiny_engine.pool.num_in_use == 0


def test_closed_engine_refuses_work(make_engine):
    engine = make_engine()
    engine.generate_sync([1, 2, 3], SamplingParams(max_tokens=2))
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.generate_sync([1, 2, 3], GREEDY)


def test_chat_prompt_uses_the_template(tiny_engine):
    ids = tiny_engine.chat_prompt([{"role": "user", "content": "hello"}])
    text = tiny_engine.tokenizer.decode(ids)
    assert "<|im_start|>user\nhello<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_answers_a_question(smol_engine, smol_knows_trivia):
    ids = smol_engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = smol_engine.generate_sync(ids, SamplingParams(max_tokens=24))
    assert out.text.strip() and out.finish_reason == "stop"
    assert "Paris" in out.text or not smol_knows_trivia
    assert smol_engine.pool.num_in_use == 0
