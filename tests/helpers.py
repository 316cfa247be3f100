"""Shared test helpers: one way to compare tensors, with the error in the message."""
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Fail unless ‖actual − expected‖ / ‖expected‖ ≤ rtol, or max |actual − expected| ≤ atol.

    Relative error over the whole tensor (not per element) is robust to values near zero; the
    max abs diff is printed too so a failure says how far off the worst element is.
    """
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in output"
    diff = (a - e).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    rel = (diff.norm() / e.norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    assert rel <= rtol or max_abs <= atol, f"{what}: rel err {rel:.3e} > {rtol:.1e}, max abs diff {max_abs:.3e} > {atol:.1e}"


def run_cli(*args):
    """`salaconvert ARGS...` in-process, as a user would type it (paths and numbers become strings)."""
    from typer.testing import CliRunner

    from salaconvert.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])
