"""Which implementation an op runs: Triton on CUDA tensors, PyTorch on the CPU.

`SALACONVERT_KERNELS=auto|triton|torch` overrides the choice. `triton` on CPU tensors runs the
Triton kernels through the interpreter, so it needs `TRITON_INTERPRET=1` set before triton is
imported; that is how CI, which has no GPU, checks them.
"""
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("SALACONVERT_KERNELS", "auto").lower()
    if mode not in _CHOICES:
        raise ValueError(f"SALACONVERT_KERNELS={mode!r}: expected one of {', '.join(_CHOICES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run its Triton kernel."""
    mode = kernel_mode()
    if mode == "auto":
        return t.is_cuda
    return mode == "triton"
