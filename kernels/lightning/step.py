"""Lightning attention decode step in Triton: S ← γ S + kᵀ v, o = scale · q S, state updated in place.

One program per (batch row, head, value block): it reads its [K, BV] slice of the fp32 state once,
updates it in registers and writes it back; no allocation besides o and no host sync, so the
step can be captured in a CUDA graph.

Shape legend: B batch, H heads, K key head dim, V value head dim, BK padded K, BV value block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index

fix_interpreter_index()

__all__ = ["lightning_step"]


def _empty(*shape, dtype, device):
    """The output buffer comes from here, so that tests can poison it (fill with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit(do_not_specialize=["scale"])
def lightning_step_kernel(
    q, k, v, o, state, decay, scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Head h reads key/value head h // G of k, v ([B, H/G, *]); q, o, state have H heads."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_h = i_bh % H
    o_kv = (i_bh // H).to(tl.int64) * (H // G) + i_h // G
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    b_g = tl.load(decay + i_h).to(tl.float32)
    o_bh = i_bh.to(tl.int64)
    b_q = tl.load(q + o_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + o_kv * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + o_kv * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    p_s = state + o_bh * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0) * tl.exp(b_g) + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_s, mask=m_s)
    # tl.reduce with our own combine, not tl.sum: see chunk.py's docstring on the interpreter
    b_o = tl.reduce(b_q[:, None] * b_s, 0, _add) * scale
    p_o = o + o_bh * V + o_v
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)


def lightning_step(q, k, v, decay, state, scale=None):
    """One decode step. q: [B, 1, H, K]; k: [B, 1, Hkv, K]; v: [B, 1, Hkv, V] (Hkv dividing H);
    decay: [H] log-decay; state: [B, H, K, V] fp32 contiguous, updated in place.
    Returns o [B, 1, H, V] in q's dtype.
    """
    B, one, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[-1]
    if one != 1 or k.shape != (B, 1, Hkv, K) or v.shape[:2] != (B, 1) or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected one token [B,1,H,K], [B,1,Hkv,K], [B,1,Hkv,V]")
    if state.shape != (B, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 [B,H,K,V]=({B},{H},{K},{V}) tensor, got {tuple(state.shape)} {state.dtype}")
    scale = K ** -0.5 if scale is None else float(scale)
    o = _empty(B, 1, H, V, dtype=q.dtype, device=q.device)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(32, max(16, triton.next_power_of_2(V)))
    grid = (triton.cdiv(V, BV), B * H)
    lightning_step_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), o, state, decay.to(device=q.device, dtype=torch.float32), scale,
        H=H, G=H // Hkv, K=K, V=V, BK=BK, BV=BV, num_warps=4,
    )
    return o
