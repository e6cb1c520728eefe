"""Our forward against transformers' own model on the same weights (fp32 logits parity)."""

from __future__ import annotations

import pytest
import torch

from agentrt.engine.kv import KVPool, KVSequence
from agentrt.engine import feed_sequence as run_ours
from agentrt.engine.loader import load_transformer
from agentrt.engine.models import resolve_model


def pool_for(model, tokens: int = 512) -> KVPool:
    cfg = model.cfg
    return KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens // 16, 16)


def parity(model_dir, prompt: list[int], steps: int = 32) -> tuple[float, float]:
    """Max |logit difference| for the prefill and for `steps` greedy decode steps."""
    from transformers import AutoModelForCausalLM

    ours = load_transformer(model_dir, quant="none")  # our dense forward; agentrt.engine.quant has its own parity test
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool, seq = pool_for(ours), KVSequence()
    mine = run_ours(ours, pool, seq, prompt)
    with torch.no_grad():
        out = ref(torch.tensor([prompt]), use_cache=True)
    prefill_diff = (mine - out.logits[0]).abs().max().item()
    decode_diff, past = 0.0, out.past_key_values
    token = int(out.logits[0, -1].argmax())
    for _ in range(steps):
        mine = run_ours(ours, pool, seq, [token])[-1]
        with torch.no_grad():
            out = ref(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, theirs = out.past_key_values, out.logits[0, -1]
        decode_diff = max(decode_diff, (mine - theirs).abs().max().item())
        token = int(theirs.argmax())
    return prefill_diff, decode_diff


PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198, 19556, 1015, 3251, 2]


def test_tiny_random_matches_transformers():
    prefill, decode = parity(resolve_model("tiny-random"), PROMPT)
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)


@pytest.mark.slow
def test_smollm2_matches_transformers():
    # measured: prefill 0.0, decode max 4.1e-5 over 32 greedy steps (fp32, 2-core CPU)
    prefill, decode = parity(resolve_model("smollm2-135m"), PROMPT)
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)


def _save_random(tmp_path, config) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(tmp_path)
    return tmp_path


SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    # qkv bias, untied embeddings
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    # q/k norm, explicit head_dim different from hidden/heads
    "qwen3": ("Qwen3Config", dict(head_dim=24)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    # RoPE scaling variants
    "llama-rope-llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-rope-linear": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                               "factor": 2.0})),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_other_architectures_match_transformers(tmp_path, arch):
    import transformers

    cls, extra = ARCHS[arch]
    config = getattr(transformers, cls)(**SMALL, **extra)
    prompt = [int(t) for t in torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))]
    prefill, decode = parity(_save_random(tmp_path, config), prompt, steps=8)
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config

    from agentrt.errors import UnsupportedModelError

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_transformer(tmp_path)


def test_dtype_auto_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    import agentrt.engine.loader as model_mod
    from agentrt.engine.loader import resolve_dtype

    monkeypatch.delenv("AGENTRT_DTYPE", raising=False)
    monkeypatch.setattr(model_mod, "_cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(None, "cpu") is torch.bfloat16 and resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(model_mod, "_cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16 and resolve_dtype(torch.float32, "cuda") is torch.float32
    monkeypatch.setenv("AGENTRT_DTYPE", "float32")  # stands in for "auto", never for an explicit dtype
    assert resolve_dtype("auto", "cuda") is torch.float32 and resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_an_unknown_dtype_is_a_clear_error():
    from agentrt.engine import Engine
    from agentrt.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="dtype 'fp8' is not one of auto, float32, bfloat16") as exc:
        Engine.load("tiny-random", device="cpu", dtype="fp8")
    assert exc.value.param == "dtype"


def test_cascade_attention_equals_gathering_every_row(tiny_parts):
    """Rows that share cached pages: reading the shared keys once (cascade, merged by log-sum-exp)
    gives the logits of gathering every row's keys, on rows of different lengths (padding masked)."""
    from agentrt.engine.model import AttentionGroup, BatchInput

    model, _, _ = tiny_parts
    pool = pool_for(model)
    base, forks = KVSequence(), []
    run_ours(model, pool, base, list(range(100, 148)))  # 48 tokens: three full pages
    for i in range(4):
        fork = pool.fork(base)
        run_ours(model, pool, fork, list(range(300 + i, 300 + 2 * i + 3)))  # 3..9 tokens of its own
        forks.append(fork)
    n, t = len(forks), max(f.length for f in forks) + 1
    ids, positions = torch.tensor([7, 8, 9, 10]), torch.tensor([f.length for f in forks])
    writes = torch.cat([pool.append(f, 1) for f in forks])
    slots = torch.zeros(n, t, dtype=torch.long)
    mask = torch.zeros(n, 1, 1, t, dtype=torch.bool)
    for i, f in enumerate(forks):
        slots[i, :f.length], mask[i, 0, 0, :f.length] = pool.slots(f), True
    logits = {}
    for shared in (0, 48):
        group = AttentionGroup(torch.arange(n).view(-1, 1), slots, mask, shared=shared)
        logits[shared] = model(BatchInput(ids, positions, writes, [group], torch.arange(n)), pool.k, pool.v)
    assert torch.equal(slots[:, :48], slots[:1, :48].expand(n, 48))  # the shared pages really are shared
    assert (logits[48] - logits[0]).abs().max().item() <= 1e-4
