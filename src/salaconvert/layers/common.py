"""Pieces the hybrid's attention modules share."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from salaconvert.kernels.dispatch import use_triton


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


def fuse_glue(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether the fused glue kernels (salaconvert.kernels.norm, forward only) serve this call: a
    Triton device and no gradient wanted; training keeps the PyTorch path below."""
    if not use_triton(x):
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(
        p.requires_grad for m in modules for p in m.parameters()))


def norm_rope(x_BTHD: torch.Tensor, norm: nn.Module, cos_BTD: torch.Tensor | None, sin_BTD: torch.Tensor | None):
    """apply_rope(norm(x)) (norm an RMSNorm or nn.Identity; cos None: no RoPE), fused where it may be."""
    rms = isinstance(norm, RMSNorm)
    if (rms or cos_BTD is not None) and fuse_glue(x_BTHD, norm):
        from salaconvert.kernels.norm import norm_rope as fused_norm_rope

        return fused_norm_rope(x_BTHD, norm.weight if rms else None, cos_BTD, sin_BTD, norm.eps if rms else 0.0)
    x_BTHD = norm(x_BTHD)
    return x_BTHD if cos_BTD is None else apply_rope(x_BTHD, cos_BTD, sin_BTD)


def gated_rms_norm(x_BTD: torch.Tensor, norm: RMSNorm, z_BTD: torch.Tensor) -> torch.Tensor:
    """norm(x) · sigmoid(z), fused where it may be."""
    if fuse_glue(x_BTD, norm):
        from salaconvert.kernels.norm import gated_rms_norm as fused_gated_rms_norm

        return fused_gated_rms_norm(x_BTD, z_BTD, norm.weight, norm.eps)
    return norm(x_BTD) * torch.sigmoid(z_BTD)


def causal_attention(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, scale: float | None = None):
    """Softmax attention of T queries that end a sequence of S ≥ T keys, causal aligned to the last
    key (query i is token S − T + i), any group size Hq/Hkv: [B, Hq, T, d].

    T == S is SDPA's own causal call (its dispatch takes cuDNN on Hopper). A chunk after cached
    keys on a GPU with cuDNN attention (sm90+, where it is SDPA's fastest backend) is two cuDNN
    calls merged by their log-sum-exps: all cached keys unmasked, the chunk's own keys causal;
    cuDNN reads the Hkv heads as they are (sdpa_backends.py, run 35: 112 ms against 116 ms with K/V
    repeated, a 16K chunk after 240K keys on an H100). Elsewhere `causal_lower_right` says the
    mask without a tensor and SDPA runs flash attention on it (equal head counts: K/V are
    repeated per group); the CPU has no such kernel and gets the (small, test-sized) boolean mask.
    """
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    group = q_BHTD.shape[1] // k_BHSD.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True, scale=scale, enable_gqa=group > 1)
    if _cudnn_attention(q_BHTD, k_BHSD, v_BHSD):
        return _prefix_plus_chunk(q_BHTD, k_BHSD, v_BHSD, scale)
    if group > 1:
        k_BHSD, v_BHSD = k_BHSD.repeat_interleave(group, dim=1), v_BHSD.repeat_interleave(group, dim=1)
    mask = (causal_lower_right(T, S) if q_BHTD.is_cuda
            else torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T))
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, scale=scale)


def _cudnn_attention(q, k, v) -> bool:
    """sm90+ and SDPA's own cuDNN checks pass (enabled; fp16/bf16, head dims it takes; GQA)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) < (9, 0):
        return False
    gqa = q.shape[1] != k.shape[1]
    return torch.backends.cuda.can_use_cudnn_attention(torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, gqa))


def _prefix_plus_chunk(q_BHTD, k_BHSD, v_BHSD, scale):
    """The chunk case of `causal_attention` on cuDNN (any group size): softmax over the cached
    keys and over the chunk's own keys separately, then combined with weights exp(lse_i − lse)."""
    P = k_BHSD.shape[2] - q_BHTD.shape[2]
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention  # (output, logsumexp, ...)
    parts = [cudnn(q_BHTD, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
             for k, v, causal in ((k_BHSD[:, :, :P], v_BHSD[:, :, :P], False),
                                  (k_BHSD[:, :, P:], v_BHSD[:, :, P:], True))]
    (o1, lse1), (o2, lse2) = ((o.float(), lse.float().reshape(*q_BHTD.shape[:3], 1)) for o, lse in parts)
    lse = torch.logaddexp(lse1, lse2)
    return (o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()).to(q_BHTD.dtype)
