"""A decoder's shape, read from its Hugging Face config (the families our forward runs); the engine's switches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agentrt.errors import UnsupportedModelError

__all__ = ["ModelConfig", "SUPPORTED", "switch"]

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    hf_config: object = field(default=None, repr=False)

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        if hf.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {hf.model_type!r} is not supported by agentrt's forward (supported: {', '.join(SUPPORTED)})"
            )
        if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", hf.model_type == "mistral"):
            # Exact only while the context stays inside the window; the engine caps the context there.
            max_position = min(hf.max_position_embeddings, hf.sliding_window)
        else:
            max_position = hf.max_position_embeddings
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position=max_position,
            tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=hf.model_type == "qwen3",
            hf_config=hf,
        )


def switch(value: bool | None, env: str, default: bool) -> bool:
    """An engine switch: the argument, else the environment variable (0 or empty: off), else the default."""
    return bool(value) if value is not None else os.environ.get(env, "1" if default else "0") not in ("", "0")
