"""Quantized linears (agentrt.engine.quant): the GGUF's blocks read faithfully, the kernels' convention, batch
invariance, and the embedded model's quantized forward against its dequantised fp32 forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agentrt.engine import quant
from agentrt.errors import InvalidRequestError
from agentrt.engine.exact import PREFILL_TILES

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory):
    """A small GGUF written with gguf's own writer and quantizer: one tensor per block type."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for name, qtype, rows in (("w.q4_0", Q.Q4_0, 48), ("w.q4_1", Q.Q4_1, 32), ("w.q4_1_odd", Q.Q4_1, 40), ("w.q8_0", Q.Q8_0, 24)):
        w = (rng.standard_normal((rows, 96)) * 0.05 + rng.standard_normal((rows, 1)) * 0.02).astype(np.float32)
        blocks = gguf.quants.quantize(w, qtype)
        values[name] = gguf.quants.dequantize(blocks, qtype)
        writer.add_tensor(name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, values


def test_blocks_read_like_gguf_dequantizes(synthetic_gguf):
    path, values = synthetic_gguf
    weights, arch = quant.read_gguf_weights(path)
    assert arch == "llama" and set(weights) == set(values)
    for name, ref in values.items():
        w = weights[name]
        assert (w.groups is None) == (name == "w.q8_0")  # 4-bit blocks stay blocks
        # (q - 8) * d + (m + 8d) against gguf's d * q + m: fp32 rounding apart
        np.testing.assert_allclose(w.values().numpy(), ref, rtol=0, atol=1e-6)


def test_int4_kernel_convention_matches_the_blocks(synthetic_gguf):
    """W = (q - 8) * scale + zero is the kernel's convention: its product equals x @ W.T of the GGUF's own
    dequantised values, to bf16 rounding of activations, scales and outputs (the kernel's compute dtype)."""
    path, values = synthetic_gguf
    weights, _ = quant.read_gguf_weights(path)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    for name in ("w.q4_0", "w.q4_1", "w.q4_1_odd", "w.q8_0"):
        qw = quant._to_quant(weights[name])
        # 40 rows do not pack into the int4 kernel's 16-row tiles: those run as int8
        assert isinstance(qw, quant.Int4Weight if name in ("w.q4_0", "w.q4_1") else quant.Int8Weight)
        ref = x @ torch.from_numpy(values[name]).t()
        got = qw.mm(x)
        assert got.dtype == torch.float32
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 0.02 * scale, name
        # a wrong zero point (q * scale + zero, or the GGUF's m used as zero) would be off by far more
        if name == "w.q4_1":
            q, s, m8 = weights[name].groups
            off = x @ (q.float() * s.repeat_interleave(32, 1) + m8.repeat_interleave(32, 1)).t()
            assert (off - ref).abs().max().item() > 0.5 * scale


def test_q8_rows_requantized_within_half_a_step(synthetic_gguf):
    path, values = synthetic_gguf
    weights, _ = quant.read_gguf_weights(path)
    w = weights["w.q8_0"].values()
    i8 = quant.Int8Weight.from_dense(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    err = (i8.q.float() * i8.scale.float()[:, None] - w).abs()
    # half an int8 step per row, plus the scale's rounding to bf16 (2^-9 relative)
    assert bool((err <= step * (0.5 + 127 * 2 ** -8)).all())


def test_quantized_linear_is_batch_invariant(synthetic_gguf):
    """Rows from `split` on run in fixed-shape calls: a row's result is the same bits whatever shares
    its batch (as agentrt.engine.exact.linear)."""
    path, _ = synthetic_gguf
    weights, _ = quant.read_gguf_weights(path)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 96, generator=g)
    for name in ("w.q4_1", "w.q8_0"):
        qw = quant._to_quant(weights[name])
        alone = torch.cat([quant.linear(x[i:i + 1], qw, None, 0, PREFILL_TILES.rows) for i in range(40)])
        together = quant.linear(x, qw, None, 0, PREFILL_TILES.rows)
        mixed = quant.linear(torch.cat([torch.randn(3, 96, generator=g), x]), qw, None, 3, PREFILL_TILES.rows)[3:]
        assert torch.equal(alone, together) and torch.equal(alone, mixed), name


def test_reverse_permute_undoes_the_converter():
    """llama.cpp's converter interleaves each head's RoPE halves in q and k of llama models."""
    heads, rows = 3, 24
    w = torch.arange(rows * 4.0).view(rows, 4)
    permuted = w.view(heads, 2, rows // heads // 2, 4).transpose(1, 2).reshape(rows, 4)  # what it stores
    assert torch.equal(permuted[quant._reverse_permute(rows, heads)], w)


def test_resolve_quant(monkeypatch):
    monkeypatch.delenv("AGENTRT_QUANT", raising=False)
    assert quant.resolve_quant(None, "cpu", has_gguf=True) == "gguf"
    assert quant.resolve_quant("auto", "cpu", has_gguf=False) == "none"
    assert quant.resolve_quant(None, "cuda", has_gguf=True) == "none"
    assert quant.resolve_quant("int8", "cpu", has_gguf=False) == "int8"
    monkeypatch.setenv("AGENTRT_QUANT", "none")  # stands in for auto, never for an explicit choice
    assert quant.resolve_quant(None, "cpu", has_gguf=True) == "none"
    assert quant.resolve_quant("gguf", "cpu", has_gguf=True) == "gguf"
    monkeypatch.setenv("AGENTRT_QUANT", "gguf")  # a preference: models without a GGUF stay dense
    assert quant.resolve_quant(None, "cpu", has_gguf=False) == "none"
    assert quant.resolve_quant("auto", "cuda", has_gguf=True) == "none"
    for bad, kwargs in (("int3", {}), ("gguf", {"has_gguf": False}), ("int8", {"device": "cuda"})):
        with pytest.raises(InvalidRequestError, match="quant"):
            quant.resolve_quant(bad, kwargs.get("device", "cpu"), kwargs.get("has_gguf", True))


def test_engine_refuses_unknown_quant():
    from agentrt.engine import Engine

    with pytest.raises(InvalidRequestError, match="int3"):
        Engine.load("tiny-random", device="cpu", quant="int3")


# --- real models -----------------------------------------------------------------------------------
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 19556, 1015, 3251, 2]


def _greedy_logits(model, prompt: list[int], steps: int, tokens: list[int] | None = None) -> torch.Tensor:
    """Logits of the prompt's last token and of `steps` decode steps, fed `tokens` (or its own greedy
    choices): [steps + 1, V]."""
    from agentrt.engine import feed_sequence
    from agentrt.engine.kv import KVPool, KVSequence

    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 16, dtype=model.embed.weight.dtype)
    seq = KVSequence()
    rows = [feed_sequence(model, pool, seq, prompt)[-1]]
    for i in range(steps):
        token = int(rows[-1].argmax()) if tokens is None else tokens[i]
        rows.append(feed_sequence(model, pool, seq, [token], exact=False)[-1])
    return torch.stack(rows)


