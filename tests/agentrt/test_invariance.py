"""Same request, same numbers: a cached prefix gives what a fresh prefill gives, and in deterministic mode
a request's logits do not depend on what shares its batch. Checked bit for bit, in fp32 and in bf16
(whatever this CPU's default is), on the seeded tiny-random model."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from agentrt.engine import exact
from agentrt.engine import Engine
from agentrt.engine.sampling import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=True)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(300, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SHARED = _prompt(0, 70)  # four full pages and a bit, shared by the prompts below
PROMPT = SHARED + _prompt(1, 29)
OTHERS = [SHARED + _prompt(2, 9), _prompt(3, 40), SHARED[:40] + _prompt(4, 61), _prompt(5, 3), SHARED + _prompt(6, 130)]


@pytest.fixture(scope="module", params=DTYPES, ids=["fp32", "bf16"])
def model_in(request, tiny_parts):
    model, tok, eos = tiny_parts
    copy = type(model)(model.cfg)
    copy.load_state_dict(model.state_dict())
    copy = copy.to(request.param).eval()
    copy.rotary.inv_freq = model.rotary.inv_freq.float()  # RoPE angles stay in fp32, as load_transformer has them
    return copy, tok, eos


@pytest.fixture
def engine_of(model_in):
    engines = []

    def make(**kwargs) -> Engine:
        model, tok, eos = model_in
        engines.append(Engine(model, tok, eos_token_ids=eos, **kwargs))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def _run_together(engine: Engine, prompts: list[list[int]]) -> list:
    async def go():
        return await asyncio.gather(*[engine.generate(p, PARAMS) for p in prompts])

    return asyncio.run(go())


def test_a_cached_prefix_gives_what_a_fresh_prefill_gives(engine_of):
    fresh = engine_of().generate_sync(PROMPT, PARAMS)
    engine = engine_of()
    for other in OTHERS:
        engine.generate_sync(other, PARAMS)
    hits = engine.pool.prefix_hit_tokens
    after = engine.generate_sync(PROMPT, PARAMS)
    assert engine.pool.prefix_hit_tokens - hits == 64  # its shared pages came from the cache
    again = engine.generate_sync(PROMPT, PARAMS)  # all of the prompt cached but its last page
    assert after.token_ids == fresh.token_ids == again.token_ids
    assert after.logprobs == fresh.logprobs == again.logprobs  # bit for bit


def test_deterministic_mode_is_batch_invariant(engine_of):
    alone = engine_of(deterministic=True).generate_sync(PROMPT, PARAMS)
    engine = engine_of(deterministic=True)
    steps = engine.steps
    batched = _run_together(engine, [*OTHERS, PROMPT])
    assert engine.steps - steps < sum(PARAMS.max_tokens for _ in range(6))  # they shared their steps
    after = engine.generate_sync(PROMPT, PARAMS)  # now with decoded pages of others in the cache too
    assert batched[-1].token_ids == alone.token_ids == after.token_ids
    assert batched[-1].logprobs == alone.logprobs == after.logprobs


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_exact_linear_rows_do_not_depend_on_the_batch(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 80, generator=g) * 0.1).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(70, 80, generator=g).to(dtype)
    full = exact.linear(x, w, bias, rows=16)
    for lo, hi in [(0, 1), (3, 4), (5, 38), (60, 70), (1, 70)]:
        assert torch.equal(exact.linear(x[lo:hi], w, bias, rows=16), full[lo:hi])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(full, F.linear(x, w, bias), atol=tol, rtol=tol)


@pytest.mark.parametrize("tiles", [exact.PREFILL_TILES, exact.DETERMINISTIC_TILES], ids=["prefill", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_exact_attention_queries_do_not_depend_on_chunking_or_padding(dtype, tiles):
    g = torch.Generator().manual_seed(1)
    kv, rep, d, t = 2, 3, 16, 150
    k, v = (torch.randn(1, kv, t, d, generator=g).to(dtype) for _ in range(2))
    q_tok = torch.randn(t, kv, rep, d, generator=g).to(dtype)

    def run(tokens: list[int], keys: int) -> torch.Tensor:  # -> [kv, rep, len(tokens), d]
        n = len(tokens)
        q = q_tok[tokens].permute(1, 2, 0, 3).reshape(1, kv, rep * n, d)
        mask = torch.zeros(1, 1, n, keys, dtype=torch.bool)
        for i, p in enumerate(tokens):
            mask[0, 0, i, :p + 1] = True
        mask = mask.unsqueeze(2).expand(1, 1, rep, n, keys).reshape(1, 1, rep * n, keys)
        plan = exact.attention_plan(mask, tiles)
        return exact.attention(q, k[:, :, :keys], v[:, :, :keys], plan).view(kv, rep, n, d)

    prefill = run(list(range(t)), t)
    assert torch.equal(run([120], 121)[:, :, 0], prefill[:, :, 120])  # decoding it alone
    assert torch.equal(run(list(range(100, 130)), 130)[:, :, 20], prefill[:, :, 120])  # a chunk after a cache
    assert torch.equal(run([120], t)[:, :, 0], prefill[:, :, 120])  # padded to a longer row's keys
    q = q_tok[[120]].permute(1, 2, 0, 3).float()  # [kv, rep, 1, d]
    ref = F.scaled_dot_product_attention(q, k[0, :, None, :121].float(), v[0, :, None, :121].float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prefill[:, :, 120:121].float(), ref, atol=tol, rtol=tol)


def test_the_environment_turns_deterministic_mode_on(engine_of, monkeypatch):
    monkeypatch.setenv("AGENTRT_DETERMINISTIC", "1")
    assert engine_of().deterministic and not engine_of(deterministic=False).deterministic
    monkeypatch.setenv("AGENTRT_DETERMINISTIC", "0")
    assert not engine_of().deterministic
