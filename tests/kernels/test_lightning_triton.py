"""The Triton Lightning kernels against the token-by-token reference.

On CPU they run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); the
`gpu` tests run the compiled kernels at real sizes in bf16 (deselected by default, run them on
the device with `pytest -m gpu`). Every output buffer the kernels allocate is NaN-poisoned first,
so an element the kernel never writes fails the comparison.
"""
import os

import pytest
import torch

from salaconvert.kernels.lightning import chunk as chunk_mod
from salaconvert.kernels.lightning import lightning_attn, lightning_attn_step
from salaconvert.kernels.lightning import step as step_mod
from salaconvert.kernels.lightning.chunk import chunk_lightning_attn
from salaconvert.kernels.lightning.naive import chunk_lightning_attn_torch, naive_lightning_attn
from salaconvert.kernels.lightning.step import lightning_step
from helpers import assert_close

# fp32 inputs: the kernel sums in another order than the recurrence (and the interpreter's dots
# are fp32), so agreement is at fp32 rounding, far below 1e-5. bf16 on the GPU: q, k, v, A and
# the state enter the dots rounded to bf16 (~4e-3 each), so 2e-2 relative is the bf16 bar.
RTOL_FP32 = 1e-5
RTOL_BF16 = 2e-2


def sala_decay(H, device="cpu"):
    h = torch.arange(1, H + 1, dtype=torch.float32, device=device)
    return -(2.0 ** (-8.0 * h / H))


def _nan_empty(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(chunk_mod, "_empty", _nan_empty)
    monkeypatch.setattr(step_mod, "_empty", _nan_empty)


def make(B, T, H, K, V, N=None, with_state=True, device="cpu", dtype=torch.float32, seed=0, Hkv=None):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, generator=g, device=device).to(dtype).requires_grad_()
               for h, d in ((H, K), (Hkv or H, K), (Hkv or H, V)))
    S0 = torch.randn(N or B, H, K, V, generator=g, device=device).requires_grad_() if with_state else None
    return q, k, v, S0


def run_with_grads(fn, q, k, v, decay, S0, cu=None, seed=1):
    """o, final state and the gradients of a random linear function of both (state gradient included)."""
    o, S = fn(q, k, v, decay, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    g = torch.Generator(device=q.device).manual_seed(seed)
    do = torch.randn(o.shape, generator=g, device=q.device)
    dS = torch.randn(S.shape, generator=g, device=q.device)
    leaves = [x for x in (q, k, v, S0) if x is not None]
    grads = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), leaves)
    return o, S, grads


def compare(fn_a, fn_b, q, k, v, decay, S0, cu=None, rtol=RTOL_FP32):
    o, S, grads = run_with_grads(fn_a, q, k, v, decay, S0, cu)
    o_r, S_r, grads_r = run_with_grads(fn_b, q, k, v, decay, S0, cu)
    assert_close(o, o_r, rtol=rtol, what="o")
    assert_close(S, S_r, rtol=rtol, what="final_state")
    for name, a, e in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_r):
        assert_close(a, e, rtol=rtol, what=name)


@pytest.mark.parametrize("T,H", [(1, 1), (63, 4), (100, 9), (300, 2)])
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_and_gradients_match_reference(T, H, d, with_state):
    q, k, v, S0 = make(2, T, H, d, d, with_state=with_state, seed=T + d)
    compare(chunk_lightning_attn, naive_lightning_attn, q, k, v, sala_decay(H), S0)


@pytest.mark.parametrize("T,cps", [(300, 1), (300, 2), (129, 2)])
def test_split_walk_matches_reference(T, cps, monkeypatch):
    """The small-batch path, forward and backward: the sequence cut into segments of cps chunks
    (forced here; the GPU picks it by itself when N·H is small), each segment's entering state
    chained by a scan, in time order for o and dq, against it for dk, dv and d initial_state."""
    monkeypatch.setitem(chunk_mod.TUNE, "CPS", cps)
    q, k, v, S0 = make(1, T, 3, 32, 32, seed=T + cps)
    compare(chunk_lightning_attn, naive_lightning_attn, q, k, v, sala_decay(3), S0)


