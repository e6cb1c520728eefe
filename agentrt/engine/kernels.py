"""Fused kernels for the decode step on CUDA (Triton), each with a torch twin that runs anywhere.

On a GPU a small model's decode step is bound by how many kernels it launches, not by bandwidth
(issue #2: a plain graph-captured step takes 2.6 ms where the weights' bandwidth floor is 0.33 ms).
So a layer runs as nine kernels: add + RMSNorm, qkv GEMM, RoPE + K/V write, paged attention, o
GEMM, add + RMSNorm, gate/up GEMM, SiLU * up, down GEMM. The attention reads keys straight from the
page pool through each row's page table (vLLM's PagedAttention), so one captured graph serves every
context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agentrt.engine.rope import Rotary, rope_cos_sin

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of torch ship without Triton: the torch twins serve
    triton = None

__all__ = ["triton_ready", "add_rms_norm", "rope_write_kv", "paged_decode_attention", "silu_mul"]


def triton_ready(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on `device` (CUDA with Triton installed)."""
    return triton is not None and torch.device(device).type == "cuda"


def _use_triton(t: torch.Tensor, force: bool | None) -> bool:
    return triton_ready(t.device) if force is None else force


# --- add + RMSNorm -----------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = residual + x (or x), normed = RMSNorm(residual'): returns (normed, residual').

    x, residual: [N, C] contiguous. Rounds like the unfused ops: the sum to x's dtype, the norm in fp32,
    then its cast, then the weight."""
    if not _use_triton(x, use_triton):
        r = x if residual is None else residual + x
        if r.dtype == torch.float32 and weight.dtype == r.dtype:  # one fused kernel, the same bits
            return F.rms_norm(r, (r.shape[-1],), weight, eps), r
        h = r.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype), r
    n, c = x.shape
    out = torch.empty_like(x)
    r_out = x if residual is None else torch.empty_like(x)
    _add_rms_norm_kernel[(n,)](x, x if residual is None else residual, weight, out, r_out, c, eps,
                               HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(c))
    return out, r_out


# --- RoPE on q and k, K/V written into the pool -----------------------------------------------------
def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                  use_triton: bool | None = None) -> torch.Tensor:
    """Rotate q [N, H, D] and k [N, KV, D] (row-strided views are fine) by cos/sin [N, D]; write k and
    v into the pools [S, KV, D] at `slots` [N] (rows with slot < 0 write nothing). Returns rotated q
    [N, H, D], contiguous."""
    if not _use_triton(q, use_triton):
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        keep = slots >= 0
        k_pool.index_copy_(0, slots[keep].long(), k[keep])
        v_pool.index_copy_(0, slots[keep].long(), v[keep])
        return q.contiguous()
    n, h, d = q.shape
    kv = k.shape[1]
    q_out = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    _rope_write_kv_kernel[(n, h + kv)](q, k, v, q.stride(0), k.stride(0), v.stride(0), cos, sin, slots,
                                       q_out, k_pool, v_pool, H=h, KV=kv, D=d)
    return q_out


# --- paged decode attention -------------------------------------------------------------------------
def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                           lengths: torch.Tensor, page_size: int, key_delta: torch.Tensor | None = None,
                           inv_freq: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """One query token per row over its cached keys: q [B, H, D]; pools [S, KV, D]; page_table [B, P]
    (row b's t-th key is at slot page_table[b, t // page_size] * page_size + t % page_size; page_size 1
    makes it a slot table); lengths [B] keys per row (0: output zeros). key_delta [B, P] int32 (with
    inv_freq [D/2]): rotate row b's t-th key by key_delta[b, t] positions first (views that place
    cached blocks at other offsets: hogwild). Returns [B, H, D]."""
    b, h, d = q.shape
    kv = k_pool.shape[1]
    rep = h // kv
    if not _use_triton(q, use_triton):
        t = max(int(lengths.max()), 1)
        idx = torch.arange(t, device=q.device)
        slots = page_table.long()[:, idx // page_size] * page_size + idx % page_size  # [B, T]
        valid = idx[None, :] < lengths[:, None]
        kg = k_pool[slots.clamp(min=0)]  # [B, T, KV, D]
        vg = v_pool[slots.clamp(min=0)]
        if key_delta is not None:
            kg = Rotary.apply(kg.float(), *rope_cos_sin(key_delta[:, :t], inv_freq)).to(kg.dtype)  # [B, T, KV, D]
        qg = q.view(b, kv, rep, d)  # grouped query heads attend as rows of their KV head
        bias = torch.zeros(b, 1, 1, t, dtype=q.dtype, device=q.device).masked_fill(~valid[:, None, None], float("-inf"))
        o = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=bias)
        return torch.where((lengths > 0)[:, None, None], o.reshape(b, h, d), 0.0).to(q.dtype)
    o = torch.empty_like(q)
    delta = page_table if key_delta is None else key_delta  # (unused pointer when there is no delta)
    _paged_decode_kernel[(b, kv)](q, k_pool, v_pool, page_table, lengths, o, delta,
                                  lengths if inv_freq is None else inv_freq, d ** -0.5, page_table.stride(0),
                                  delta.stride(0), H=h, KV=kv, D=d, REP=rep, REP_P=max(16, triton.next_power_of_2(rep)),
                                  PAGE=page_size, BLOCK_N=64, IEEE=q.dtype == torch.float32,
                                  HAS_DELTA=key_delta is not None)
    return o


# --- SiLU(gate) * up -------------------------------------------------------------------------------
def silu_mul(gate_up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """[N, 2I] (gate then up) -> [N, I]."""
    if not _use_triton(gate_up, use_triton):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    n, two_i = gate_up.shape
    inner = two_i // 2
    out = torch.empty((n, inner), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inner, block))](gate_up, out, inner, BLOCK=block)
    return out


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=m)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (y * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_write_kv_kernel(q_ptr, k_ptr, v_ptr, q_stride, k_stride, v_stride, cos_ptr, sin_ptr, slots_ptr,
                              q_out_ptr, k_pool_ptr, v_pool_ptr, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half: tl.constexpr = D // 2
        i = tl.arange(0, half)
        cos = tl.load(cos_ptr + row * D + i)  # the two halves of cos/sin are equal
        sin = tl.load(sin_ptr + row * D + i)
        if head < H:
            src = q_ptr + row * q_stride + head * D
            x1 = tl.load(src + i).to(tl.float32)
            x2 = tl.load(src + half + i).to(tl.float32)
            dst = q_out_ptr + (row * H + head) * D
            tl.store(dst + i, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty))
            tl.store(dst + half + i, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty))
        else:
            kh = head - H
            slot = tl.load(slots_ptr + row).to(tl.int64)
            if slot >= 0:
                src = k_ptr + row * k_stride + kh * D
                x1 = tl.load(src + i).to(tl.float32)
                x2 = tl.load(src + half + i).to(tl.float32)
                dst = (slot * KV + kh) * D
                tl.store(k_pool_ptr + dst + i, (x1 * cos - x2 * sin).to(k_pool_ptr.dtype.element_ty))
                tl.store(k_pool_ptr + dst + half + i, (x2 * cos + x1 * sin).to(k_pool_ptr.dtype.element_ty))
                j = tl.arange(0, D)
                tl.store(v_pool_ptr + dst + j, tl.load(v_ptr + row * v_stride + kh * D + j))

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, pages_ptr, lengths_ptr, o_ptr, delta_ptr, inv_freq_ptr, scale,
                             pages_stride, delta_stride, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                             REP: tl.constexpr, REP_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                             IEEE: tl.constexpr, HAS_DELTA: tl.constexpr):
        # one program per (row, KV head): its REP query heads attend together, the keys are read once
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        half: tl.constexpr = D // 2
        r = tl.arange(0, REP_P)
        d = tl.arange(0, D)
        q_rows = (b * H + kvh * REP + r) * D
        q_mask = (r < REP)[:, None]
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)  # [REP_P, D]
        if HAS_DELTA:  # rotate_half(k)[d] = sign[d] * k[partner[d]]
            partner = (d + half) % D
            sign = tl.where(d < half, -1.0, 1.0)
            inv = tl.load(inv_freq_ptr + d % half)  # [D]
        length = tl.load(lengths_ptr + b)
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, D], tl.float32)
        for start in range(0, length, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            valid = t < length
            page = tl.load(pages_ptr + b * pages_stride + t // PAGE, mask=valid, other=0).to(tl.int64)
            kv_off = ((page * PAGE + t % PAGE) * KV + kvh) * D  # [BLOCK_N]
            k = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
            if HAS_DELTA:  # place the key at this view's position: R(p + delta) = R(delta) R(p)
                kp = tl.load(k_ptr + kv_off[:, None] + partner[None, :], mask=valid[:, None], other=0.0)
                delta = tl.load(delta_ptr + b * delta_stride + t, mask=valid, other=0).to(tl.float32)
                ang = delta[:, None] * inv[None, :]
                k = (k.to(tl.float32) * tl.cos(ang) + sign[None, :] * kp.to(tl.float32) * tl.sin(ang)).to(kp.dtype)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))  # [REP_P, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + q_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inner
        gate = tl.load(x_ptr + row * 2 * inner + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * inner + inner + cols, mask=m, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)  # like F.silu, then the mul
        tl.store(out_ptr + row * inner + cols, (act * up).to(out_ptr.dtype.element_ty), mask=m)
