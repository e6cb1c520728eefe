"""Weight-only quantized linear layers on the CPU: a GGUF's own Q4_0/Q4_1/Q8_0 blocks run as they are
stored (llama.cpp's idea: a decode step streams ~4.5-bit weights, not 32-bit ones), any dense weight
quantized at load to int8 per output channel.

Q4_0/Q4_1 blocks of 32 map exactly onto torch's group-wise int4 kernel (`_weight_int4pack_mm_for_cpu`,
group 32), whose weight is (q - 8) * scale + zero per group: Q4_1's d * q + m is scale d, zero m + 8d;
Q4_0's d * (q - 8) is zero 0. Q8_0 (per-block scales) has no int8 kernel of its own in torch: its
values are requantized to int8 with one scale per output row (`_weight_int8pack_mm`), which rounds a
block whose scale is below its row's largest; the parity test states that error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agentrt.engine import models
from agentrt.errors import InvalidRequestError, UnsupportedModelError

__all__ = ["QUANT_CHOICES", "Int4Weight", "Int8Weight", "QuantLinear", "KernelThreads", "resolve_quant",
           "gguf_source", "read_gguf_weights", "quantize_model", "dense_weight"]

log = logging.getLogger(__name__)

# auto: the GGUF's own blocks where the model comes from one and the CPU runs it, else none
QUANT_CHOICES = ("auto", "gguf", "int8", "none")
GROUP = 32  # elements per GGUF block (Q4_0, Q4_1, Q8_0)
# Both CPU kernels are vectorized for bf16 activations only: at M = 1 on a 2-core EPYC (AVX2) a
# 3072 x 576 int4 product takes 0.33 ms in bf16 and 13.6 ms in fp32 (int8: 0.26 vs 7.3; dense fp32
# 1.25). So they compute in bf16 whatever the model's dtype: activations and scales are rounded to bf16
# (llama.cpp rounds its activations coarser still, to 8-bit blocks), outputs cast back.
COMPUTE = torch.bfloat16


@dataclass
class Int4Weight:
    """x @ W.T with W [out, in] stored as int4 in groups of 32 along `in`, each with a scale and zero."""

    packed: torch.Tensor  # uint8 [out, in / 2] in the CPU kernel's layout
    scale_zero: torch.Tensor  # [in / 32, out, 2] bf16
    shape: tuple[int, int]

    @classmethod
    def from_groups(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Weight:
        """q: [out, in] integers 0..15; scale, zero: [out, in / 32] (W = (q - 8) * scale + zero)."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE).contiguous()
        return cls(packed, scale_zero, tuple(q.shape))

    def mm(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # x: [M, in] -> [M, out] in `dtype` (default x's)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(COMPUTE), self.packed, GROUP, self.scale_zero)
        return y.to(x.dtype if dtype is None else dtype)

    def dequantize(self) -> torch.Tensor:
        """[out, in] as the kernel sees it (each weight times 1, rounded to bf16)."""
        return self.mm(torch.eye(self.shape[1], dtype=COMPUTE)).t().contiguous()


@dataclass
class Int8Weight:
    """x @ W.T with W [out, in] = q * scale, q int8, one scale per output row."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out] bf16
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> Int8Weight:
        """Symmetric per-row int8: scale = max |w| / 127 (an all-zero row keeps scale 1)."""
        w = w.float()
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(COMPUTE), tuple(w.shape))

    def mm(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE), self.q, self.scale)
        return y.to(x.dtype if dtype is None else dtype)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


QuantWeight = Int4Weight | Int8Weight


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None, split: int | None,
           rows: int) -> torch.Tensor:
    """x @ W.T (+ bias): [N, in] -> [N, out]; rows from `split` on batch-invariant (fixed `rows`-row
    calls, padded), like agentrt.engine.exact.linear. On a 2-core EPYC both kernels already give every row the
    same bits at any M (1 to 300 rows tried), but other CPUs may pick a kernel by M."""
    x = x.contiguous()
    n = x.shape[0]
    if split is None or split >= n:
        out = weight.mm(x)
    else:
        tail = x[split:]
        pad = -tail.shape[0] % rows
        if pad:
            tail = torch.cat([tail, tail.new_zeros(pad, tail.shape[1])])
        parts = [weight.mm(x[:split])] if split else []
        parts += [weight.mm(t) for t in tail.split(rows)]
        out = torch.cat(parts)[:n] if len(parts) > 1 else parts[0][:n]
    return out if bias is None else out + bias


class QuantLinear(nn.Module):
    """nn.Linear's stand-in over a quantized weight: `.weight` is the Int4Weight / Int8Weight."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, None, 1)


class KernelThreads:
    """The intra-op threads a quantized decode step runs on: torch's own count, less the cores other
    processes keep busy. The CPU int4 kernel splits even a batch-1 GEMV across every thread and waits for
    the slowest, so a thread on a taken core stalls the whole step: on a 2-core EPYC with the other core
    busy its median at 2 threads is 12x its median at 1 (bench/int4_threads.py). Others' load is the
    machine's busy cores (/proc/stat) less this process's own CPU time, over the last `every` seconds;
    where /proc/stat is missing every step keeps torch's count."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last = self._sample()  # (wall, own CPU, busy, total) or None
        self._spare: int | None = None  # None: no estimate yet, torch's count
        self._full: dict[int, int] = {}  # each thread's torch thread count on its first step (it is per thread)

    @staticmethod
    def _sample() -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:  # cpu user nice system idle iowait irq softirq steal ...
                ticks = [float(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        if len(ticks) < 5:
            return None
        return time.monotonic(), time.process_time(), sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    @staticmethod
    def spare(cores: int, busy: float, own: float) -> int:
        """Cores left to us when `busy` of `cores` are in use, `own` of them by us (at least 1)."""
        return max(1, min(cores, round(cores - (busy - own))))

    def count(self, full: int) -> int:
        """Threads for the next step, at most `full` (others' load re-read at most every `every` s)."""
        if self._last is not None and time.monotonic() - self._last[0] >= self.every:
            new = self._sample()
            if new is not None:
                wall, own, busy, total = (x - y for x, y in zip(new, self._last))
                if total > 0 and wall > 0:
                    cores = os.cpu_count() or 1
                    self._spare = self.spare(cores, busy / total * cores, own / wall)
            self._last = new
        return full if self._spare is None else min(full, self._spare)

    def apply(self) -> int:
        """Set the calling thread's torch thread count to `count()` of the count it had on its first call,
        and return it. The count stays until the estimate changes: torch.set_num_threads clears oneDNN's
        primitive cache and resizes thread pools, which per step costs more than it saves."""
        full = self._full.setdefault(threading.get_ident(), torch.get_num_threads())
        n = self.count(full)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n


def dense_weight(weight: torch.Tensor | QuantWeight) -> torch.Tensor:
    """The weight as a dense tensor (a quantized one dequantized)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


def resolve_quant(quant: str | None, device: torch.device | str, has_gguf: bool) -> str:
    """"gguf", "int8" or "none". None / "auto" (or the environment's AGENTRT_QUANT standing in for
    them): the GGUF's own blocks on the CPU where the weights come from a GGUF (a batch-1 step 1.6x
    faster than dense on one thread of a 2-core EPYC; its 2-thread kernel suffers more than dense when
    the other core is busy, bench/RESULTS.md), else none: a dense checkpoint keeps its exact weights
    unless int8 is asked for."""
    from_env = quant in (None, "auto")
    if from_env:
        quant = os.environ.get("AGENTRT_QUANT") or "auto"
    if quant not in QUANT_CHOICES:
        raise InvalidRequestError(f"quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}", param="quant")
    cpu = torch.device(device).type == "cpu"
    if from_env and (not cpu or (quant == "gguf" and not has_gguf)):  # a preference, for models it fits
        quant = "auto"
    if quant == "auto":
        return "gguf" if cpu and has_gguf else "none"
    if quant != "none" and not cpu:
        raise InvalidRequestError(f"quant {quant!r} runs on the CPU only (the {torch.device(device).type} path "
                                  "is dense): pass quant='none'", param="quant")
    if quant == "gguf" and not has_gguf:
        raise InvalidRequestError("quant 'gguf' needs a model that comes from a GGUF file (the embedded ones); "
                                  "quant='int8' quantizes any model", param="quant")
    return quant


def gguf_source(model_dir: str | Path) -> Path | None:
    """The GGUF an embedded model's directory was dequantised from (fetched again if it went missing),
    or None for any other directory."""
    model_dir = Path(model_dir).resolve()
    for name, spec in models.EMBEDDED.items():
        if model_dir == (models.agentrt_home() / "models" / name).resolve():
            return models.fetch_gguf(name, spec)
    return None


# --- GGUF blocks ---------------------------------------------------------------------------------
def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """[rows, row_bytes] uint8 -> [rows, blocks, block_bytes]"""
    rows = data.shape[0]
    return np.ascontiguousarray(data).reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 -> [...] float32"""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """[rows, blocks, 16] uint8 -> [rows, blocks * 32]: element j of a block is the low nibble of byte j,
    element 16 + j its high nibble."""
    lo, hi = qs & 0x0F, qs >> 4
    return torch.from_numpy(np.concatenate([lo, hi], axis=-1).reshape(qs.shape[0], -1).astype(np.int32))


def int4_groups(data: np.ndarray, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor's bytes [out, row_bytes] -> (q [out, in] 0..15, scale, zero [out, in / 32]) with
    W = (q - 8) * scale + zero."""
    if qtype == "Q4_0":  # block: fp16 d, 16 bytes of nibbles; w = d * (q - 8)
        b = _blocks(data, 18)
        d = _f16(b[..., 0:2])
        return _nibbles(b[..., 2:]), d, torch.zeros_like(d)
    if qtype == "Q4_1":  # block: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m
        b = _blocks(data, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        return _nibbles(b[..., 4:]), d, m + 8 * d
    raise ValueError(f"{qtype} is not a 4-bit block type")


def q8_dense(data: np.ndarray) -> torch.Tensor:
    """A Q8_0 tensor's bytes [out, row_bytes] -> its values [out, in] float32 (block: fp16 d, 32 int8)."""
    b = _blocks(data, 34)
    d = _f16(b[..., 0:2])
    q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))
    return (q * d[..., None]).reshape(data.shape[0], -1)


