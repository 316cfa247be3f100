"""Fused linear + KL: the stage-2 distillation loss without materialising its backward graph.

`linear_kl(hs, ht, w_s, w_t)` is Σ over positions of KL(softmax(ht W_tᵀ/τ) ‖ softmax(hs W_sᵀ/τ)).
Its forward walks chunks of positions: two logit matmuls, the row op (KL per row and its gradient
in the student logits, `kl_rows`: Triton on CUDA tensors, naive.py's PyTorch otherwise, chosen by
`dispatch.use_triton`), and two more matmuls that turn the logit gradient into the gradients of hs
and W_s right away. Only those two gradients stay alive for the backward, which scales them: no
logits are kept or rebuilt. Math and design: README.md in this folder.

Shape legend: B batch, T positions, D hidden size, V vocabulary, R rows of one chunk.
"""
import torch

from salaconvert.kernels.dispatch import use_triton
from salaconvert.kernels.kl.naive import kl_rows_torch

__all__ = ["kl_rows", "linear_kl"]


def kl_rows(zs_RV, zt_RV, temperature: float = 1.0, with_grad: bool = True):
    """(KL per row [R] fp32, its gradient in zs [R, V] or None); see naive.kl_rows_torch."""
    if use_triton(zs_RV):
        from salaconvert.kernels.kl.rows import kl_rows as triton_kl_rows  # triton imported only when used

        return triton_kl_rows(zs_RV.contiguous(), zt_RV.contiguous(), temperature, with_grad)
    return kl_rows_torch(zs_RV, zt_RV, temperature, with_grad)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs_BTD, ht_BTD, w_s, w_t, chunk: int, temperature: float):
        dtype = _compute_dtype(hs_BTD)  # bf16 under autocast, as F.linear would run
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        with torch.autocast(hs_BTD.device.type, enabled=False):
            ws, wt = w_s.to(dtype), w_t.to(dtype)
            B, T, D = hs_BTD.shape
            total = torch.zeros((), dtype=torch.float32, device=hs_BTD.device)
            d_hs = torch.empty(B, T, D, dtype=dtype, device=hs_BTD.device) if need_h else None
            d_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
            for s in range(0, T, chunk):
                xs = hs_BTD[:, s:s + chunk].to(dtype).reshape(-1, D)
                xt = ht_BTD[:, s:s + chunk].to(dtype).reshape(-1, D)
                kl, d_z = kl_rows(xs @ ws.T, xt @ wt.T, temperature, with_grad=need_h or need_w)
                total += kl.sum()
                if need_h:
                    d_hs[:, s:s + chunk] = (d_z @ ws).view(B, -1, D)
                if need_w:
                    d_w += (d_z.T @ xs).float()
        ctx.save_for_backward(d_hs, d_w)
        ctx.dtypes = hs_BTD.dtype, w_s.dtype
        return total

    @staticmethod
    def backward(ctx, d_total):
        d_hs, d_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if d_hs is None else (d_hs * d_total).to(h_dtype), None,
                None if d_w is None else (d_w * d_total).to(w_dtype), None, None, None)


def linear_kl(hs_BTD: torch.Tensor, ht_BTD: torch.Tensor, w_s: torch.Tensor, w_t: torch.Tensor,
              chunk: int = 512, temperature: float = 1.0) -> torch.Tensor:
    """Σ over all B·T positions of KL(softmax(ht W_tᵀ/τ) ‖ softmax(hs W_sᵀ/τ)), fp32, differentiable in hs and w_s.

    hs_BTD: the student's final hidden states; ht_BTD: the teacher's (no gradient). w_*: [V, D].
    Logits exist for `chunk` positions (× B rows) at a time. Under autocast the matmuls run in the
    autocast dtype; the softmaxes always in fp32.
    """
    if not torch.is_grad_enabled():  # no backward will come: no gradient work inside (needs_input_grad cannot tell)
        hs_BTD, w_s = hs_BTD.detach(), w_s.detach()
    return LinearKL.apply(hs_BTD, ht_BTD.detach(), w_s, w_t.detach(), chunk, temperature)
