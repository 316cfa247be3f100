"""Stage-2 KL and the cross-entropy: chunked == unchunked over every position, and late positions count."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from salaconvert.distill.losses import chunked_ce, chunked_kl


def _inputs(B=2, T=37, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w_s = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    w_t = torch.randn(V, D, generator=g, dtype=torch.float64)
    return hs, ht, w_s, w_t


def _reference_kl(hs, ht, w_s, w_t, temperature=1.0):
    """KL(teacher ‖ student) per position, averaged over all B·T positions, one big tensor."""
    ls, lt = (hs @ w_s.T) / temperature, (ht @ w_t.T) / temperature
    kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 512])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_unchunked_value_and_gradients(chunk, temperature):
    hs, ht, w_s, w_t = _inputs()
    ref = _reference_kl(hs, ht, w_s, w_t, temperature)
    g_ref = torch.autograd.grad(ref, (hs, w_s))
    got = chunked_kl(hs, ht, w_s, w_t, chunk=chunk, temperature=temperature)
    g_got = torch.autograd.grad(got, (hs, w_s))
    # float64 inputs; the KL itself is computed in fp32 (as in training): 1e-6 relative.
    assert_close(got, ref, rtol=1e-6, what="KL")
    for a, e, name in zip(g_got, g_ref, ("d hs", "d W")):
        assert_close(a, e, rtol=1e-5, what=name)


@pytest.mark.parametrize("position", [0, 511, 1000, 1199])
def test_every_position_counts_even_far_past_the_first_chunk(position):
    """HALO's published bug scored only the first 512 positions; a change anywhere must show."""
    hs, ht, w_s, w_t = _inputs(B=1, T=1200, D=8, V=20)
    with torch.no_grad():
        base = chunked_kl(hs, ht, w_s, w_t, chunk=256)
        ht2 = ht.clone()
        ht2[0, position] += 3.0
        changed = chunked_kl(hs, ht2, w_s, w_t, chunk=256)
    assert (changed - base).abs().item() > 1e-6
    hs.grad = None
    chunked_kl(hs, ht, w_s, w_t, chunk=256).backward()
    assert hs.grad[0, position].abs().sum() > 0  # and it gets a gradient


def test_identical_models_have_zero_kl():
    hs, _, w_s, _ = _inputs()
    assert chunked_kl(hs, hs.detach(), w_s, w_s.detach(), chunk=7).abs().item() < 1e-6


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_cross_entropy_equals_the_plain_next_token_loss(chunk):
    hs, _, w_s, _ = _inputs(T=20)
    ids = torch.randint(0, 50, (2, 20))
    total, count = chunked_ce(hs, w_s, ids, chunk=chunk)
    ref = F.cross_entropy((hs[:, :-1] @ w_s.T).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert count == 2 * 19
    assert_close(total, ref, rtol=1e-6, what="CE")  # fp32 logits inside: 1e-6