@dataclass
class GGUFWeight:
    """One GGUF tensor's rows as read: 4-bit groups, or dense values (Q8_0, float, other block types)."""

    qtype: str
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (q, scale, zero), 4-bit types
    dense: torch.Tensor | None  # [out, in] float32 otherwise

    def rows(self, index: torch.Tensor) -> GGUFWeight:
        if self.groups is not None:
            return GGUFWeight(self.qtype, tuple(t[index] for t in self.groups), None)
        return GGUFWeight(self.qtype, None, self.dense[index])

    def values(self) -> torch.Tensor:
        if self.groups is None:
            return self.dense
        q, scale, zero = self.groups
        return (q.float() - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)


def read_gguf_weights(path: str | Path, names: set[str] | None = None) -> tuple[dict[str, GGUFWeight], str]:
    """The 2-D tensors of a GGUF (those in `names`, or all), and its architecture."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    out: dict[str, GGUFWeight] = {}
    for t in reader.tensors:
        if (names is not None and t.name not in names) or len(t.shape) != 2:
            continue
        qtype = t.tensor_type.name
        data = np.asarray(t.data)
        if qtype in ("Q4_0", "Q4_1"):
            out[t.name] = GGUFWeight(qtype, int4_groups(data, qtype), None)
        elif qtype == "Q8_0":
            out[t.name] = GGUFWeight(qtype, None, q8_dense(data))
        else:
            values = gguf.quants.dequantize(data, t.tensor_type)
            out[t.name] = GGUFWeight(qtype, None, torch.from_numpy(np.ascontiguousarray(values, np.float32)))
    return out, arch


def _reverse_permute(rows: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's converter, which interleaves each head's two RoPE halves in q and k
    of llama models: our row r is the GGUF's row index[r]."""
    d = rows // heads // 2
    return torch.arange(rows).view(heads, d, 2).transpose(1, 2).reshape(-1)


