"""Let Triton 3.6's interpreter (TRITON_INTERPRET=1) run loops with runtime bounds under NumPy ≥ 2.4.

The interpreter keeps scalars as 1-element arrays and turns them into Python ints with
`int(array)`, which NumPy 2.4 rejects, so `range(0, n)` over a runtime `n` fails. We wrap the
interpreter's tensor patcher so `__index__` reads the single element. Idempotent; harmless when
the Lightning kernels' identical fix is already installed; a no-op without the interpreter.
"""
from __future__ import annotations


def fix_interpreter_index() -> None:
    try:
        import triton.runtime.interpreter as interp
    except Exception:
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_index_fixed", False) or getattr(orig, "_salaconvert_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_fixed = True
    interp._patch_lang_tensor = patched


# Reductions through tl.reduce with triton.language's own combine functions. tl.sum / tl.max /
# tl.min are @jit functions of triton.language, so they are compiled-mode objects whenever triton
# was imported before TRITON_INTERPRET=1 was set (a test session importing transformers first), and
# the interpreter then refuses to call them. tl.reduce is a builtin and always patched; with these
# exact combine functions the interpreter takes its NumPy fast path (any other combine function
# falls back to a per-element Python loop), and compiled code is the same as tl.sum / tl.max.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


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
