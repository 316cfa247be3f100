"""Layer-selection tests: one CPU thread (the machine's cores are shared, and tiny models gain nothing
from two), and one tiny teacher on disk for the module."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
