"""Fixtures shared by all tests. Tiny models come from tests/tiny.py, built from configs in code."""
import pytest

from tiny import ARCHS


@pytest.fixture(params=list(ARCHS))
def arch(request):
    """Each registered architecture in turn."""
    return request.param
