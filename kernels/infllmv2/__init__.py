"""InfLLM-V2 block-sparse attention (SPEC §2, §6): public entry points and dispatch.

`infllmv2_attn` / `infllmv2_select` run the Triton kernels when `dispatch.use_triton(q)` says so
(CUDA tensors, or SALACONVERT_KERNELS=triton), otherwise the pure-PyTorch reference in naive.py.
Conventions (causality, ties, padding, dense switch) are in README.md.
"""
from __future__ import annotations

import torch

from salaconvert.kernels.dispatch import use_triton
from salaconvert.kernels.infllmv2.naive import compress_k, naive_infllmv2_attn, naive_infllmv2_select

try:  # the Triton path is optional: absent triton (or a broken install) falls back to the reference
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_attn, parallel_infllmv2_select
except ImportError:  # pragma: no cover
    parallel_infllmv2_attn = parallel_infllmv2_select = None


def infllmv2_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """InfLLM-V2 attention. q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] (Tq ≤ Tk, queries end-aligned) -> o [B, Tq, Hq, d].

    Keywords (SPEC §6): block_size=64, topk=96, init_blocks=1, local_blocks=32, kernel_size=32,
    stride=16, dense_len=8192, scale=None, cu_seqlens=None. See naive_infllmv2_attn for the math.
    """
    if parallel_infllmv2_attn is not None and use_triton(q):
        return parallel_infllmv2_attn(q, k, v, **kw)
    return naive_infllmv2_attn(q, k, v, **kw)


def infllmv2_select(q: torch.Tensor, k: torch.Tensor, **kw) -> torch.Tensor:
    """Selected blocks: int32 [B, Tq, Hkv, topk], ascending, −1 padded. Same keywords as infllmv2_attn."""
    if parallel_infllmv2_select is not None and use_triton(q):
        return parallel_infllmv2_select(q, k, **kw)
    return naive_infllmv2_select(q, k, **kw)


__all__ = ["infllmv2_attn", "infllmv2_select", "naive_infllmv2_attn", "naive_infllmv2_select", "compress_k"]
