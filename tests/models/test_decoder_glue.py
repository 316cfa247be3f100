"""The teacher architecture's decoder glue on fused kernels (salaconvert.models.decoder_glue).

Under the Triton interpreter (SALACONVERT_KERNELS=triton on CPU tensors): for every registered
architecture, teacher and hybrid, a forward inside `fused_decoder_glue` runs each RMSNorm and each
SwiGLU product through the fused kernels, gives the module path's logits (fp32: summation order
only, 1e-5 relative), and leaves the modules as they were on exit; with a gradient wanted it does
not fuse.
"""
import pytest
import torch

from helpers import assert_close
from salaconvert.eval.forward import prefill
from salaconvert.kernels import norm as norm_kernels
from salaconvert.models.decoder_glue import fused_decoder_glue
from tiny import tiny_hybrid, tiny_teacher


def _count_calls(monkeypatch) -> list:
    calls = []
    for name in ("rms_norm", "silu_mul"):
        real = getattr(norm_kernels, name)
        monkeypatch.setattr(norm_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_fused_glue_gives_the_module_path_logits(monkeypatch, arch, which):
    model = tiny_teacher(arch) if which == "teacher" else tiny_hybrid(
        ["full_attention", "linear_attention", "linear_attention", "full_attention"], arch=arch)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    calls = _count_calls(monkeypatch)
    with torch.no_grad(), fused_decoder_glue(model):
        fused = model(ids).logits
    layers = model.config.num_hidden_layers
    # two norms per layer and the final one; Qwen3's own attention (every teacher layer, the
    # hybrid's full-attention ones) also norms q and k per head
    full = layers if which == "teacher" else model.config.layer_types.count("full_attention")
    qk_norms = 2 * full if arch == "qwen3" else 0
    assert calls.count("rms_norm") == 2 * layers + 1 + qk_norms
    assert calls.count("silu_mul") == layers
    assert_close(fused, plain, rtol=1e-5, what=f"{arch} {which}: fused decoder glue vs module path")
    assert not any("forward" in vars(m) for m in model.modules()), "the swap outlived the context"


def test_prefill_fuses_and_training_does_not(monkeypatch):
    model = tiny_teacher("llama")
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    calls = _count_calls(monkeypatch)
    prefill(model, list(range(30)), chunk=16)
    assert calls.count("silu_mul") == 2 * model.config.num_hidden_layers  # two chunks
    calls.clear()
    with fused_decoder_glue(model):
        model(torch.arange(10)[None]).logits.sum().backward()  # parameters want gradients: module path
    assert not calls
    assert model.model.norm.weight.grad is not None
