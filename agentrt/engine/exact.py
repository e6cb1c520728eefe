"""Batch-invariant kernels: a token's linear layers and attention computed by fixed-shape calls only, so
its result does not depend on what else shares its forward (the idea of vLLM's batch-invariant mode,
SGLang's deterministic inference, and Thinking Machines' "Defeating Nondeterminism in LLM Inference").

Why: BLAS picks its kernel by shape. On a 2-core EPYC in fp32, MKL rounds row 0 of x @ W.T three ways
(M = 1, M = 2-3, M >= 4), and attention kernels block keys by the sequence length, so a prefix computed
in one batch and read back from the prefix cache in another differs from a fresh prefill. Here every
call has one shape: linear layers run on tiles of `rows` rows (one bmm over all tiles, the weight
broadcast), attention on tiles of `query_rows` queries against blocks of `key_block` keys. The kernel
and its reduction order are then the same for every row; padded rows and masked keys add exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Tiles", "PREFILL_TILES", "DETERMINISTIC_TILES", "linear", "AttentionPlan", "attention_plan", "attention"]


@dataclass(frozen=True)
class Tiles:
    rows: int  # rows of one linear-layer call
    query_rows: int  # grouped query rows (query heads x tokens) of one attention call
    key_block: int  # keys of one attention call


# Default mode: prompts are prefilled with these (so a cached prefix equals a fresh prefill); decode
# steps use the fastest kernels. Deterministic mode: every row, decode included, uses the smaller tiles
# (a decode row pays for a 16-row tile instead of a matrix-vector product). Sizes chosen on a 2-core
# EPYC (bench/RESULTS.md, "Invariance"): larger query tiles and key blocks mean fewer, larger products.
PREFILL_TILES = Tiles(rows=32, query_rows=64, key_block=128)
DETERMINISTIC_TILES = Tiles(rows=16, query_rows=8, key_block=128)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x @ weight.T (+ bias) with every row computed by the same [rows, in] x [in, out] product.

    x: [N, in]; weight: [out, in] -> [N, out]"""
    n, k = x.shape
    pad = -n % rows
    if pad:
        x = torch.cat([x, x.new_zeros(pad, k)])
    t = x.shape[0] // rows
    out = torch.bmm(x.view(t, rows, k), weight.t().expand(t, k, weight.shape[0]))  # [t, rows, out]
    out = out.view(-1, weight.shape[0])[:n]
    return out if bias is None else out + bias


@dataclass
class AttentionPlan:
    """One group's batch-invariant attention, prepared once per forward for every layer: the query tiles
    grouped by how many key blocks they can see (blocks no row of a tile sees are skipped: they would
    add exact zeros), each group with its additive mask."""

    tiles: Tiles
    groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]  # (blocks, seq index, tile index, mask)


def attention_plan(mask: torch.Tensor, tiles: Tiles) -> AttentionPlan:
    """mask: [b, 1, R, T] bool, each row's visible keys a prefix (True = may attend; a real row sees at
    least key 0)."""
    b, _, r, t = mask.shape
    qt, kb = tiles.query_rows, tiles.key_block
    rp, tp = -r % qt, -t % kb
    nt, nb = (r + rp) // qt, (t + tp) // kb
    m = F.pad(mask, (0, tp, 0, rp), value=False)
    m[:, :, r:, 0] = True  # padding rows see key 0: no 0/0
    m = m.view(b, nt, qt, nb, kb)
    seen = m.any(dim=4).any(dim=2)  # [b, nt, nb]: does any row of the tile see a key of the block
    need = (seen * torch.arange(1, nb + 1, device=mask.device)).amax(-1)  # [b, nt]: blocks up to the last seen
    add = torch.zeros(m.shape, dtype=torch.float32, device=mask.device).masked_fill_(~m, float("-inf"))
    add = add.transpose(2, 3)  # [b, nt, nb, qt, kb]
    groups = []
    for u in need.unique().tolist():
        bi, ti = (need == u).nonzero(as_tuple=True)
        groups.append((u, bi, ti, add[bi, ti, :u].unsqueeze(1)))  # mask [G, 1, u, qt, kb]
    return AttentionPlan(tiles, groups)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Softmax attention of grouped queries, each query's result a function of its own row and keys only.

    q: [b, KV, R, D] (the query heads of one KV head as rows); k, v: [b, KV, T, D]; plan: from the
    group's mask (`attention_plan`). Computed in fp32 -> [b, KV, R, D] in q's dtype.

    Two passes over fixed-shape blocks: scores of each (query tile, key block) pair by one batched
    product, the row max over all of them (exact in any order), then the weighted values, with a ones
    column giving the softmax denominator, summed block by block in key order."""
    b, kv, r, d = q.shape
    t = k.shape[2]
    qt, kb = plan.tiles.query_rows, plan.tiles.key_block
    rp, tp = -r % qt, -t % kb
    nt, nb = (r + rp) // qt, (t + tp) // kb
    qf = F.pad(q.float() * d ** -0.5, (0, 0, 0, rp)).view(b, kv, nt, qt, d).transpose(1, 2)  # [b, nt, KV, qt, D]
    kf = F.pad(k.float(), (0, 0, 0, tp)).view(b, kv, nb, kb, d)
    vf = F.pad(torch.cat([v.float(), v.new_ones(b, kv, t, 1, dtype=torch.float32)], -1), (0, 0, 0, tp))
    vf = vf.view(b, kv, nb, kb, d + 1)
    out = qf.new_empty(b, nt, kv, qt, d)
    for u, bi, ti, add in plan.groups:
        qg = qf[bi, ti].unsqueeze(2)  # [G, KV, 1, qt, D]
        s = torch.matmul(qg, kf[bi, :, :u].transpose(-1, -2)).add_(add)  # [G, KV, u, qt, kb]
        top = s.amax(dim=(2, 4), keepdim=True)
        o = torch.matmul(s.sub_(top).exp_(), vf[bi, :, :u])  # [G, KV, u, qt, D + 1]
        acc = o[:, :, 0]
        for j in range(1, u):  # in key order
            acc = acc + o[:, :, j]
        out[bi, ti] = acc[..., :d] / acc[..., d:]
    return out.transpose(1, 2).reshape(b, kv, nt * qt, d)[:, :, :r].to(q.dtype)
