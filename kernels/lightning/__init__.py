"""Lightning attention (SPEC §2, §6): linear attention with a fixed per-head decay.

`lightning_attn` and `lightning_attn_step` pick the Triton kernels (chunk.py, step.py) or the
PyTorch path (naive.py) through `salaconvert.kernels.dispatch.use_triton`. Math and kernel design:
README.md in this folder.
"""
import torch

from salaconvert.kernels.dispatch import use_triton
from salaconvert.kernels.lightning.naive import chunk_lightning_attn_torch, naive_lightning_attn, naive_lightning_attn_step

__all__ = ["lightning_attn", "lightning_attn_step", "naive_lightning_attn", "naive_lightning_attn_step", "chunk_lightning_attn_torch"]


@torch.compiler.disable  # layers under torch.compile (distill) call the Triton launch code as is, untraced
def lightning_attn(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Lightning attention over a whole sequence (prefill / training), differentiable.

    q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V], Hkv dividing H (GQA: query head h reads
    key/value head h // (H/Hkv), each query head keeps its own state); decay: [H] fp32 log-decay (negative, γ = exp(decay));
    scale: defaults to K**-0.5; initial_state: [N, H, K, V] fp32 or None; cu_seqlens: [N+1] int
    offsets of N sequences packed along T (then B == 1), else N = B.
    Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None).
    """
    if use_triton(q):
        from salaconvert.kernels.lightning.chunk import chunk_lightning_attn  # triton imported only when used

        return chunk_lightning_attn(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_lightning_attn_torch(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attn_step(q, k, v, decay, state, scale=None):
    """One decode step. q: [B, 1, H, K]; k, v: [B, 1, Hkv, *]; state: [B, H, K, V] fp32, updated in place.

    Returns o [B, 1, H, V] in q's dtype. The Triton step needs a contiguous state (it writes it
    in place) and does no host sync, so it can be captured in a CUDA graph.
    """
    if use_triton(q):
        from salaconvert.kernels.lightning.step import lightning_step

        return lightning_step(q, k, v, decay, state, scale)
    return naive_lightning_attn_step(q, k, v, decay, state, scale)
