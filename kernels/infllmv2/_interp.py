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
