"""The fused linear + KL op: the Triton row kernel against PyTorch, and the op's gradients against autograd.

On CPU the Triton kernel runs through the interpreter (TRITON_INTERPRET=1, set by conftest.py);
`gpu` tests run it compiled in bf16 at the real vocabulary size. Output buffers are NaN-poisoned,
so an element the kernel never writes fails the comparison.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from salaconvert.kernels.kl import linear_kl
from salaconvert.kernels.kl import rows as rows_mod
from salaconvert.kernels.kl.naive import kl_rows_torch
from salaconvert.kernels.kl.rows import kl_rows


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(rows_mod, "_empty", lambda *shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def _logits(R, V, scale=3.0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(R, V, generator=g) * scale).to(dtype).to(device)
    zt = (torch.randn(R, V, generator=g) * scale).to(dtype).to(device)
    return zs, zt


def _reference(zs, zt, temperature):
    """KL per row and its zs-gradient by autograd through F.kl_div, in float64."""
    s = zs.double().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(zt.double() / temperature, -1),
                  log_target=True, reduction="none").sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), s)
    return kl.detach(), grad


# fp32 logits: the kernel's online sums differ from PyTorch's two-pass softmax only by fp32
# rounding (relative 1e-6 of the KL and of the gradient over a row).
@pytest.mark.parametrize("R,V,block_v", [(1, 1, None), (3, 7, None), (5, 50, 16), (4, 300, 64), (2, 1000, None)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_rows_equal_the_reference(R, V, block_v, temperature):
    zs, zt = _logits(R, V)
    kl, grad = kl_rows(zs, zt, temperature, with_grad=True, block_v=block_v)
    kl_ref, grad_ref = _reference(zs, zt, temperature)
    assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6, what="KL rows")
    assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7, what="d zs")
    kl_t, grad_t = kl_rows_torch(zs, zt, temperature)
    assert_close(kl_t, kl_ref, rtol=1e-5, atol=1e-6, what="torch KL rows")
    assert_close(grad_t, grad_ref, rtol=1e-5, atol=1e-7, what="torch d zs")


def test_triton_rows_stay_finite_with_large_logits_and_fp16():
    zs, zt = _logits(3, 130, scale=200.0)  # exp would overflow without the running max
    kl, grad = kl_rows(zs, zt, 1.0, block_v=32)
    kl_ref, grad_ref = _reference(zs, zt, 1.0)
    assert_close(kl, kl_ref, rtol=1e-5, what="KL rows, large logits")
    assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7, what="d zs, large logits")
    zs16, zt16 = zs.div(50).half(), zt.div(50).half()
    kl16, grad16 = kl_rows(zs16, zt16, 1.0, block_v=32)
    kl_ref16, grad_ref16 = _reference(zs16, zt16, 1.0)
    assert grad16.dtype == torch.float16
    assert_close(kl16, kl_ref16, rtol=1e-5, what="KL rows, fp16 logits")
    assert_close(grad16, grad_ref16, rtol=2e-3, what="d zs, fp16 logits (the output rounded to fp16)")


def test_identical_rows_have_zero_kl_and_zero_gradient():
    zs, _ = _logits(4, 40)
    kl, grad = kl_rows(zs, zs.clone(), 1.0, block_v=16)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-7
    kl_only, none = kl_rows(zs, zs.clone(), 1.0, with_grad=False, block_v=16)
    assert none is None and torch.equal(kl_only, kl)


def _inputs(B=2, T=13, D=8, V=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, D, generator=g, requires_grad=True)
    ht = torch.randn(B, T, D, generator=g)
    w_s = torch.randn(V, D, generator=g, requires_grad=True)
    w_t = torch.randn(V, D, generator=g)
    return hs, ht, w_s, w_t


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_linear_kl_value_and_gradients_equal_autograd(monkeypatch, kernels, chunk):
    monkeypatch.setenv("SALACONVERT_KERNELS", kernels)
    hs, ht, w_s, w_t = _inputs()
    ref = F.kl_div(F.log_softmax(hs @ w_s.T / 2.0, -1), F.log_softmax(ht @ w_t.T / 2.0, -1),
                   log_target=True, reduction="none").sum()
    g_ref = torch.autograd.grad(3.0 * ref, (hs, w_s))  # a scale after the op reaches both gradients
    got = linear_kl(hs, ht, w_s, w_t, chunk=chunk, temperature=2.0)
    g_got = torch.autograd.grad(3.0 * got, (hs, w_s))
    assert_close(got, ref, rtol=1e-5, what="linear KL")
    for a, e, name in zip(g_got, g_ref, ("d hs", "d W_s")):
        assert_close(a, e, rtol=1e-5, what=name)


def test_linear_kl_computes_only_the_gradients_asked_for():
    hs, ht, w_s, w_t = _inputs()
    w_frozen = w_s.detach()
    got = linear_kl(hs, ht, w_frozen, w_t)
    (d_hs,) = torch.autograd.grad(got, hs)
    ref = torch.autograd.grad(F.kl_div(F.log_softmax(hs @ w_frozen.T, -1), F.log_softmax(ht @ w_t.T, -1),
                                       log_target=True, reduction="sum"), hs)[0]
    assert_close(d_hs, ref, rtol=1e-5, what="d hs with a frozen head")
    with torch.no_grad():
        value = linear_kl(hs, ht, w_s, w_t)
    assert not value.requires_grad and torch.isfinite(value)


def test_linear_kl_under_autocast_runs_the_matmuls_in_bf16_and_returns_fp32_gradients():
    hs, ht, w_s, w_t = _inputs(D=16, V=64)
    exact = linear_kl(hs, ht, w_s, w_t)
    g_exact = torch.autograd.grad(exact, (hs, w_s))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_kl(hs, ht, w_s, w_t)
    g_got = torch.autograd.grad(got, (hs, w_s))
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_got)
    assert (got - exact).abs() > 0  # bf16 logits: not bit-equal to the fp32 run ...
    assert_close(got, exact, rtol=3e-2, what="bf16 linear KL")  # ... but within bf16 rounding
    for a, e, name in zip(g_got, g_exact, ("d hs", "d W_s")):
        assert_close(a, e, rtol=5e-2, what=f"bf16 {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("V", [49152, 128256])
def test_gpu_rows_bf16_at_real_vocabulary_sizes(V):
    zs, zt = _logits(64, V, dtype=torch.bfloat16, device="cuda")
    kl, grad = kl_rows(zs, zt, 1.0)
    kl_ref, grad_ref = _reference(zs, zt, 1.0)
    assert_close(kl, kl_ref.cuda(), rtol=1e-5, what="KL rows, bf16 logits")
    assert_close(grad, grad_ref.cuda(), rtol=1e-2, what="d zs rounded to bf16")
