"""Rotary position embeddings: the model's queries and keys, the fused kernels, and the KV pool's re-rotation
of moved keys (pruning, hogwild views) all turn vectors the same way."""

from __future__ import annotations

import torch
from torch import nn

from agentrt.engine.config import ModelConfig

__all__ = ["Rotary", "rope_cos_sin"]


class Rotary(nn.Module):
    """RoPE with the config's scaling variant (inverse frequencies from transformers' own table)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = cfg.hf_config
        params = getattr(hf, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        with torch.device("cpu"):  # even when the model is built on the meta device
            inv_freq, scaling = self._init(hf, cfg, params, rope_type, ROPE_INIT_FUNCTIONS)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.scaling = float(scaling)

    @staticmethod
    def _init(hf, cfg: ModelConfig, params: dict, rope_type: str, table) -> tuple[torch.Tensor, float]:
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
            return 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)), 1.0
        # "dynamic" is applied with its static (original-length) frequencies.
        return table[rope_type](hf, torch.device("cpu"))

    def cos_sin(self, positions: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [...] -> cos, sin: [..., D] in fp32
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        if scaled and self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [..., heads, D]; cos/sin: [..., D] broadcast over heads
        return Rotary.turn(x, *Rotary.turns(cos, sin, x.dtype))

    @staticmethod
    def turns(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [..., D] made ready for `turn`, once for every layer: broadcast over heads, in x's
        dtype, and sin signed so that rotate_half(x) * sin = roll(x, D/2) * signed."""
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(-2).to(dtype), signed.unsqueeze(-2).to(dtype)

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """RoPE with cos/sin from `turns` (a layer's queries and keys, and the moved keys of hogwild
        views, are turned in every layer). Rounds like x * cos + rotate_half(x) * sin, bit for bit."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed

    def rotate_by(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Re-rotate already-rotated keys by `delta` positions: R(p + delta) = R(delta) R(p).

        Computed in float64: a cached key may be moved many times (pruning, hogwild joins) and
        each move should add no error of its own."""
        freqs = delta.to(torch.float64)[..., None] * self.inv_freq.to(torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return self.apply(x.to(torch.float64), emb.cos(), emb.sin()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled RoPE cos/sin: positions [...] (or position deltas) -> [..., D] fp32 each."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
