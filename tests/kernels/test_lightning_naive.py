"""The PyTorch Lightning paths against the token-by-token recurrence (fp32, CPU)."""
import pytest
import torch

from salaconvert.kernels.lightning import lightning_attn, lightning_attn_step
from salaconvert.kernels.lightning.naive import chunk_lightning_attn_torch, naive_lightning_attn, naive_lightning_attn_step
from helpers import assert_close

# fp32 throughout: the chunked form reorders sums, so agreement is at fp32 rounding, well below 1e-5.
RTOL = 1e-5


def sala_decay(H):
    h = torch.arange(1, H + 1, dtype=torch.float32)
    return -(2.0 ** (-8.0 * h / H))


def inputs(B, T, H, K, V, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


@pytest.mark.parametrize("T,chunk", [(1, 64), (63, 64), (64, 64), (100, 64), (300, 64), (257, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(T, chunk, with_state):
    B, H, K, V = 2, 3, 16, 24
    q, k, v = inputs(B, T, H, K, V, seed=T)
    S0 = torch.randn(B, H, K, V) if with_state else None
    decay = sala_decay(H)
    o_ref, S_ref = naive_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True)
    o, S = chunk_lightning_attn_torch(q, k, v, decay, initial_state=S0, output_final_state=True, chunk_size=chunk)
    assert_close(o, o_ref, rtol=RTOL, what="o")
    assert_close(S, S_ref, rtol=RTOL, what="final_state")


def test_no_final_state_unless_asked():
    q, k, v = inputs(1, 10, 2, 8, 8)
    assert chunk_lightning_attn_torch(q, k, v, sala_decay(2))[1] is None
    assert naive_lightning_attn(q, k, v, sala_decay(2))[1] is None


def test_split_with_carried_state_equals_whole():
    B, T, H, K, V = 2, 150, 4, 16, 16
    q, k, v = inputs(B, T, H, K, V, seed=1)
    decay = sala_decay(H)
    o_all, S_all = chunk_lightning_attn_torch(q, k, v, decay, output_final_state=True)
    cut = 77
    o1, S1 = chunk_lightning_attn_torch(q[:, :cut], k[:, :cut], v[:, :cut], decay, output_final_state=True)
    o2, S2 = chunk_lightning_attn_torch(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=S1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o_all, rtol=RTOL, what="o")
    assert_close(S2, S_all, rtol=RTOL, what="final_state")


@pytest.mark.parametrize("fn", [naive_lightning_attn, chunk_lightning_attn_torch])
def test_varlen_equals_per_sequence(fn):
    H, K, V = 3, 16, 8
    lens = [37, 1, 90]
    cu = torch.tensor([0, 37, 38, 128], dtype=torch.int32)
    q, k, v = inputs(1, sum(lens), H, K, V, seed=2)
    S0 = torch.randn(len(lens), H, K, V)
    decay = sala_decay(H)
    o, S = fn(q, k, v, decay, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, S_n = naive_lightning_attn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], decay, initial_state=S0[n : n + 1], output_final_state=True)
        assert_close(o[:, bos:eos], o_n, rtol=RTOL, what=f"o of sequence {n}")
        assert_close(S[n : n + 1], S_n, rtol=RTOL, what=f"final_state of sequence {n}")


def test_step_equals_recurrent():
    B, T, H, K, V = 2, 12, 3, 16, 8
    q, k, v = inputs(B, T, H, K, V, seed=3)
    decay = sala_decay(H)
    S0 = torch.randn(B, H, K, V)
    o_ref, S_ref = naive_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True)
    state = S0.clone()
    for step in (naive_lightning_attn_step, lightning_attn_step):
        state = S0.clone()
        ptr = state.data_ptr()
        outs = [step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], decay, state) for t in range(T)]
        assert state.data_ptr() == ptr
        assert_close(torch.cat(outs, 1), o_ref, rtol=RTOL, what="o")
        assert_close(state, S_ref, rtol=RTOL, what="state updated in place")


def test_gradients_of_chunked_match_recurrent():
    B, T, H, K, V = 2, 90, 3, 16, 8
    decay = sala_decay(H)
    grads = []
    for fn, kw in ((naive_lightning_attn, {}), (chunk_lightning_attn_torch, {"chunk_size": 32})):
        q, k, v = inputs(B, T, H, K, V, seed=4, requires_grad=True)
        S0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(5)).requires_grad_()
        o, S = fn(q, k, v, decay, initial_state=S0, output_final_state=True, **kw)
        g = torch.Generator().manual_seed(6)
        ((o * torch.randn(o.shape, generator=g)).sum() + (S * torch.randn(S.shape, generator=g)).sum()).backward()
        grads.append([x.grad for x in (q, k, v, S0)])
    for name, a, e in zip(("dq", "dk", "dv", "dS0"), *grads):
        assert_close(a, e, rtol=RTOL, what=name)


def test_public_dispatch_on_cpu_and_bf16_dtype():
    q, k, v = inputs(1, 70, 2, 16, 16, seed=7)
    decay = sala_decay(2)
    o_ref, _ = naive_lightning_attn(q, k, v, decay)
    o, S = lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), decay, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close(o, o_ref, rtol=2e-2, what="bf16 inputs (bf16 rounding of q, k, v and o)")
