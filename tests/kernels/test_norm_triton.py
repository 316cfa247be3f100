"""The fused normalisation glue (salaconvert.kernels.norm) against the modules' PyTorch path.

On CPU the kernels run through the Triton interpreter (conftest.py). fp32: the kernel keeps fp32
throughout as the reference does, so they differ by summation order only (1e-5 relative). bf16 on
the GPU: the reference rounds after the norm and again inside RoPE, the kernel once at the end
(1e-2 relative against the fp32 reference). rms_norm and silu_mul round where transformers'
modules round: in fp16 (which the interpreter rounds as the GPU does) they give the modules' own
values, and in bf16 on the GPU they agree with them to a rounding step. The
layers' dispatch is checked too: fused where no gradient is wanted, the PyTorch path (which the
gradients go through) in training.
"""
import pytest
import torch

from helpers import assert_close
from salaconvert.kernels import norm as norm_kernels
from salaconvert.layers.common import RMSNorm, apply_rope
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from tiny import GPU_SPARSE, tiny_hybrid


def _rope_tables(B, T, d, g):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = (torch.arange(T).float()[:, None] + torch.rand(B, 1, 1, generator=g) * 50) * inv  # [B, T, d/2]
    emb = torch.cat((ang, ang), -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("d,H,norm,rope", [(16, 3, True, True), (64, 4, True, True), (80, 2, True, True),
                                           (16, 3, False, True), (16, 3, True, False)])
def test_norm_rope_equals_module_path(d, H, norm, rope):
    g = torch.Generator().manual_seed(d + H)
    B, T = 2, 37  # 222 (token, head) rows: not a multiple of the program's 16
    x = torch.randn(B, T, H, d, generator=g) * 3
    module = RMSNorm(d, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.rand(d, generator=g) + 0.5)
    cos, sin = _rope_tables(B, T, d, g) if rope else (None, None)
    ref = module(x) if norm else x
    ref = apply_rope(ref, cos, sin) if rope else ref
    out = norm_kernels.norm_rope(x, module.weight if norm else None, cos, sin, 1e-5)
    assert_close(out, ref, rtol=1e-5, what=f"norm_rope d={d} norm={norm} rope={rope}")


def test_norm_rope_one_table_for_every_batch_row():
    """A rotary module fed [1, T] positions makes one [1, T, d] table for a batch of B rows: every
    row must read it (batch rows past the first once read past its end: NaN perplexity in distill)."""
    g = torch.Generator().manual_seed(5)
    B, T, H, d = 3, 37, 2, 16
    x = torch.randn(B, T, H, d, generator=g)
    cos, sin = _rope_tables(1, T, d, g)
    ref = apply_rope(x, cos, sin)
    assert_close(norm_kernels.norm_rope(x, None, cos, sin, 0.0), ref, rtol=1e-5, what="norm_rope, [1, T, d] table")
    with pytest.raises(ValueError, match="cos/sin"):
        norm_kernels.norm_rope(x, None, cos[:, :-1], sin[:, :-1], 0.0)


def test_batched_inference_on_the_fused_path_equals_the_module_path(monkeypatch):
    """A batch of 2 under bf16 autocast, as distill's held-out perplexity runs it: fused glue and
    Triton kernels against the PyTorch path."""
    hybrid = tiny_hybrid(["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"])
    x = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    outs = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("SALACONVERT_KERNELS", kernels)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[kernels] = hybrid(x, use_cache=False).logits.float()
    assert torch.isfinite(outs["triton"]).all()
    assert_close(outs["triton"], outs["torch"], rtol=3e-2, what="logits, fused vs module path, batch of 2")


@pytest.mark.parametrize("D", [48, 256])
def test_gated_rms_norm_equals_module_path(D):
    g = torch.Generator().manual_seed(D)
    x, z = torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g)
    module = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.rand(D, generator=g) + 0.5)
    out = norm_kernels.gated_rms_norm(x, z, module.weight, 1e-6)
    assert_close(out, module(x) * torch.sigmoid(z), rtol=1e-5, what=f"gated_rms_norm D={D}")


@pytest.mark.parametrize("D", [48, 576, 4096])
def test_rms_norm_equals_transformers_module(D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 7, D, generator=g) * 2  # 21 rows: not a multiple of the rows per program (NORM_ELEMS // D)
    module = LlamaRMSNorm(D, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.rand(D, generator=g) + 0.5)
        ref = module(x)
    assert_close(norm_kernels.rms_norm(x, module.weight, 1e-5), ref, rtol=1e-5, what=f"rms_norm D={D}")


