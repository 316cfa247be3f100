"""Fixtures shared by all tests. Tiny models come from tests/tiny.py, built from configs in code."""
import os

# Before anything imports triton (transformers does): Triton decides between compiled and
# interpreted kernels at import. CPU runs interpret; GPU runs pass TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import ARCHS, save_tiny_teacher  # noqa: E402

# Tiny tensors: one thread is faster than two that wait on each other, and CI machines are small.
torch.set_num_threads(1)


@pytest.fixture(params=list(ARCHS))
def arch(request):
    """Each registered architecture in turn."""
    return request.param


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny llama teacher saved as a local Hugging Face directory, with a tokenizer."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")
