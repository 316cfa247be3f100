"""The teacher architecture's decoder glue on fused kernels, for inference.

Every decoder layer of a Llama-family model (the teacher, and the hybrid built from it) wraps its
attention and MLP in modules that PyTorch runs as chains of elementwise passes over the
activations: transformers' RMSNorm (cast, square, mean, rsqrt, product, cast, weight: seven
launches, each reading and writing a [tokens, hidden] tensor) and the SwiGLU product
act(gate(x)) · up(x) (two). In a Llama-3-8B-shaped prefill at 256K they took about 1.1 s of GPU
time, the same in both models; fused, 0.3 s (benchmarks/notes-long-context.md, runs 21 and 25).

`fused_decoder_glue(model)` gives, for its duration, those modules of the registered
architectures a forward on `salaconvert.kernels.norm.rms_norm` / `silu_mul`: one pass each,
rounding where the module rounds. The swap is per instance, undone on exit, and each forward falls
back to the module's own where `layers.common.fuse_glue` says no (no Triton device, or a gradient
wanted). `eval.forward.prefill`, `decode_step` and `GraphDecoder` run under it, so teacher and
hybrid alike get it.
"""
import contextlib

import torch
from torch import nn

from salaconvert.layers import common

# Modules whose forward is, exactly, weight · rmsnorm(x).to(x.dtype) (rmsnorm in fp32) ...
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
# ... and down(act(gate(x)) · up(x)); fused only where act is SiLU.
_SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def _rms_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not common.fuse_glue(x, module):
        return type(module).forward(module, x)
    from salaconvert.kernels.norm import rms_norm

    return rms_norm(x, module.weight, module.variance_epsilon)


def _swiglu_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not common.fuse_glue(x, module):
        return type(module).forward(module, x)
    from salaconvert.kernels.norm import silu_mul

    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


@contextlib.contextmanager
def fused_decoder_glue(model: nn.Module):
    """For the duration, `model`'s RMSNorms and SwiGLU MLPs of the registered architectures run fused."""
    swapped = []
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):  # already swapped (a nested use): leave it to the outer one
            continue
        if name in _RMS_NORMS:
            module.forward = _rms_norm_forward.__get__(module)
        elif name in _SWIGLU_MLPS and _is_silu(module.act_fn):
            module.forward = _swiglu_forward.__get__(module)
        else:
            continue
        swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward
