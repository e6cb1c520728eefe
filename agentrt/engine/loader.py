"""Reading a model from disk: a Hugging Face directory (config and safetensors) into our Transformer, in
the dtype the hardware runs best, with the GGUF's own quantized blocks where asked (agentrt.engine.quant)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from agentrt.engine.config import ModelConfig
from agentrt.engine.model import Transformer
from agentrt.engine.quant import gguf_source, quantize_model, resolve_quant
from agentrt.errors import InvalidRequestError, UnsupportedModelError
from agentrt.engine.models import DTYPE_CHOICES, resolve_model

__all__ = ["load_model", "load_transformer", "read_generation_eos", "resolve_dtype", "DTYPES"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The weights' dtype: as given, or for None / "auto" bf16 wherever the hardware computes it natively.

    That is every CUDA GPU we run on, and CPUs with AVX512-BF16 or AMX: there a decode step streams half
    the bytes and oneDNN's bf16 GEMM keeps small batches nearly free (on a 2-core EPYC, batch 1 is 1.2x
    faster than fp32 and batch 4 costs 1.14x batch 1, against 1.5x in fp32). Other CPUs emulate bf16,
    so they stay in fp32. The environment variable AGENTRT_DTYPE, when set, stands in for None / "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = os.environ.get("AGENTRT_DTYPE") or None
        if dtype == "auto":
            dtype = None
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)




def _hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def _convert(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names onto ours, fusing q/k/v and gate/up."""
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        q = f"layers.{i}."
        out[q + "attn.qkv.weight"] = torch.cat([state[a + f"{n}_proj.weight"] for n in "qkv"])
        if cfg.qkv_bias:
            out[q + "attn.qkv.bias"] = torch.cat([state[a + f"{n}_proj.bias"] for n in "qkv"])
        out[q + "attn.o.weight"] = state[a + "o_proj.weight"]
        if cfg.qk_norm:
            out[q + "attn.q_norm.weight"] = state[a + "q_norm.weight"]
            out[q + "attn.k_norm.weight"] = state[a + "k_norm.weight"]
        out[q + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[q + "mlp_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[q + "mlp.gate_up.weight"] = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        out[q + "mlp.down.weight"] = state[p + "mlp.down_proj.weight"]
    return out


def load_transformer(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     quant: str | None = None) -> Transformer:
    """Build our Transformer from a local Hugging Face directory (config + safetensors).

    quant (agentrt.engine.quant.resolve_quant): "gguf" runs the layer linears on the blocks of the GGUF the
    directory was dequantised from (embedded models), "int8" quantizes the dense weights per row, "none"
    keeps them dense; None / "auto" is "gguf" on the CPU where there is a GGUF, else "none"."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    hf = AutoConfig.from_pretrained(model_dir)
    cfg = ModelConfig.from_hf(hf)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = _convert(_hf_state_dict(model_dir), cfg)
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedModelError(f"{model_dir}: checkpoint lacks {missing[:5]}")
    model = model.to(device=device, dtype=dtype)
    model.rotary.inv_freq = model.rotary.inv_freq.float()

    gguf = gguf_source(model_dir) if quant != "none" and torch.device(device).type == "cpu" else None
    return quantize_model(model, resolve_quant(quant, device, gguf is not None), gguf).eval()


def read_generation_eos(model_dir: str | Path) -> list[int]:
    """EOS ids from generation_config.json / config.json (either may hold an int or a list)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos]:
                if isinstance(e, int) and e not in ids:
                    ids.append(e)
    return ids


def load_model(model: str | os.PathLike[str], *, device: str | None = None, dtype: torch.dtype | str | None = None,
               quant: str | None = None) -> tuple[Transformer, object, list[int]]:
    """A model name (embedded, tiny-random, local dir, hub id) resolved and loaded: (our Transformer, its
    tokenizer, its generation EOS ids). `dtype` and `quant` as in `Engine.load`."""
    path = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = resolve_dtype(dtype, device)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="dtype") from None
    net = load_transformer(path, dtype=dtype, device=device, quant=quant)
    return net, AutoTokenizer.from_pretrained(path), read_generation_eos(path)