@pytest.mark.parametrize("T,H,Hkv,cps", [(100, 6, 2, 0), (65, 3, 1, 0), (300, 4, 2, 2), (129, 6, 3, 1)])
def test_gqa_keys_and_values_shared_by_a_group(T, H, Hkv, cps, monkeypatch):
    """GQA: q has H heads, k and v Hkv; head h reads k/v head h // (H/Hkv) with its own state and
    decay. o, the final state and every gradient (dk and dv summed over each group) against the
    reference, on the one-program walk and on the split walk (cps > 0)."""
    monkeypatch.setitem(chunk_mod.TUNE, "CPS", cps)
    q, k, v, S0 = make(2, T, H, 32, 48, seed=T + H, Hkv=Hkv)
    compare(chunk_lightning_attn, naive_lightning_attn, q, k, v, sala_decay(H), S0)


def test_gqa_equals_mha_on_repeated_keys_and_values():
    """The reference's GQA is MHA on k, v repeated per group, gradients summed over the group."""
    q, k, v, S0 = make(1, 70, 4, 32, 32, seed=21, Hkv=2)
    o, S, (dq, dk, dv, dS0) = run_with_grads(chunk_lightning_attn, q, k, v, sala_decay(4), S0)
    k4, v4 = (x.detach().repeat_interleave(2, dim=2).requires_grad_() for x in (k, v))
    o4, S4, (dq4, dk4, dv4, dS04) = run_with_grads(naive_lightning_attn, q, k4, v4, sala_decay(4), S0)
    for name, a, e in (("o", o, o4), ("final_state", S, S4), ("dq", dq, dq4), ("d_initial_state", dS0, dS04),
                       ("dk", dk, dk4.view(1, 70, 2, 2, 32).sum(3)), ("dv", dv, dv4.view(1, 70, 2, 2, 32).sum(3))):
        assert_close(a, e, rtol=RTOL_FP32, what=name)


def test_unequal_head_dims_and_custom_scale():
    q, k, v, S0 = make(1, 70, 3, 32, 48, seed=3)
    decay = sala_decay(3)
    compare(lambda *a, **kw: chunk_lightning_attn(*a, scale=0.3, **kw), lambda *a, **kw: naive_lightning_attn(*a, scale=0.3, **kw), q, k, v, decay, S0)


def test_head_dim_128():
    q, k, v, S0 = make(1, 80, 2, 128, 128, seed=4)
    compare(chunk_lightning_attn, chunk_lightning_attn_torch, q, k, v, sala_decay(2), S0)


@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_matches_reference_and_per_sequence(with_state):
    lens = [70, 1, 130]                       # one spans chunks unevenly, one is a single token
    cu = torch.tensor([0, 70, 71, 201], dtype=torch.int32)
    _check_varlen(lens, cu, with_state)


def test_varlen_with_an_empty_sequence():
    """An empty sequence returns its initial state as its final state, gradient included."""
    _check_varlen([70, 0, 131], torch.tensor([0, 70, 70, 201], dtype=torch.int32), with_state=True)


def _check_varlen(lens, cu, with_state):
    H, d = 3, 32
    q, k, v, S0 = make(1, sum(lens), H, d, d, N=3, with_state=with_state, seed=5)
    decay = sala_decay(H)
    compare(chunk_lightning_attn, naive_lightning_attn, q, k, v, decay, S0, cu)
    o, S = chunk_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        S0_n = None if S0 is None else S0[n : n + 1]
        o_n, S_n = chunk_lightning_attn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], decay, initial_state=S0_n, output_final_state=True)
        assert_close(o[:, bos:eos], o_n, rtol=RTOL_FP32, what=f"o of sequence {n}")
        assert_close(S[n : n + 1], S_n, rtol=RTOL_FP32, what=f"final state of sequence {n}")


