"""The fused decode step: its torch twins against the plain forward, the Triton kernels against the twins.

The Triton kernels run on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before
the run, with triton installed); elsewhere those tests skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from agentrt.engine import kernels
from agentrt.engine.cuda_graphs import DecodeGraphs, batch_buckets
from agentrt.engine import feed_sequence
from agentrt.engine.kv import KVPool, KVSequence
from agentrt.engine.sampling import SamplingParams

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton is not None
needs_triton = pytest.mark.skipif(
    not (kernels.triton_ready("cuda") and CUDA) and not INTERPRET,
    reason="Triton kernels need CUDA (or TRITON_INTERPRET=1 with triton installed)")
DEVICE = "cuda" if CUDA else "cpu"


def _pool(model, pages=64, page_size=4):
    cfg = model.cfg
    return KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, pages, page_size,
                  dtype=model.embed.weight.dtype, device=model.embed.weight.device)


def test_batch_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert batch_buckets(512) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256, 384, 512]


def test_fused_decode_matches_forward(tiny_parts):
    """Three sequences of different lengths, with pages out of order: the fused step (run through the
    graph runner's buffers, eagerly off CUDA) gives the plain forward's logits, for one new token per
    sequence and for chunks of several (each token attends causally within its chunk)."""
    model, _, _ = tiny_parts
    prompts = [[5, 9, 200, 31, 7], [8] * 11, [300, 301, 302, 303, 304, 305, 306, 307, 308, 1, 2, 3, 4, 5, 6, 7, 8]]
    steps = [[[17], [18], [19]], [[20, 21, 22], [23], [24, 25]]]  # a decode step, then a step with chunks
    plain, fused = _pool(model), _pool(model)
    plain._free.reverse()  # the two pools hand out different pages: only the page tables may tell
    graphs = DecodeGraphs(model, fused, max_tokens=8, max_rows=3, max_context=256)
    seqs = []
    for p in prompts:
        s = KVSequence()
        feed_sequence(model, fused, s, p)
        seqs.append(s)
    fed = [list(p) for p in prompts]
    for chunks in steps:
        for s, c in zip(seqs, chunks):
            fused.append(s, len(c))
        got = graphs.run(list(zip(seqs, chunks)), want=[0, 2])  # the middle row samples nothing
        want = []
        for i, c in enumerate(chunks):
            fed[i] += c
            ref = KVSequence()
            want.append(feed_sequence(model, plain, ref, fed[i])[-1])
            plain.free(ref)
        assert got.shape == (2, model.cfg.vocab_size)
        torch.testing.assert_close(got, torch.stack([want[0], want[2]]), atol=1e-4, rtol=1e-4)


def test_engine_with_fused_decode_matches_plain_engine(make_engine):
    """Greedy outputs of concurrent requests: the fused decode path changes no token."""
    plain = make_engine(cuda_graphs=False)
    fused = make_engine(cuda_graphs=True)
    prompts = [f"Count from {i} to {i + 20}:" for i in range(5)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    def run(engine):
        import asyncio

        async def go():
            return await asyncio.gather(*(engine.generate(p, params) for p in prompts))

        return [c.token_ids for c in asyncio.run(go())]

    assert run(fused) == run(plain)
    assert fused.pool.num_in_use == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_twins(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter computes bf16 dot products wrongly; bf16 is checked on CUDA")
    torch.manual_seed(0)
    dev = DEVICE
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    n, c = 5, 96
    x, res, w = (torch.randn(n, c, device=dev).to(dtype) for _ in range(3))
    for r in (None, res):
        got = kernels.add_rms_norm(x, r, w[0], 1e-5, use_triton=True)
        want = kernels.add_rms_norm(x, r, w[0], 1e-5, use_triton=False)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)

    gu = torch.randn(n, 2 * 1500, device=dev).to(dtype)  # more than one block of columns
    torch.testing.assert_close(kernels.silu_mul(gu, use_triton=True), kernels.silu_mul(gu, use_triton=False), **tol)

    h, kv, d, page, slots_total = 6, 2, 64, 4, 256
    qkv = torch.randn(n, (h + 2 * kv) * d, device=dev).to(dtype)
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
    q, k, v = q.view(n, h, d), k.view(n, kv, d), v.view(n, kv, d)
    pos = torch.tensor([0, 3, 17, 100, 5], device=dev)
    freqs = pos.float()[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    slots = torch.tensor([3, 9, -1, 40, 41], dtype=torch.int32, device=dev)
    pools = [torch.zeros(slots_total, kv, d, device=dev, dtype=dtype) for _ in range(4)]
    q1 = kernels.rope_write_kv(q, k, v, cos, sin, pools[0], pools[1], slots, use_triton=True)
    q2 = kernels.rope_write_kv(q, k, v, cos, sin, pools[2], pools[3], slots, use_triton=False)
    torch.testing.assert_close(q1, q2, **tol)
    torch.testing.assert_close(pools[0], pools[2], **tol)
    torch.testing.assert_close(pools[1], pools[3], **tol)
    assert pools[0][[0, 1, 2]].abs().sum() == 0  # untouched slots stay untouched; slot -1 wrote nothing

    kp = torch.randn(4 * slots_total, kv, d, device=dev).to(dtype)
    vp = torch.randn(4 * slots_total, kv, d, device=dev).to(dtype)
    lengths = torch.tensor([1, 70, 0, 130, 64], dtype=torch.int32, device=dev)  # several key blocks, a padding row
    table = torch.randperm(4 * slots_total // page, device=dev)[: 5 * 40].view(5, 40).to(torch.int32)
    qa = torch.randn(n, h, d, device=dev).to(dtype)
    got = kernels.paged_decode_attention(qa, kp, vp, table, lengths, page, use_triton=True)
    want = kernels.paged_decode_attention(qa, kp, vp, table, lengths, page, use_triton=False)
    torch.testing.assert_close(got, want, **tol)
    assert got[2].abs().sum() == 0

    # hogwild views: a slot table (page size 1) and a position delta per key, rotated in the kernel
    slot_table = torch.randperm(4 * slots_total, device=dev)[: 5 * 160].view(5, 160).to(torch.int32)
    delta = torch.randint(-300, 300, (5, 160), device=dev, dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=dev).float() / d)
    got = kernels.paged_decode_attention(qa, kp, vp, slot_table, lengths, 1, delta, inv_freq, use_triton=True)
    want = kernels.paged_decode_attention(qa, kp, vp, slot_table, lengths, 1, delta, inv_freq, use_triton=False)
    torch.testing.assert_close(got, want, **tol)
    unrotated = kernels.paged_decode_attention(qa, kp, vp, slot_table, lengths, 1, use_triton=True)
    assert not torch.allclose(unrotated[3], got[3], **tol)  # the deltas matter


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_engine_matches_eager_engine(tiny_parts):
    """On a GPU: the engine with captured decode graphs gives the eager engine's greedy tokens, for
    batch sizes that hit several buckets and padding rows."""
    from agentrt.engine import Engine

    import copy

    model, tok, eos = tiny_parts
    model = copy.deepcopy(model).to("cuda")
    prompts = [f"Item {i}: the quick brown fox" * (1 + i % 3) for i in range(11)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        with Engine(model, tok, eos_token_ids=eos, kv_tokens=4096, cuda_graphs=graphs) as engine:
            import asyncio

            async def go():
                return await asyncio.gather(*(engine.generate(p, params) for p in prompts))

            outs.append([c.token_ids for c in asyncio.run(go())])
            assert engine.pool.num_in_use == 0
            if graphs:
                assert engine._graphs._graphs  # graphs were captured and replayed
    assert outs[0] == outs[1]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_hogwild_matches_plain_hogwild(tiny_parts):
    """On a GPU: the hogwild pool's views through captured graphs (slot tables, key deltas rotated in
    the kernel) give the same greedy tokens as its plain attention-group forward."""
    import copy

    from agentrt.engine import Engine
    from agentrt.engine.hogwild import HogwildPool

    model, tok, eos = tiny_parts
    model = copy.deepcopy(model).to("cuda")
    with Engine(model, tok, eos_token_ids=eos, kv_tokens=8192) as engine:
        outs = [HogwildPool(engine, 3, max_step_tokens=4, fused=fused).run_sync("Plan a trip to Paris.",
                                                                             max_tokens=60).token_ids
                for fused in (False, True)]
        assert engine.pool.num_in_use == 0
    assert outs[0] == outs[1]
