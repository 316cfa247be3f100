"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at import time
of the conftest (pytest imports it before the test modules). A value set by the caller wins.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
