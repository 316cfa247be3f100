"""Pieces the hybrid's attention modules share."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # In the input's dtype even when the weight is fp32 (trainable under bf16 autocast), so the
        # kernels after it see bf16, not a promoted fp32.
        return (self.weight * x).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """The teacher's rotary embedding (the cos/sin its rotary module produced), on [B, T, H, d]."""
    cos, sin = cos_BTD.unsqueeze(2), sin_BTD.unsqueeze(2)
    return (x_BTHD * cos + rotate_half(x_BTHD) * sin).to(x_BTHD.dtype)


def causal_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, scale: float | None = None):
    """Softmax attention of T queries that end a sequence of S ≥ T keys, causal aligned to the last
    key (query i is token S − T + i), any group size Hq/Hkv: [B, Hq, T, d].

    T == S is SDPA's own causal flash path. For a chunk after cached keys, `causal_lower_right`
    says the mask without a tensor, so SDPA still runs flash attention on the GPU (its flash entry
    for a CausalBias takes equal head counts: K/V are repeated per group); the CPU has no such
    kernel and gets the (small, test-sized) boolean mask.
    """
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    group = q_BHTD.shape[1] // k_BHSD.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True, scale=scale, enable_gqa=group > 1)
    if group > 1:
        k_BHSD, v_BHSD = k_BHSD.repeat_interleave(group, dim=1), v_BHSD.repeat_interleave(group, dim=1)
    mask = (causal_lower_right(T, S) if q_BHTD.is_cuda
            else torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T))
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, scale=scale)
