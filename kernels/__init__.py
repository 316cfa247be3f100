"""Attention kernels of the hybrid: Lightning linear attention and InfLLM-V2 block-sparse attention.

Each op lives in its own folder with a pure-PyTorch reference (`naive.py`) beside its Triton
implementation; `dispatch.use_triton` decides which one a call runs (SPEC §6).
"""
if __name__ == "kernels":
    # The repository root is on sys.path (`python -m ...` or `python -c` run from it), so this folder
    # shadows Hugging Face's `kernels` package, which transformers probes for at import.
    raise ImportError("salaconvert's kernels/ folder was imported as top-level 'kernels': the repository root "
                      "is on sys.path; set PYTHONSAFEPATH=1 or run from another directory")

from salaconvert.kernels.infllmv2 import infllmv2_attn, infllmv2_select
from salaconvert.kernels.lightning import lightning_attn, lightning_attn_step

__all__ = ["infllmv2_attn", "infllmv2_select", "lightning_attn", "lightning_attn_step"]
