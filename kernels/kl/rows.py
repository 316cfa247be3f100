"""The KL row op in Triton: one program per row streams both rows of logits twice.

Pass 1 keeps, for the student and the teacher logits (scaled by 1/τ), an online max m and sum
l = Σ exp(z − m), and for the teacher also a = Σ exp(t − m_t)(t − s), rescaled whenever m_t grows.
Then KL = a / l_t − lse_t + lse_s, since Σ p_t (log p_t − log p_s) = Σ p_t (t − s) − lse_t + lse_s.
Pass 2 (only when the gradient is wanted) writes (exp(s − lse_s) − exp(t − lse_t)) / τ.
So a row of V logits costs four reads and one write of V values, where the PyTorch chain
(casts, two log-softmaxes, exp, difference, product, sum, and their backward) makes a dozen.

Shape legend: R rows, V vocabulary, BV columns per iteration.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index

fix_interpreter_index()

__all__ = ["kl_rows"]


def _empty(*shape, dtype, device):
    """The output buffers come from here, so that tests can poison them (fill with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def kl_rows_kernel(zs, zt, kl, grad, V, stride_s, stride_t, stride_g, inv_tau,
                   WITH_GRAD: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs += row * stride_s
    zt += row * stride_t
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        inside = cols < V
        s0 = tl.load(zs + cols, mask=inside, other=0.0).to(tl.float32) * inv_tau
        t0 = tl.load(zt + cols, mask=inside, other=0.0).to(tl.float32) * inv_tau
        s = tl.where(inside, s0, float("-inf"))  # columns past V weigh exp(−inf) = 0
        t = tl.where(inside, t0, float("-inf"))
        new_s = tl.maximum(m_s, tl.max(s, 0))
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(s - new_s), 0)
        m_s = new_s
        new_t = tl.maximum(m_t, tl.max(t, 0))
        rescale = tl.exp(m_t - new_t)
        e_t = tl.exp(t - new_t)
        a = a * rescale + tl.sum(e_t * (t0 - s0), 0)
        l_t = l_t * rescale + tl.sum(e_t, 0)
        m_t = new_t
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(kl + row, a / l_t - lse_t + lse_s)
    if WITH_GRAD:
        grad += row * stride_g
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            inside = cols < V
            s = tl.load(zs + cols, mask=inside, other=0.0).to(tl.float32) * inv_tau
            t = tl.load(zt + cols, mask=inside, other=0.0).to(tl.float32) * inv_tau
            g = (tl.exp(s - lse_s) - tl.exp(t - lse_t)) * inv_tau
            tl.store(grad + cols, g.to(grad.dtype.element_ty), mask=inside)


def kl_rows(zs_RV: torch.Tensor, zt_RV: torch.Tensor, temperature: float = 1.0, with_grad: bool = True,
            block_v: int | None = None):
    """Triton version of naive.kl_rows_torch: (kl [R] fp32, grad [R, V] in zs's dtype or None).

    Rows must be contiguous in V (stride 1); `block_v` (a power of two) is for tests.
    """
    R, V = zs_RV.shape
    if zs_RV.stride(-1) != 1 or zt_RV.stride(-1) != 1:
        raise ValueError("kl_rows: logits must be contiguous along the vocabulary")
    kl = _empty(R, dtype=torch.float32, device=zs_RV.device)
    grad = _empty(R, V, dtype=zs_RV.dtype, device=zs_RV.device) if with_grad else None
    BV = block_v or min(4096, triton.next_power_of_2(V))
    if R:
        kl_rows_kernel[(R,)](zs_RV, zt_RV, kl, grad, V, zs_RV.stride(0), zt_RV.stride(0),
                             grad.stride(0) if with_grad else 0, 1.0 / temperature,
                             WITH_GRAD=with_grad, BV=BV, num_warps=8 if BV >= 2048 else 4)
    return kl, grad