def test_mixed_dtypes_run_in_q_dtype():
    q, k, v, _ = make(1, 40, 2, 32, 32, with_state=False, seed=14)
    with torch.no_grad():
        o, _ = chunk_lightning_attn(q, k, v.bfloat16(), sala_decay(2))
        o_ref, _ = naive_lightning_attn(q, k, v.bfloat16().float(), sala_decay(2))
    assert o.dtype == torch.float32
    assert_close(o, o_ref, rtol=RTOL_FP32, what="o")


def test_split_with_carried_state_equals_whole():
    q, k, v, _ = make(2, 200, 3, 32, 32, with_state=False, seed=6)
    decay = sala_decay(3)
    with torch.no_grad():
        o_all, S_all = chunk_lightning_attn(q, k, v, decay, output_final_state=True)
        cut = 90
        o1, S1 = chunk_lightning_attn(q[:, :cut], k[:, :cut], v[:, :cut], decay, output_final_state=True)
        o2, S2 = chunk_lightning_attn(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=S1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o_all, rtol=RTOL_FP32, what="o")
    assert_close(S2, S_all, rtol=RTOL_FP32, what="final_state")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v, S0 = make(1, 100, 2, 32, 32, dtype=dtype, seed=7)
    ref = [x.detach().float().requires_grad_() if x is not None else None for x in (q, k, v, S0)]
    o, S, grads = run_with_grads(chunk_lightning_attn, q, k, v, sala_decay(2), S0)
    o_r, S_r, grads_r = run_with_grads(naive_lightning_attn, *ref[:3], sala_decay(2), ref[3])
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close(o, o_r, rtol=RTOL_BF16, what="o")
    assert_close(S, S_r, rtol=RTOL_BF16, what="final_state")
    for name, a, e in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_r):
        assert_close(a, e, rtol=RTOL_BF16, what=name)


def test_step_matches_recurrence_in_place():
    B, T, H, K, V = 2, 5, 3, 32, 64
    q, k, v, S0 = make(B, T, H, K, V, seed=8)
    decay = sala_decay(H)
    with torch.no_grad():
        o_ref, S_ref = naive_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True)
        state = S0.detach().clone()
        ptr = state.data_ptr()
        o = torch.cat([lightning_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], decay, state) for t in range(T)], 1)
    assert state.data_ptr() == ptr
    assert_close(o, o_ref, rtol=RTOL_FP32, what="o")
    assert_close(state, S_ref, rtol=RTOL_FP32, what="state updated in place")


def test_step_gqa_matches_recurrence():
    B, T, H, Hkv, K, V = 2, 4, 6, 2, 32, 32
    q, k, v, S0 = make(B, T, H, K, V, seed=22, Hkv=Hkv)
    decay = sala_decay(H)
    with torch.no_grad():
        o_ref, S_ref = naive_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True)
        state = S0.detach().clone()
        o = torch.cat([lightning_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], decay, state) for t in range(T)], 1)
    assert_close(o, o_ref, rtol=RTOL_FP32, what="o")
    assert_close(state, S_ref, rtol=RTOL_FP32, what="state")


