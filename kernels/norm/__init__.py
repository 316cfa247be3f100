"""Fused normalisation glue, forward only (inference): README.md here.

The hybrid's attention modules (fp32 inside, rounded once):

    norm_rope(x, weight, cos, sin, eps)   x [B, T, H, d] -> rope(rmsnorm(x) · weight)
        weight None: no norm; cos None: no RoPE. cos/sin [B or 1, T, d] (transformers' rotary
        embedding: rotate_half convention, out = x·cos + rotate_half(x)·sin).
    gated_rms_norm(x, z, weight, eps)     x, z [..., D] -> rmsnorm(x) · weight · sigmoid(z)

The teacher architecture's own decoder glue, rounded where its modules round (the modules' values,
up to the order of a sum):

    rms_norm(x, weight, eps)              x [..., D] -> weight · round(rmsnorm(x))
    silu_mul(g, u)                        g, u [...] -> round(silu(g)) · u

salaconvert.layers.common and salaconvert.models.decoder_glue dispatch (only where no gradient is
wanted).
"""
import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index

fix_interpreter_index()
ROWS = 16  # (token, head) rows per norm_rope program
NORM_ELEMS = 4096  # elements per rms_norm program: whole rows, at least one
SILU_BLOCK = 4096  # elements per silu_mul program


@triton.jit
def _norm_rope_kernel(x, w, cos, sin, y, n_rows, H, n_cos, eps, HALF: tl.constexpr, HP: tl.constexpr,
                      NORM: tl.constexpr, ROPE: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    o = tl.arange(0, HP)
    m = (r < n_rows)[:, None] & (o < HALF)[None, :]
    row = r.to(tl.int64)[:, None] * (2 * HALF)
    xa = tl.load(x + row + o[None, :], mask=m, other=0.).to(tl.float32)
    xb = tl.load(x + row + HALF + o[None, :], mask=m, other=0.).to(tl.float32)
    if NORM:
        inv = tl.rsqrt((tl.sum(xa * xa, 1) + tl.sum(xb * xb, 1)) / (2 * HALF) + eps)
        xa = xa * inv[:, None] * tl.load(w + o, mask=o < HALF, other=0.).to(tl.float32)[None, :]
        xb = xb * inv[:, None] * tl.load(w + HALF + o, mask=o < HALF, other=0.).to(tl.float32)[None, :]
    if ROPE:
        tok = ((r // H) % n_cos).to(tl.int64)[:, None] * (2 * HALF)  # a [1, T, d] table serves every batch row
        ca = tl.load(cos + tok + o[None, :], mask=m, other=0.).to(tl.float32)
        cb = tl.load(cos + tok + HALF + o[None, :], mask=m, other=0.).to(tl.float32)
        sa = tl.load(sin + tok + o[None, :], mask=m, other=0.).to(tl.float32)
        sb = tl.load(sin + tok + HALF + o[None, :], mask=m, other=0.).to(tl.float32)
        xa, xb = xa * ca - xb * sa, xb * cb + xa * sb
    tl.store(y + row + o[None, :], xa.to(y.dtype.element_ty), mask=m)
    tl.store(y + row + HALF + o[None, :], xb.to(y.dtype.element_ty), mask=m)


@triton.jit
def _gated_norm_kernel(x, z, w, y, D, eps, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    o = tl.arange(0, BD)
    m = o < D
    b_x = tl.load(x + row + o, mask=m, other=0.).to(tl.float32)
    b_z = tl.load(z + row + o, mask=m, other=0.).to(tl.float32)
    inv = tl.rsqrt(tl.sum(b_x * b_x, 0) / D + eps)
    b_y = b_x * inv * tl.load(w + o, mask=m, other=0.).to(tl.float32) * tl.sigmoid(b_z)
    tl.store(y + row + o, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_kernel(x, w, y, n_rows, D, eps, BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    o = tl.arange(0, BD)
    m = (r < n_rows)[:, None] & (o < D)[None, :]
    p = r.to(tl.int64)[:, None] * D + o[None, :]
    b_x = tl.load(x + p, mask=m, other=0.).to(tl.float32)
    inv = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)
    b_h = (b_x * inv[:, None]).to(x.dtype.element_ty).to(tl.float32)  # the module rounds before the weight
    b_y = tl.load(w + o, mask=o < D, other=0.).to(tl.float32)[None, :] * b_h
    tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_kernel(g, u, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_g = tl.load(g + o, mask=m, other=0.).to(tl.float32)
    b_s = (b_g * tl.sigmoid(b_g)).to(g.dtype.element_ty).to(tl.float32)  # the module rounds silu's output
    b_y = b_s * tl.load(u + o, mask=m, other=0.).to(tl.float32)
    tl.store(y + o, b_y.to(y.dtype.element_ty), mask=m)


@torch.compiler.disable  # compiled layers (distill's evaluation) call the launch code as is
def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """x [B, T, H, d] (d even) -> rope(rmsnorm(x) · weight) in x's dtype; cos/sin [B, T, d] or [1, T, d]
    (one table for every batch row, as a rotary module makes it from [1, T] positions)."""
    B, T, H, d = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    n_rows = x.numel() // d
    n_cos = 1
    if cos is not None:
        if cos.shape[-2:] != (T, d) or cos.numel() // (T * d) not in (1, B):
            raise ValueError(f"cos/sin {tuple(cos.shape)}: expected [{B} or 1, {T}, {d}] for x {tuple(x.shape)}")
        cos, sin = cos.reshape(-1, d).contiguous(), sin.reshape(-1, d).contiguous()
        n_cos = cos.shape[0]
    _norm_rope_kernel[(triton.cdiv(n_rows, ROWS),)](
        x, weight, cos, sin, y, n_rows, H, n_cos, eps, HALF=d // 2, HP=triton.next_power_of_2(d // 2),
        NORM=weight is not None, ROPE=cos is not None, BR=ROWS)
    return y


@torch.compiler.disable  # compiled layers (distill's evaluation) call the launch code as is
def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z [..., D] -> rmsnorm(x) · weight · sigmoid(z) in x's dtype."""
    D = x.shape[-1]
    x, z = x.contiguous(), z.contiguous()
    y = torch.empty_like(x)
    BD = triton.next_power_of_2(D)
    _gated_norm_kernel[(x.numel() // D,)](x, z, weight, y, D, eps, BD=BD, num_warps=8 if BD >= 2048 else 4)
    return y


@torch.compiler.disable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama, Mistral, Qwen2, Qwen3): x [..., D] -> weight · rmsnorm(x).to(x.dtype),
    in the dtype PyTorch promotes weight and x to."""
    D = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    n_rows = x.numel() // D
    BD = triton.next_power_of_2(D)
    BR = max(1, NORM_ELEMS // BD)
    _rms_norm_kernel[(triton.cdiv(n_rows, BR),)](x, weight, y, n_rows, D, eps, BR=BR, BD=BD,
                                                 num_warps=8 if BR * BD >= 2048 else 4)
    return y


@torch.compiler.disable
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) · u for same-shaped, same-dtype g and u, rounding silu's output as PyTorch does."""
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    _silu_mul_kernel[(triton.cdiv(g.numel(), SILU_BLOCK),)](g, u, y, g.numel(), BLOCK=SILU_BLOCK, num_warps=8)
    return y
