"""Fixtures shared by all tests. Tiny models come from tests/tiny.py, built from configs in code."""
import pytest
import torch

from tiny import ARCHS

# Tiny tensors: one thread is faster than two that wait on each other, and CI machines are small.
torch.set_num_threads(1)


@pytest.fixture(params=list(ARCHS))
def arch(request):
    """Each registered architecture in turn."""
    return request.param