def test_silu_mul_equals_module_path():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, 1500, generator=g) * 4, torch.randn(2, 3, 1500, generator=g)  # 9000: not a multiple of SILU_BLOCK
    assert_close(norm_kernels.silu_mul(a, b), torch.nn.functional.silu(a) * b, rtol=1e-5, what="silu_mul")


def test_decoder_glue_rounds_where_the_modules_round():
    # fp16 (the interpreter rounds fp16 as the GPU does): the module rounds the normalised row before
    # the weight, and silu's output before the product; a kernel rounding once at the end differs
    # from it in ~26% of the elements, these in none (rms_norm) or a few (silu_mul: exp's last bit)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 576, generator=g) * 3).half()
    module = LlamaRMSNorm(576, eps=1e-5).half()
    with torch.no_grad():
        module.weight.copy_(torch.rand(576, generator=g) + 0.5)
        assert (norm_kernels.rms_norm(x, module.weight, 1e-5) != module(x)).float().mean() < 1e-3
    a, b = (torch.randn(64, 576, generator=g) * 3).half(), torch.randn(64, 576, generator=g).half()
    assert (norm_kernels.silu_mul(a, b) != torch.nn.functional.silu(a) * b).float().mean() < 1e-3


def test_layers_fuse_only_where_no_gradient_is_wanted(monkeypatch):
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    calls = []
    for name in ("norm_rope", "gated_rms_norm"):
        real = getattr(norm_kernels, name)
        monkeypatch.setattr(norm_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    hybrid = tiny_hybrid(["linear_attention", "sparse_attention", "linear_attention", "full_attention"], arch="qwen3",
                         sparse=GPU_SPARSE)  # the Triton sparse path needs blocks of 16
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = hybrid(ids).logits
    assert calls.count("gated_rms_norm") == 2 and calls.count("norm_rope") >= 4
    calls.clear()
    trained = hybrid(ids).logits  # parameters want gradients: the PyTorch path
    assert not calls
    monkeypatch.setenv("SALACONVERT_KERNELS", "torch")
    with torch.no_grad():
        plain = hybrid(ids).logits
    assert_close(fused, plain, rtol=1e-5, what="fused glue vs PyTorch path, logits")
    assert_close(trained.detach(), plain, rtol=1e-5, what="training path, logits")


@pytest.mark.gpu
def test_gpu_bf16_against_fp32_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    B, T, H, d = 2, 1000, 32, 128
    x = torch.randn(B, T, H, d, generator=g).cuda()
    w = (torch.rand(d, generator=g) + 0.5).cuda()
    cos, sin = (t.cuda() for t in _rope_tables(B, T, d, g))
    module = RMSNorm(d, eps=1e-5).cuda()
    with torch.no_grad():
        module.weight.copy_(w)
    ref = apply_rope(module(x), cos, sin)
    out = norm_kernels.norm_rope(x.bfloat16(), w.bfloat16(), cos.bfloat16(), sin.bfloat16(), 1e-5)
    assert_close(out.float(), ref, rtol=1e-2, what="norm_rope bf16")
    D = H * d
    o, z = torch.randn(B, T, D, generator=g).cuda(), torch.randn(B, T, D, generator=g).cuda()
    big = RMSNorm(D).cuda()
    out = norm_kernels.gated_rms_norm(o.bfloat16(), z.bfloat16(), big.weight.bfloat16(), 1e-6)
    assert_close(out.float(), big(o) * torch.sigmoid(z), rtol=1e-2, what="gated_rms_norm bf16")
    # the decoder glue rounds where transformers' modules round: one bf16 step apart at most
    llama = LlamaRMSNorm(D, eps=1e-5).cuda().bfloat16()
    with torch.no_grad():
        llama.weight.copy_(torch.rand(D, generator=g).cuda() + 0.5)
        x = o.bfloat16()
        assert_close(norm_kernels.rms_norm(x, llama.weight, 1e-5).float(), llama(x).float(), rtol=8e-3,
                     what="rms_norm bf16 vs module")
        u = z.bfloat16()
        assert_close(norm_kernels.silu_mul(x, u).float(), (torch.nn.functional.silu(x) * u).float(), rtol=8e-3,
                     what="silu_mul bf16 vs module")
