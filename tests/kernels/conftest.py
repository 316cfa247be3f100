"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at import time
of the conftest (pytest imports it before the test modules). A value set by the caller wins.
The interpreter also needs a small NumPy ≥ 2.4 fix (kernels/lightning/_triton_compat.py), loaded
by path so that this conftest does not import the whole kernels package.
"""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

_compat = Path(__file__).resolve().parents[2] / "kernels" / "lightning" / "_triton_compat.py"
if os.environ["TRITON_INTERPRET"] == "1" and _compat.exists():
    _spec = importlib.util.spec_from_file_location("_salaconvert_triton_compat", _compat)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.patch_interpreter()
