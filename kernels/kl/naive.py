"""The KL row op in PyTorch: the reference for rows.py and the path CPU tensors take.

Shape legend: R rows (positions), V vocabulary.
"""
import torch
import torch.nn.functional as F


def kl_rows_torch(zs_RV: torch.Tensor, zt_RV: torch.Tensor, temperature: float = 1.0, with_grad: bool = True):
    """Per row, KL(softmax(zt/τ) ‖ softmax(zs/τ)) and its gradient in zs, (softmax(zs/τ) − softmax(zt/τ)) / τ.

    Computed in fp32 whatever the logits' dtype. Returns (kl [R] fp32, grad [R, V] in zs's dtype or None).
    """
    logp_s = F.log_softmax(zs_RV.float() / temperature, dim=-1)
    logp_t = F.log_softmax(zt_RV.float() / temperature, dim=-1)
    p_t = logp_t.exp()
    kl = (p_t * (logp_t - logp_s)).sum(-1)
    grad = ((logp_s.exp() - p_t) / temperature).to(zs_RV.dtype) if with_grad else None
    return kl, grad
