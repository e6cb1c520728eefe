"""Our own forward for Llama-family decoders (Llama/SmolLM, Mistral, Qwen2, Qwen3) over a paged KV cache.

One flat file in the spirit of gpt-fast: a config, RMSNorm, attention, MLP, the transformer (RoPE is
agentrt.engine.rope; reading weights from disk, agentrt.engine.loader).
Linear layers run on all new tokens of the batch at once ([N, hidden]); attention runs per group
(all decoding sequences together, each prefill chunk alone) over keys gathered from the page pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agentrt.engine import exact, kernels, quant
from agentrt.engine.config import ModelConfig
from agentrt.engine.rope import Rotary

__all__ = ["ModelConfig", "AttentionGroup", "BatchInput", "ExactRows", "DecodeInput", "Transformer", "linear",
           "shared_prefix"]

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == dtype:  # one fused kernel, the same bits here
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class AttentionGroup:
    """Queries that attend together: `rows` index the step's new tokens as [b, q]; keys come from `slots`.

    mask: [b, 1, q, T] bool (True = may attend) or None for plain causal attention over fresh keys only
    (a prefill chunk with no cached context). key_delta: [b, T] positions to re-rotate gathered keys by,
    for views that place shared blocks at other offsets (hogwild); None for ordinary sequences.
    """

    rows: torch.Tensor  # [b, q] long
    slots: torch.Tensor | None  # [b, T] long, None when only fresh keys are attended
    mask: torch.Tensor | None
    key_delta: torch.Tensor | None = None
    delta_from: int = 0  # key_delta is zero before this key index in every row: those keys stay as stored
    # the first `shared` keys are the same slots in every row, unmoved and visible to every query (the
    # hogwild history): on CPU they are read once for the whole group (cascade attention)
    shared: int = 0
    exact: bool = False  # batch-invariant attention (agentrt.engine.exact); needs slots, no key_delta

    def to(self, device: torch.device | str) -> AttentionGroup:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return AttentionGroup(self.rows.to(device), move(self.slots), move(self.mask), move(self.key_delta),
                              self.delta_from, self.shared, self.exact)


@dataclass(frozen=True)
class ExactRows:
    """The batch rows from `row` on (and logits rows from `logit` on) run the batch-invariant kernels."""

    row: int
    logit: int
    tiles: exact.Tiles = exact.PREFILL_TILES


@dataclass
class BatchInput:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N] where each new token's K/V go in the pool
    groups: list[AttentionGroup]
    logits_rows: torch.Tensor  # [M] rows whose next-token logits are wanted
    exact: ExactRows | None = None  # None: every row takes the fastest kernels

    def split(self) -> tuple[int | None, exact.Tiles]:
        """(first batch-invariant row or None, their tiles)."""
        return (None, exact.PREFILL_TILES) if self.exact is None else (self.exact.row, self.exact.tiles)


def linear(x: torch.Tensor, weight: torch.Tensor | quant.QuantWeight, bias: torch.Tensor | None,
           split: int | None, tiles: exact.Tiles) -> torch.Tensor:
    """F.linear(x, weight, bias), rows from `split` on by the batch-invariant kernel; [N, in] -> [N, out].
    A quantized weight (agentrt.engine.quant) runs its own kernel, in fixed-shape calls from `split` on."""
    if not isinstance(weight, torch.Tensor):
        return quant.linear(x, weight, bias, split, tiles.rows)
    if split is None or split >= x.shape[0]:
        return F.linear(x, weight, bias)
    tail = exact.linear(x[split:], weight, bias, tiles.rows)
    return tail if split == 0 else torch.cat([F.linear(x[:split], weight, bias), tail])


@dataclass
class DecodeInput:
    """One new token per row, for the fused step (fixed shapes: it is captured in CUDA graphs)."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    write_slots: torch.Tensor  # [B] int32, -1 for a padding row
    page_table: torch.Tensor  # [B, P] int32: each row's pages in order
    lengths: torch.Tensor  # [B] int32: keys per row, the new token's included (0 for a padding row)
    logits_rows: torch.Tensor  # [R] int32: rows whose next-token logits are computed
    # [B, P] int32: rotate each key by this many positions before attending (hogwild views); page_table
    # is then a slot table (page size 1)
    key_delta: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kv) * self.d, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, batch: BatchInput, masks: list, key_rot: list, k_pool, v_pool) -> torch.Tensor:
        n, kv, d, rep = x.shape[0], self.kv, self.d, self.h // self.kv
        split, tiles = batch.split()
        q, k, v = linear(x, self.qkv.weight, self.qkv.bias, split, tiles).split([self.h * d, kv * d, kv * d], dim=-1)
        q, k, v = q.view(n, self.h, d), k.view(n, kv, d), v.view(n, kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = Rotary.turn(q, *rope), Rotary.turn(k, *rope)
        # pools: [S, KV, D]
        k_pool.index_copy_(0, batch.write_slots, k)
        v_pool.index_copy_(0, batch.write_slots, v)
        out = torch.empty_like(q)  # [N, H, D]
        for g, mask, rot in zip(batch.groups, masks, key_rot):
            b, nq = g.rows.shape
            rows = g.rows.reshape(-1)
            if g.exact:  # mask: the group's exact.AttentionPlan
                t = g.slots.shape[1]
                kg = k_pool.index_select(0, g.slots.reshape(-1)).view(b, t, kv, d).transpose(1, 2)
                vg = v_pool.index_select(0, g.slots.reshape(-1)).view(b, t, kv, d).transpose(1, 2)
                qg = q.index_select(0, rows).view(b, nq, kv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, kv, rep * nq, d)
                o = exact.attention(qg, kg, vg, mask)
                out[rows] = o.view(b, kv, rep, nq, d).permute(0, 3, 1, 2, 4).reshape(b * nq, self.h, d)
                continue
            if g.slots is None:  # fresh prefill: causal over its own keys
                qg = q.index_select(0, rows).view(b, nq, self.h, d).transpose(1, 2)  # [b, H, q, D]
                kg = k.index_select(0, rows).view(b, nq, kv, d).transpose(1, 2)  # [b, KV, q, D]
                vg = v.index_select(0, rows).view(b, nq, kv, d).transpose(1, 2)
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=nq > 1, enable_gqa=rep > 1)
                out[rows] = o.transpose(1, 2).reshape(b * nq, self.h, d)
                continue
            s = g.shared if _CASCADE and q.device.type == "cpu" else 0
            slots = g.slots[:, s:]
            t = slots.shape[1]
            kg = k_pool.index_select(0, slots.reshape(-1)).view(b, t, kv, d)
            vg = v_pool.index_select(0, slots.reshape(-1)).view(b, t, kv, d)
            if rot is not None:  # place the gathered keys at this view's positions
                f = g.delta_from - s
                kg[:, f:] = Rotary.turn(kg[:, f:], *rot)
            # grouped queries: the `rep` query heads of one KV head attend as extra rows, no K/V copies
            qg = q.index_select(0, rows).view(b, nq, kv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, kv, rep * nq, d)
            if s:
                o = _cascade(qg, k_pool, v_pool, g.slots[0, :s], kg, vg, None if mask is None else mask[..., s:])
            else:
                o = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=mask)
            out[rows] = o.view(b, kv, rep, nq, d).permute(0, 3, 1, 2, 4).reshape(b * nq, self.h, d)
        return linear(out.view(n, self.h * d), self.o.weight, self.o.bias, split, tiles)

    def decode(self, x, cos, sin, step: DecodeInput, k_pool, v_pool, page_size: int, inv_freq) -> torch.Tensor:
        n, kv, d = x.shape[0], self.kv, self.d
        q, k, v = self.qkv(x).split([self.h * d, kv * d, kv * d], dim=-1)  # row-strided views
        q, k, v = q.view(n, self.h, d), k.view(n, kv, d), v.view(n, kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = kernels.rope_write_kv(q, k, v, cos, sin, k_pool, v_pool, step.write_slots)
        out = kernels.paged_decode_attention(q, k_pool, v_pool, step.page_table, step.lengths, page_size,
                                             step.key_delta, inv_freq)
        return self.o(out.view(n, self.h * d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, split: int | None = None, tiles: exact.Tiles = exact.PREFILL_TILES) -> torch.Tensor:
        gate, up = linear(x, self.gate_up.weight, self.gate_up.bias, split, tiles).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down.weight, self.down.bias, split, tiles)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.head_quant: quant.QuantWeight | None = None  # the LM head's quantized twin (agentrt.engine.quant)
        # decode steps over quantized weights on the CPU run _decode_quantized (False: forward's general
        # path, for comparisons), on the threads the cores others leave (None: torch's count)
        self.quantized_decode = True
        self.kernel_threads: quant.KernelThreads | None = quant.KernelThreads()

    def head(self) -> torch.Tensor | quant.QuantWeight:
        """The LM head's weight [V, hidden]: quantized where the model is, else the (tied) dense one."""
        if self.head_quant is not None:
            return self.head_quant
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, batch: BatchInput, k_pools: torch.Tensor, v_pools: torch.Tensor) -> torch.Tensor:
        # k_pools, v_pools: [L, S, KV, D]; returns logits [M, V] in fp32
        if self._quantized_decode(batch):
            if self.kernel_threads is not None:
                self.kernel_threads.apply()
            return self._decode_quantized(batch, k_pools, v_pools)
        x = self.embed(batch.input_ids)  # [N, hidden]
        rope = Rotary.turns(*self.rotary.cos_sin(batch.positions), x.dtype)  # [N, 1, D] each, for every layer
        split, tiles = batch.split()
        masks = [exact.attention_plan(self._grouped_mask(g), tiles) if g.exact else self._additive_mask(g, x.dtype)
                 for g in batch.groups]
        # cos/sin re-rotating gathered keys by key_delta: once per forward, not per layer
        key_rot = [None if g.key_delta is None else
                   Rotary.turns(*self.rotary.cos_sin(g.key_delta[:, g.delta_from:], scaled=False), x.dtype)
                   for g in batch.groups]
        for i, layer in enumerate(self.layers):
            x = x + layer.attn(layer.attn_norm(x), rope, batch, masks, key_rot, k_pools[i], v_pools[i])
            x = x + layer.mlp(layer.mlp_norm(x), split, tiles)
        x = self.norm(x[batch.logits_rows])  # [M, hidden]
        return linear(x, self.head(), None, None if batch.exact is None else batch.exact.logit, tiles).float()


    @torch.inference_mode()
    def decode(self, step: DecodeInput, k_pools: torch.Tensor, v_pools: torch.Tensor, page_size: int) -> torch.Tensor:
        """The decode step with fused kernels (Triton on CUDA, their torch twins elsewhere): logits [B, V] fp32.

        The residual add of each sub-layer is fused into the next RMSNorm, so a layer is nine kernels."""
        eps = self.cfg.rms_norm_eps
        x = self.embed(step.input_ids)  # [B, hidden]
        cos, sin = self.rotary.cos_sin(step.positions)  # [B, D]
        h, res = kernels.add_rms_norm(x, None, self.layers[0].attn_norm.weight, eps)
        for i, layer in enumerate(self.layers):
            a = layer.attn.decode(h, cos, sin, step, k_pools[i], v_pools[i], page_size, self.rotary.inv_freq)
            h, res = kernels.add_rms_norm(a, res, layer.mlp_norm.weight, eps)
            m = layer.mlp.down(kernels.silu_mul(layer.mlp.gate_up(h)))
            nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            if nxt is self.norm:  # only the rows that sample need the last norm and the head
                m, res = m.index_select(0, step.logits_rows), res.index_select(0, step.logits_rows)
            h, res = kernels.add_rms_norm(m, res, nxt.weight, eps)
        return linear(h, self.head(), None, None, exact.PREFILL_TILES).float()  # [R, V]

    def _quantized_decode(self, batch: BatchInput) -> bool:
        """Whether `batch` is a step the quantized CPU decode runs: quantized weights, every row one new
        token of its own sequence in one attention group (no batch-invariant rows, moved keys or cascade)."""
        if not self.quantized_decode or self.head_quant is None or batch.exact is not None or len(batch.groups) != 1:
            return False
        g, n = batch.groups[0], batch.input_ids.shape[0]
        return (g.slots is not None and g.key_delta is None and not g.shared and g.rows.shape == (n, 1)
                and batch.input_ids.device.type == "cpu" and torch.equal(g.rows.view(-1), torch.arange(n)))

    def _decode_quantized(self, batch: BatchInput, k_pools: torch.Tensor, v_pools: torch.Tensor) -> torch.Tensor:
        """The forward of a decode step over quantized weights on the CPU, in fewer and larger ops (at batch 1
        a step is ~200 small ops besides its GEMVs): activations stay in the kernels' bf16 from a norm through
        its linears, RoPE turns q and k together as one bmm by each row's rotation matrix, and the key gather
        and mask are built once for every layer. Logits [M, V] fp32, as forward's within rounding."""
        cfg, c = self.cfg, quant.COMPUTE
        nh, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g, b = batch.groups[0], batch.input_ids.shape[0]
        t = g.slots.shape[1]
        gather = g.slots.reshape(-1)  # [B * T]
        x = self.embed(batch.input_ids)  # [B, hidden], the residual stream in the model's dtype
        mask = None if bool(g.mask.all()) else self._additive_mask(g, x.dtype)  # [B, 1, 1, T]
        turn = _rope_matrix(*self.rotary.cos_sin(batch.positions))  # [B, D, D]
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            qkv = _matmul(attn.qkv, layer.attn_norm(x).to(c), c)  # [B, (H + 2 KV) D]
            qk = qkv[:, :(nh + kv) * d].view(b, nh + kv, d)
            if attn.q_norm is not None:
                qk = torch.cat([attn.q_norm(qk[:, :nh]), attn.k_norm(qk[:, nh:])], dim=1)
            qk = torch.bmm(qk.float(), turn).to(k_pools.dtype)  # [B, H + KV, D], rotated
            k_pools[i].index_copy_(0, batch.write_slots, qk[:, nh:])
            v_pools[i].index_copy_(0, batch.write_slots, qkv[:, (nh + kv) * d:].view(b, kv, d).to(v_pools.dtype))
            kg = k_pools[i].index_select(0, gather).view(b, t, kv, d).transpose(1, 2)  # [B, KV, T, D]
            vg = v_pools[i].index_select(0, gather).view(b, t, kv, d).transpose(1, 2)
            # grouped queries: the query heads of one KV head attend as its rows
            o = F.scaled_dot_product_attention(qk[:, :nh].view(b, kv, nh // kv, d), kg, vg, attn_mask=mask)
            x = x + _matmul(attn.o, o.reshape(b, nh * d).to(c), c)
            gate, up = _matmul(layer.mlp.gate_up, layer.mlp_norm(x).to(c), c).chunk(2, dim=-1)
            x = x + _matmul(layer.mlp.down, F.silu(gate) * up, c)
        x = self.norm(x[batch.logits_rows])  # [M, hidden]
        return self.head_quant.mm(x, torch.float32)

    def _grouped_mask(self, g: AttentionGroup) -> torch.Tensor:
        """[b, 1, q, T] bool -> [b, 1, rep * q, T] bool, rows ordered like grouped queries."""
        rep = self.cfg.num_heads // self.cfg.num_kv_heads
        b, _, nq, t = g.mask.shape
        return g.mask.unsqueeze(2).expand(b, 1, rep, nq, t).reshape(b, 1, rep * nq, t)

    def _additive_mask(self, g: AttentionGroup, dtype: torch.dtype) -> torch.Tensor | None:
        """[b, 1, q, T] bool -> [b, 1, rep * q, T] additive (0 / -inf), rows ordered like grouped queries."""
        if g.mask is None:
            return None
        rep = self.cfg.num_heads // self.cfg.num_kv_heads
        b, _, nq, t = g.mask.shape
        add = torch.zeros(g.mask.shape, dtype=dtype, device=g.mask.device).masked_fill_(~g.mask, float("-inf"))
        return add if nq == 1 else add.unsqueeze(2).expand(b, 1, rep, nq, t).reshape(b, 1, rep * nq, t)


def _matmul(lin: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer (dense or quant.QuantLinear) on x, its product in `dtype`; [N, in] -> [N, out]."""
    w = lin.weight
    y = F.linear(x.to(w.dtype), w).to(dtype) if isinstance(w, torch.Tensor) else w.mm(x, dtype)
    return y if lin.bias is None else y + lin.bias


def _rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos/sin [B, D] -> [B, D, D]: v @ m[b] is Rotary.turn of v at row b's position (the identity's
    cos on the diagonal plus the signed sin half a turn off it)."""
    cos, signed = (t.squeeze(-2) for t in Rotary.turns(cos, sin, torch.float32))
    return torch.diag_embed(cos) + torch.diag_embed(signed).roll(cos.shape[-1] // 2, dims=-2)


_CASCADE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
# Below this many common keys, gathering them per row costs less than cascade attention's extra kernels.
# 2-core CPU, bf16, 4 rows of 100 own keys each, ms a layer, plain vs cascade: 0.29 vs 0.31 at 400
# shared keys, 1.4 vs 0.33 at 500 (torch's CPU flash kernel slows past 512 keys a row), 2.5 vs 0.53 at 1000.
CASCADE_FROM = 448


def shared_prefix(slots: torch.Tensor, seen: list[int], delta: torch.Tensor | None = None) -> int:
    """How many leading keys every row of a group shares — the same slot (a page shared through the
    prefix cache, or the hogwild history) and, with `delta`, unmoved — within each row's first `seen`
    keys: what cascade attention reads once for the group. 0 for one row, or below CASCADE_FROM.
    slots, delta: [b, T]."""
    lead = min(seen)
    if slots.shape[0] < 2 or lead < CASCADE_FROM or not bool((slots[:, 0] == slots[0, 0]).all()):
        return 0
    same = (slots[:, :lead] == slots[:1, :lead]).all(dim=0)
    if delta is not None:
        same &= (delta[:, :lead] == 0).all(dim=0)
    shared = int(same.int().cumprod(dim=0).sum())
    return shared if shared >= CASCADE_FROM else 0


def _cascade(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, shared: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over [the keys at `shared`, common to every row] + [each row's own keys k, v], the
    common part read once for all rows (cascade attention), the two merged by their log-sum-exp.

    q: [b, KV, R, D]; shared: [S] slots; k, v: [b, T, KV, D]; mask: additive [b, 1, R, T] over the own
    keys (every row must see at least one: its newest token). CPU only (torch's flash kernel for the
    CPU returns the log-sum-exp). -> [b, KV, R, D]"""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, kv, r, d = q.shape
    kc = k_pool.index_select(0, shared).transpose(0, 1)[None]  # [1, KV, S, D]
    vc = v_pool.index_select(0, shared).transpose(0, 1)[None]
    oc, lc = flash(q.transpose(0, 1).reshape(1, kv, b * r, d), kc, vc)[:2]  # every row's queries at once
    oc, lc = oc.view(kv, b, r, d).transpose(0, 1), lc.view(kv, b, r).transpose(0, 1)
    ov, lv = flash(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)[:2]
    top = torch.maximum(lc, lv)
    wc, wv = (lc - top).exp_().unsqueeze(-1), (lv - top).exp_().unsqueeze(-1)
    return ((oc * wc + ov * wv) / (wc + wv)).to(q.dtype)
