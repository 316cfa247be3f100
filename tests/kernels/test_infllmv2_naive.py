"""The InfLLM-V2 reference against dense attention and its own invariants (CPU, small blocks).

Tolerances: everything is computed in fp32 on the CPU, so reference vs oracle differ only by
summation order: rtol 1e-5 on the relative norm error.
"""
import pytest
import torch

from salaconvert.kernels.infllmv2 import infllmv2_attn, infllmv2_select
from salaconvert.kernels.infllmv2.naive import compress_k, dense_causal_attn, naive_infllmv2_attn, naive_infllmv2_select
from helpers import assert_close

SMALL = dict(block_size=8, kernel_size=4, stride=2, init_blocks=1, local_blocks=2)


def _qkv(B, Tq, Tk, Hq, Hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, d, generator=g, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, d, generator=g, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("G", [1, 3, 4])
def test_every_block_selected_is_dense(G):
    q, k, v = _qkv(2, 37, 37, 2 * G, 2, 16)
    o = naive_infllmv2_attn(q, k, v, topk=8, dense_len=0, **SMALL)  # 37 tokens -> 5 blocks <= topk
    assert_close(o, dense_causal_attn(q, k, v), rtol=1e-5, what="all blocks == dense")


@pytest.mark.parametrize("G", [1, 3, 4])
def test_short_is_dense(G):
    q, k, v = _qkv(1, 50, 50, 2 * G, 2, 16)
    o = naive_infllmv2_attn(q, k, v, topk=3, dense_len=50, **SMALL)
    assert_close(o, dense_causal_attn(q, k, v), rtol=1e-5, what="Tk <= dense_len == dense")


@pytest.mark.parametrize("G", [1, 3, 4])
def test_end_aligned_queries_are_last_rows(G):
    q, k, v = _qkv(2, 70, 70, 2 * G, 2, 16)
    kw = dict(topk=4, dense_len=16, **SMALL)
    full = naive_infllmv2_attn(q, k, v, **kw)
    for Tq in (1, 13):
        part = naive_infllmv2_attn(q[:, -Tq:], k, v, **kw)
        assert_close(part, full[:, -Tq:], rtol=1e-5, what=f"Tq={Tq} end-aligned")
        sel = naive_infllmv2_select(q[:, -Tq:], k, **kw)
        assert torch.equal(sel, naive_infllmv2_select(q, k, **kw)[:, -Tq:])


def test_selection_invariants():
    q, k, v = _qkv(1, 93, 93, 6, 2, 16)
    topk = 5
    idx = naive_infllmv2_select(q, k, topk=topk, **SMALL)
    assert idx.shape == (1, 93, 2, topk) and idx.dtype == torch.int32
    for t in range(93):
        qb = t // 8
        for h in range(2):
            row = idx[0, t, h]
            ids = row[row >= 0].tolist()
            assert ids == sorted(set(ids)), "ascending, no duplicates"
            assert (row[len(ids):] == -1).all(), "-1 padding at the end"
            assert len(ids) == min(topk, qb + 1)
            assert 0 in ids and qb in ids and (qb < 1 or qb - 1 in ids), "init and local blocks forced"
            assert max(ids) <= qb, "causal"


def test_selection_picks_the_block_the_query_looks_at():
    # a key block made to align with every query must be selected beyond the forced ones
    q, k, v = _qkv(1, 96, 96, 2, 1, 16)
    q[:] = 0.1 * q + 3.0
    k[0, 40:48] = 3.0  # block 5
    idx = naive_infllmv2_select(q, k, topk=4, **SMALL)
    assert (idx[0, 90:, 0] == 5).any(-1).all()


def test_sparse_matches_explicit_gather():
    q, k, v = _qkv(1, 80, 80, 4, 2, 8, seed=3)
    kw = dict(topk=4, dense_len=0, **SMALL)
    o = naive_infllmv2_attn(q, k, v, **kw)
    idx = naive_infllmv2_select(q, k, **kw)
    for t in (0, 17, 45, 79):
        for h in range(4):
            blocks = [b for b in idx[0, t, h // 2].tolist() if b >= 0]
            toks = [x for b in blocks for x in range(b * 8, b * 8 + 8) if x <= t]
            s = (q[0, t, h] @ k[0, toks, h // 2].T) * 8 ** -0.5
            ref = torch.softmax(s, -1) @ v[0, toks, h // 2]
            assert_close(o[0, t, h], ref, rtol=1e-5, what=f"t={t} h={h}")


def test_varlen_equals_per_sequence():
    q, k, v = _qkv(1, 90, 90, 6, 2, 16)
    cu = torch.tensor([0, 23, 64, 90])
    kw = dict(topk=3, dense_len=30, **SMALL)
    o = naive_infllmv2_attn(q, k, v, cu_seqlens=cu, **kw)
    sel = naive_infllmv2_select(q, k, cu_seqlens=cu, **kw)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert_close(o[:, a:b], naive_infllmv2_attn(q[:, a:b], k[:, a:b], v[:, a:b], **kw), rtol=1e-6, what="varlen")
        assert torch.equal(sel[:, a:b], naive_infllmv2_select(q[:, a:b], k[:, a:b], **kw))


def test_gradients_flow_and_match_dense():
    q, k, v = _qkv(1, 40, 40, 4, 2, 8)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kw = dict(topk=3, dense_len=0, **SMALL)
    o = naive_infllmv2_attn(q, k, v, **kw)
    o.square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))
    # gradient of the sparse op == gradient of dense attention restricted to the selected tokens,
    # checked through the all-selected case
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    naive_infllmv2_attn(q2, k2, v2, topk=8, dense_len=0, **SMALL).square().sum().backward()
    q3, k3, v3 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    dense_causal_attn(q3, k3, v3).square().sum().backward()
    for a, b, n in ((q2, q3, "dq"), (k2, k3, "dk"), (v2, v3, "dv")):
        assert_close(a.grad, b.grad, rtol=1e-5, what=n)


def test_public_dispatch_cpu(monkeypatch):
    monkeypatch.setenv("SALACONVERT_KERNELS", "torch")
    q, k, v = _qkv(1, 30, 30, 4, 2, 8)
    kw = dict(topk=3, dense_len=0, **SMALL)
    assert_close(infllmv2_attn(q, k, v, **kw), naive_infllmv2_attn(q, k, v, **kw), rtol=0, atol=0, what="dispatch")
    assert torch.equal(infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw))


def test_compress_k_mean_pool():
    k = torch.randn(1, 37, 2, 4)
    kc = compress_k(k, 4, 2)
    assert kc.shape == (1, 17, 2, 4)
    assert_close(kc[0, 5], k[0, 10:14].mean(0), rtol=1e-6, what="window 5")


def test_defaults_long_sequence_runs():
    # default block/pool sizes, sparse path on: 4K keys on the CPU, bounded memory
    q, k, v = _qkv(1, 64, 4096, 4, 2, 64)
    o = naive_infllmv2_attn(q, k, v, topk=16, local_blocks=4, dense_len=1024)
    assert o.shape == q.shape and torch.isfinite(o).all()
    idx = naive_infllmv2_select(q, k, topk=16, local_blocks=4)
    assert (idx[0, :, :, 0] == 0).all() and (idx >= 0).all()


def test_coarse_norm_only_reweights_heads():
    # the coarse normaliser is one factor per (row, head): with one head per group, or with the heads
    # of a group identical, it cannot change a ranking (rows that see a coarse key); with distinct
    # heads it must change some selections
    kw = dict(topk=5, **SMALL)
    q, k, _ = _qkv(1, 200, 200, 6, 2, 16, seed=9)
    seen = slice(4 * SMALL["kernel_size"], None)  # rows that see at least one coarse key
    same_heads = q[:, :, ::3].repeat_interleave(3, 2)
    for qq in (q[:, :, ::3], same_heads):
        assert torch.equal(naive_infllmv2_select(qq, k, coarse_norm=True, **kw)[:, seen],
                           naive_infllmv2_select(qq, k, **kw)[:, seen])
    assert not torch.equal(naive_infllmv2_select(q, k, coarse_norm=True, **kw), naive_infllmv2_select(q, k, **kw))