def test_dispatch_runs_triton_when_asked(monkeypatch):
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    calls = []
    real = chunk_mod.lightning_chunk_launch
    monkeypatch.setattr(chunk_mod, "lightning_chunk_launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, S0 = make(1, 20, 2, 32, 32, seed=9)
    with torch.no_grad():
        o, _ = lightning_attn(q, k, v, sala_decay(2), initial_state=S0)
        state = S0.detach().clone()
        lightning_attn_step(q[:, :1], k[:, :1], v[:, :1], sala_decay(2), state)
    assert calls, "lightning_attn did not reach the Triton launcher"
    assert_close(o, naive_lightning_attn(q, k, v, sala_decay(2), initial_state=S0)[0], rtol=RTOL_FP32, what="o")


# ---- GPU: compiled kernels at real sizes, bf16 against the fp32 reference ----

@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("GPU tests compile the kernels: run them as TRITON_INTERPRET=0 pytest -m gpu")


def gpu(fn):
    return pytest.mark.gpu(pytest.mark.usefixtures("cuda")(fn))


@gpu
@pytest.mark.parametrize("B,H,T,d,Hkv", [(2, 8, 4096, 128, 8), (1, 4, 3000, 64, 4), (4, 32, 1024, 128, 32),
                                         (1, 32, 16384, 128, 32), (1, 32, 16384, 128, 8), (4, 32, 1024, 128, 8)])
def test_gpu_bf16_forward_and_gradients(B, H, T, d, Hkv):
    """Small N·H takes the split walk (segments + scan), N·H = 128 the plain one; Hkv < H: GQA."""
    q, k, v, S0 = make(B, T, H, d, d, device="cuda", dtype=torch.bfloat16, seed=10, Hkv=Hkv)
    decay = sala_decay(H, "cuda")
    ref = [x.detach().float().requires_grad_() for x in (q, k, v, S0)]
    o, S, grads = run_with_grads(chunk_lightning_attn, q, k, v, decay, S0)
    o_r, S_r, grads_r = run_with_grads(chunk_lightning_attn_torch, *ref[:3], decay, ref[3])
    assert_close(o, o_r, rtol=RTOL_BF16, what="o")
    assert_close(S, S_r, rtol=RTOL_BF16, what="final_state")
    for name, a, e in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_r):
        assert_close(a, e, rtol=RTOL_BF16, what=name)


@gpu
def test_gpu_varlen_bf16():
    cu = torch.tensor([0, 1000, 1001, 5000], dtype=torch.int32, device="cuda")
    H, d = 4, 128
    q, k, v, S0 = make(1, 5000, H, d, d, N=3, device="cuda", dtype=torch.bfloat16, seed=11)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v, S0)]
    o, S, grads = run_with_grads(chunk_lightning_attn, q, k, v, sala_decay(H, "cuda"), S0, cu)
    o_r, S_r, grads_r = run_with_grads(chunk_lightning_attn_torch, *ref[:3], sala_decay(H, "cuda"), ref[3], cu)
    assert_close(o, o_r, rtol=RTOL_BF16, what="o")
    for name, a, e in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_r):
        assert_close(a, e, rtol=RTOL_BF16, what=name)


@gpu
def test_gpu_fp32_forward_tight():
    q, k, v, S0 = make(2, 2048, 4, 64, 64, device="cuda", seed=12)
    decay = sala_decay(4, "cuda")
    with torch.no_grad():
        o, S = chunk_lightning_attn(q, k, v, decay, initial_state=S0, output_final_state=True)
        o_r, S_r = chunk_lightning_attn_torch(q, k, v, decay, initial_state=S0, output_final_state=True)
    # fp32 inputs use ieee dots in the kernel; the reference's cuBLAS matmuls may use tf32 unless disabled
    assert_close(o, o_r, rtol=1e-3, what="o")
    assert_close(S, S_r, rtol=1e-3, what="final_state")


@gpu
def test_gpu_step_graph_captured():
    B, H, d = 2, 32, 128
    q, k, v, S0 = make(B, 4, H, d, d, device="cuda", dtype=torch.bfloat16, seed=13)
    decay = sala_decay(H, "cuda")
    with torch.no_grad():
        o_ref, S_ref = chunk_lightning_attn_torch(q.float(), k.float(), v.float(), decay, initial_state=S0, output_final_state=True)
        state = S0.detach().clone()
        qs, ks, vs = (x[:, :1].clone() for x in (q, k, v))
        lightning_step(qs, ks, vs, decay, state)   # compile outside the capture
        state.copy_(S0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_g = lightning_step(qs, ks, vs, decay, state)
        state.copy_(S0)
        outs = []
        for t in range(4):
            qs.copy_(q[:, t : t + 1]); ks.copy_(k[:, t : t + 1]); vs.copy_(v[:, t : t + 1])
            graph.replay()
            outs.append(o_g.clone())
    assert_close(torch.cat(outs, 1), o_ref, rtol=RTOL_BF16, what="o")
    assert_close(state, S_ref, rtol=1e-4, what="state (fp32 math, other summation order)")
