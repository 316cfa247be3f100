"""Pieces both hybrid attention modules share."""
import torch
from torch import nn


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