def _cat(parts: list[GGUFWeight]) -> GGUFWeight:
    """Weights stacked along the output rows (q, k, v -> qkv; gate, up -> gate_up)."""
    if all(p.groups is not None for p in parts):
        return GGUFWeight(parts[0].qtype, tuple(torch.cat(ts) for ts in zip(*(p.groups for p in parts))), None)
    return GGUFWeight("mixed", None, torch.cat([p.values() for p in parts]))


def _to_quant(w: GGUFWeight) -> QuantWeight:
    """4-bit blocks as int4 (the kernel packs rows 16 at a time), anything else as int8 per row."""
    if w.groups is not None and w.groups[0].shape[0] % 16 == 0:
        return Int4Weight.from_groups(*w.groups)
    return Int8Weight.from_dense(w.values())


def quantize_model(model, quant: str, gguf_path: str | Path | None = None):
    """Swap each layer linear (and the LM head) of our Transformer for a QuantLinear, in place: from the
    GGUF's blocks (quant "gguf"; 4-bit blocks kept exactly, others int8 per row) or from the dense
    weights (quant "int8"). Returns the model."""
    if quant == "none":
        return model
    cfg = model.cfg
    if quant == "gguf":
        if gguf_path is None:
            raise UnsupportedModelError("quant 'gguf' needs the model's GGUF file")
        layers = _gguf_layers(model, gguf_path)
    elif quant == "int8":
        layers = {}
        for i, layer in enumerate(model.layers):
            for part, lin in (("qkv", layer.attn.qkv), ("o", layer.attn.o), ("gate_up", layer.mlp.gate_up),
                              ("down", layer.mlp.down)):
                layers[(i, part)] = Int8Weight.from_dense(lin.weight.detach())
    else:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}")
    for (i, part), weight in layers.items():
        owner = model.layers[i].attn if part in ("qkv", "o") else model.layers[i].mlp
        old = getattr(owner, part)
        setattr(owner, part, QuantLinear(weight, None if old.bias is None else old.bias.detach()))
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    model.head_quant = Int8Weight.from_dense(head.detach())
    if model.lm_head is not None:
        model.lm_head = None if cfg.tie_embeddings else model.lm_head
    log.info("quantized %d linears (%s) and the LM head (int8)", len(layers), quant)
    return model


