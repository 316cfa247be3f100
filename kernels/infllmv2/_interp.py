"""Interpreter-safe reductions for the InfLLM-V2 kernels (see below); the NumPy index fix is
`salaconvert.kernels._interpreter`."""
from __future__ import annotations

import triton
import triton.language as tl

# Reductions through tl.reduce with triton.language's own combine functions. tl.sum / tl.max /
# tl.min are @jit functions of triton.language, so they are compiled-mode objects whenever triton
# was imported before TRITON_INTERPRET=1 was set (a test session importing transformers first), and
# the interpreter then refuses to call them. tl.reduce is a builtin and always patched; with these
# exact combine functions the interpreter takes its NumPy fast path (any other combine function
# falls back to a per-element Python loop), and compiled code is the same as tl.sum / tl.max.


@triton.jit
def rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def rcumsum(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


# Bitonic sort of each row of a 2-D tile along its last axis (power-of-two length 2**N_DIMS). Ours
# rather than tl.sort for the reason above; same network as triton.language.standard.sort.
@triton.jit
def _compare_swap(x, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    n_outer: tl.constexpr = x.numel >> N_DIMS
    shape: tl.constexpr = [n_outer * 2 ** i, 2, 2 ** (N_DIMS - i - 1)]
    y = tl.reshape(x, shape)
    m = tl.arange(0, 2)[None, :, None]
    left = tl.reshape(tl.broadcast_to(rsum(y * (1 - m), 1)[:, None, :], shape), x.shape).to(x.dtype)
    right = tl.reshape(tl.broadcast_to(rsum(y * m, 1)[:, None, :], shape), x.shape).to(x.dtype)
    swap = (left > right) != flip
    return x ^ tl.where(swap, left ^ right, x ^ x)


@triton.jit
def _bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr, N_DIMS: tl.constexpr):
    n_outer: tl.constexpr = x.numel >> N_DIMS
    if order == 2:
        shape: tl.constexpr = [n_outer * 2 ** (N_DIMS - 1 - stage), 2, 2 ** stage]
        flip = tl.reshape(tl.broadcast_to(tl.arange(0, 2)[None, :, None], shape), x.shape)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _compare_swap(x, flip, i + (N_DIMS - stage), N_DIMS)
    return x


@triton.jit
def sort_rows(x, N_DIMS: tl.constexpr, DESCENDING: tl.constexpr):
    """Integer tile [R, 2**N_DIMS] with each row sorted (XOR swaps: integer dtypes only)."""
    for s in tl.static_range(1, N_DIMS + 1):
        x = _bitonic_merge(x, s, 2 if s < N_DIMS else DESCENDING, N_DIMS)
    return x
