"""InfLLM-V2 block-sparse attention (SPEC §2, §6): public entry points and dispatch.

`infllmv2_attn`, `infllmv2_select` and `infllmv2_decode` run the Triton kernels when
`dispatch.use_triton(q)` says so (CUDA tensors, or SALACONVERT_KERNELS=triton, which on CPU tensors
needs TRITON_INTERPRET=1), otherwise the pure-PyTorch reference in naive.py. Conventions
(causality, ties, padding, the dense switch) and the kernel design are in README.md.
"""
from __future__ import annotations

import torch

from salaconvert.kernels.dispatch import use_triton
from salaconvert.kernels.infllmv2.naive import (compress_k, naive_infllmv2_attn, naive_infllmv2_decode,
                                                naive_infllmv2_select)



# The Triton modules are imported on first use, not here: @triton.jit decides between compiled and
# interpreted kernels when a module is imported, so importing them only once a call needs them
# lets TRITON_INTERPRET=1 be set after `import salaconvert` (as tests/kernels/conftest.py does).
def _parallel():
    from salaconvert.kernels.infllmv2 import parallel
    return parallel


def _decode():
    from salaconvert.kernels.infllmv2 import decode
    return decode


def update_compressed_cache(k_cache: torch.Tensor, kc_cache: torch.Tensor, cache_seqlens: torch.Tensor, **kw) -> None:
    """Append, in place, the compressed key completed by each sequence's newest token (see decode.py).

    CUDA tensors use a graph-capturable Triton kernel; CPU tensors recompute the window in PyTorch.
    """
    if use_triton(k_cache):
        return _decode().update_compressed_cache(k_cache, kc_cache, cache_seqlens, **kw)
    ks, st = kw.get("kernel_size", 32), kw.get("stride", 16)
    for b, L in enumerate(cache_seqlens.tolist()):
        if L >= ks and (L - ks) % st == 0:
            j = (L - ks) // st
            kc_cache[b, j] = k_cache[b, j * st:j * st + ks].float().mean(0).to(kc_cache.dtype)


@torch.compiler.disable  # layers under torch.compile (distill) call the Triton launch code as is, untraced
def infllmv2_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """InfLLM-V2 attention. q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] (Tq ≤ Tk, queries end-aligned) -> o [B, Tq, Hq, d].

    Keywords (SPEC §6): block_size=64, topk=96, init_blocks=1, local_blocks=32, kernel_size=32,
    stride=16, dense_len=8192, scale=None, cu_seqlens=None, coarse_norm=False (selection's softmax
    normaliser over 4× coarser compressed keys, README). Differentiable in q, k, v. `router`
    (route.Router, one per layer) lets the Triton inference forward choose its path without waiting
    for the device; the reference ignores it. See naive_infllmv2_attn for the math.
    """
    router = kw.pop("router", None)
    if use_triton(q):
        return _parallel().parallel_infllmv2_attn(q, k, v, router=router, **kw)
    return naive_infllmv2_attn(q, k, v, **kw)


def infllmv2_select(q: torch.Tensor, k: torch.Tensor, **kw) -> torch.Tensor:
    """Selected blocks: int32 [B, Tq, Hkv, topk], ascending, −1 padded. Same keywords as infllmv2_attn."""
    if use_triton(q):
        return _parallel().parallel_infllmv2_select(q, k, **kw)
    return naive_infllmv2_select(q, k, **kw)


def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    kc_cache: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """One decode step: q [B, 1, Hq, d] against caches [B, Tmax, Hkv, d] holding cache_seqlens[b] tokens
    (the new token's k/v included) -> o [B, 1, Hq, d]. Equals the last row of infllmv2_attn over
    those tokens. kc_cache [B, Tcmax, Hkv, d] (compressed keys, see update_compressed_cache) makes
    the Triton step cost O(selected tokens + compressed keys); the Triton path is graph-capturable.
    Same keywords as infllmv2_attn except cu_seqlens.
    """
    if use_triton(q):
        return _decode().triton_infllmv2_decode(q, k_cache, v_cache, cache_seqlens, kc_cache, **kw)
    return naive_infllmv2_decode(q, k_cache, v_cache, cache_seqlens, kc_cache, **kw)


__all__ = ["infllmv2_attn", "infllmv2_select", "infllmv2_decode", "update_compressed_cache",
           "naive_infllmv2_attn", "naive_infllmv2_select", "naive_infllmv2_decode", "compress_k"]