def _gguf_layers(model, gguf_path: str | Path) -> dict[tuple[int, str], QuantWeight]:
    cfg = model.cfg
    weights, arch = read_gguf_weights(gguf_path, {f"blk.{i}.{n}.weight" for i in range(cfg.num_layers) for n in
                                                  ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                   "ffn_up", "ffn_down")})
    permute = arch == "llama"  # the converter permutes q/k rows of llama (not qwen2/qwen3) models
    out: dict[tuple[int, str], QuantWeight] = {}
    for i in range(cfg.num_layers):
        def get(name: str) -> GGUFWeight:
            key = f"blk.{i}.{name}.weight"
            if key not in weights:
                raise UnsupportedModelError(f"{gguf_path}: no tensor {key}")
            return weights.pop(key)

        q, k, v = get("attn_q"), get("attn_k"), get("attn_v")
        if permute:
            q = q.rows(_reverse_permute(cfg.num_heads * cfg.head_dim, cfg.num_heads))
            k = k.rows(_reverse_permute(cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads))
        out[(i, "qkv")] = _to_quant(_cat([q, k, v]))
        out[(i, "o")] = _to_quant(get("attn_output"))
        out[(i, "gate_up")] = _to_quant(_cat([get("ffn_gate"), get("ffn_up")]))
        out[(i, "down")] = _to_quant(get("ffn_down"))
    for key, w in out.items():
        lin = getattr(model.layers[key[0]].attn if key[1] in ("qkv", "o") else model.layers[key[0]].mlp, key[1])
        if tuple(w.shape) != tuple(lin.weight.shape):
            raise UnsupportedModelError(f"{gguf_path}: layer {key} has shape {w.shape}, the config says "
                                        f"{tuple(lin.weight.shape)}")
    return out