def test_int8_tiny_random_close_to_dense():
    from agentrt.engine.loader import load_transformer
    from agentrt.engine.models import resolve_model

    path = resolve_model("tiny-random")
    dense, q8 = load_transformer(path, quant="none"), load_transformer(path, quant="int8")
    assert isinstance(q8.layers[0].mlp.down, quant.QuantLinear) and q8.head_quant is not None
    ref = _greedy_logits(dense, PROMPT, 8)
    got = _greedy_logits(q8, PROMPT, 8, ref[:-1].argmax(-1).tolist())
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def _embedded_dir():
    from agentrt.engine.models import agentrt_home

    path = agentrt_home() / "models" / "smollm2-135m"
    if not (path / ".complete").exists() or quant.gguf_source(path) is None:
        pytest.skip("smollm2-135m is not cached here (agentrt pull fetches it)")
    return path


@pytest.fixture(scope="module")
def smol_pair():
    from agentrt.engine.loader import load_transformer

    path = _embedded_dir()
    return load_transformer(path, quant="none"), load_transformer(path, quant="gguf")


def test_gguf_weights_are_the_dequantised_ones(smol_pair):
    """Every quantized linear holds the weights transformers dequantised the GGUF to (q and k rows
    un-permuted), up to the bf16 rounding of each group's scale and zero (and of the output): within
    2^-7 of the group's largest weight, a tenth of a 4-bit step."""
    dense, q = smol_pair
    for i in (0, len(dense.layers) - 1):
        for a, b in ((dense.layers[i].attn.qkv, q.layers[i].attn.qkv), (dense.layers[i].mlp.down, q.layers[i].mlp.down)):
            assert isinstance(b.weight, quant.Int4Weight)
            ref = a.weight.detach()
            bound = ref.abs().view(ref.shape[0], -1, 32).amax(-1).repeat_interleave(32, 1) * 2 ** -7
            assert bool(((b.weight.dequantize().float() - ref).abs() <= bound).all())


def test_gguf_forward_matches_dequantised_fp32_forward(smol_pair):
    """Stated tolerance: the quantized forward (bf16 compute in the kernels, int8 LM head) is no farther
    from the dequantised fp32 forward than 1.5 the same forward run densely in bf16 is, and picks the
    same greedy token wherever the fp32 forward's top two differ by more than that distance.
    Measured on a 2-core EPYC (32 steps): max |logit diff| 0.95 (logit std 8.7), greedy tokens 32/32 equal."""
    dense, q = smol_pair
    ref = _greedy_logits(dense, PROMPT, 12)
    tokens = ref[:-1].argmax(-1).tolist()
    got = _greedy_logits(q, PROMPT, 12, tokens)
    bf16 = _bf16_copy(dense)
    yardstick = (_greedy_logits(bf16, PROMPT, 12, tokens) - ref).abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff <= 1.5 * yardstick, (diff, yardstick)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def _bf16_copy(model):
    import copy

    twin = copy.deepcopy(model).to(torch.bfloat16)
    twin.rotary.inv_freq = model.rotary.inv_freq.float()
    return twin


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_quantized_engine_keeps_invariance(tiny_parts, deterministic):
    """With int8 linears, a cached prefix still gives what a fresh prefill gives, and deterministic mode
    stays batch-invariant (the quantized kernels run in fixed-shape calls like agentrt.engine.exact's)."""
    import asyncio
    import copy

    from agentrt.engine import Engine
    from agentrt.engine.sampling import SamplingParams

    model, tok, eos = tiny_parts
    q8 = quant.quantize_model(copy.deepcopy(model), "int8")
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(300, 20000, (40,), generator=gen).tolist()
    prompt = shared + torch.randint(300, 20000, (9,), generator=gen).tolist()
    others = [shared + torch.randint(300, 20000, (n,), generator=gen).tolist() for n in (5, 30)]
    with Engine(q8, tok, eos_token_ids=eos, deterministic=deterministic) as fresh_engine:
        fresh = fresh_engine.generate_sync(prompt, params)
    with Engine(q8, tok, eos_token_ids=eos, deterministic=deterministic) as engine:
        async def together():
            return await asyncio.gather(*[engine.generate(p, params) for p in [*others, prompt]])

        batched = asyncio.run(together())[-1]
        cached = engine.generate_sync(prompt, params)
        assert engine.pool.prefix_hit_tokens > 0
    assert cached.logprobs == fresh.logprobs  # bit for bit through the prefix cache
    if deterministic:
        assert batched.logprobs == fresh.logprobs


def test_quantized_decode_step_matches_the_general_forward(tiny_parts):
    """A decode step over quantized weights runs the CPU decode step (fewer, larger ops): for one row and
    for three rows of different lengths it writes the same K/V and gives the same logits as forward's
    general path, within the bf16 rounding the kernels already add; a step with a prefill chunk does not
    take it."""
    import copy

    from agentrt.engine.kv import KVPool, KVSequence
    from agentrt.engine.model import AttentionGroup, BatchInput
    from agentrt.engine.runner import single_token_group

    model, _, _ = tiny_parts
    q8 = quant.quantize_model(copy.deepcopy(model), "int8")
    cfg = q8.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 32, 4, dtype=q8.embed.weight.dtype)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for n in (9, 30, 3):
        seq = KVSequence()
        pool.append(seq, n)
        seqs.append(seq)
    pool.k.normal_(generator=gen)  # stands in for the prompts' keys and values
    pool.v.normal_(generator=gen)
    for rows in (seqs[:1], seqs):
        writes = [pool.append(s, 1) for s in rows]
        b = len(rows)
        batch = BatchInput(torch.randint(300, 20000, (b,), generator=gen), torch.tensor([s.length - 1 for s in rows]),
                           torch.cat(writes), [single_token_group(list(range(b)), [pool.slots(s) for s in rows], False)],
                           torch.arange(b))
        assert q8._quantized_decode(batch)
        k0, v0 = pool.k.clone(), pool.v.clone()
        fast = q8(batch, pool.k, pool.v)
        kf, vf = pool.k.clone(), pool.v.clone()
        pool.k.copy_(k0)
        pool.v.copy_(v0)
        q8.quantized_decode = False
        try:
            plain = q8(batch, pool.k, pool.v)
        finally:
            q8.quantized_decode = True
        diff = (fast - plain).abs().max().item()
        assert diff <= 0.02 * plain.abs().max().item()
        top2 = plain.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff  # a random model's near-ties may flip
        assert torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])
        for got, want in ((kf, pool.k), (vf, pool.v)):
            assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
    chunk = AttentionGroup(torch.arange(2).view(1, 2), pool.slots(seqs[0]).view(1, -1), None)
    assert not q8._quantized_decode(BatchInput(torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([0, 1]),
                                               [chunk], torch.tensor([1])))


def test_kernel_threads_leave_the_cores_others_use(monkeypatch):
    assert quant.KernelThreads.spare(2, busy=2.0, own=1.0) == 1  # another process holds a core
    assert quant.KernelThreads.spare(2, busy=2.0, own=1.9) == 2  # the busy cores are ours
    assert quant.KernelThreads.spare(2, busy=2.0, own=0.1) == 1  # never fewer than one
    assert quant.KernelThreads.spare(16, busy=3.0, own=2.0) == 15
    threads = quant.KernelThreads(every=0.0)
    samples = iter([(0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 200.0, 200.0)])  # 1 s: both cores busy, one of them ours
    monkeypatch.setattr(threads, "_sample", lambda: next(samples))
    monkeypatch.setattr(quant.os, "cpu_count", lambda: 2)
    threads._last = threads._sample()
    before = torch.get_num_threads()
    try:
        assert threads.apply() == torch.get_num_threads() == 1
        threads.every, threads._spare = float("inf"), 64  # the other process left: the thread's first count
        assert threads.apply() == torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(quant.KernelThreads, "_sample", staticmethod(lambda: None))
    assert quant.KernelThreads(every=0.0).count(7) == 7  # no /proc/stat: torch's count
