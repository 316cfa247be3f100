"""The InfLLM-V2 Triton kernels against the PyTorch reference.

On CPU they run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) at small
sizes: block 16, compressed window 8 / stride 4 (so the max-pool is still 5 windows with stride
4, as at 64/32/16), head dim 16. Every buffer the kernels must fill is NaN-poisoned first.
`gpu` tests run the compiled kernels at real sizes (deselected by default: `pytest -m gpu` with
TRITON_INTERPRET=0 on the device).

Tolerances: fp32 on CPU, the kernels sum in another order than the reference: 1e-5 relative.
bf16 on the GPU: q, k, v, p and dS enter the dots rounded to bf16 (~4e-3 each): 2e-2 relative.
Selection is compared exactly on CPU (fp32 scores, ties broken by block id on both sides).
"""
import copy
import os

import pytest
import torch

from salaconvert.kernels.infllmv2 import infllmv2_attn, infllmv2_decode, infllmv2_select, layout
from salaconvert.kernels.infllmv2 import parallel as parallel_mod
from salaconvert.kernels.infllmv2 import by_block as by_block_mod
from salaconvert.kernels.infllmv2 import decode as decode_mod
from salaconvert.kernels.infllmv2 import select as select_mod
from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode, update_compressed_cache
from salaconvert.kernels.infllmv2.naive import (compress_k, dense_causal_attn, naive_infllmv2_attn, naive_infllmv2_decode,
                                                naive_infllmv2_select)
from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_attn, parallel_infllmv2_select
from salaconvert.kernels.infllmv2.route import Router
from helpers import assert_close

SMALL = dict(block_size=16, kernel_size=8, stride=4, init_blocks=1, local_blocks=2)
RTOL_FP32 = 1e-5
RTOL_BF16 = 2e-2


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def nan_empty(shape, dtype, device):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)
    monkeypatch.setattr(layout, "empty", nan_empty)


def _qkv(B, Tq, Tk, Hq, Hkv, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return mk(B, Tq, Hq, d), mk(B, Tk, Hkv, d), mk(B, Tk, Hkv, d)


def _tied_qk(T, Hq, Hkv, d, seed, copies):
    """q and k of small integers, the key block [16, 32) repeated `copies` times after itself: every
    dot product and window mean is then exact in fp32 whatever order a kernel sums in, so the copies'
    block scores tie bitwise (on random normal inputs, triton 3.9's interpreter scored two identical
    windows an ulp apart)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, T, Hq, d), generator=g).float()
    k = torch.randint(-2, 3, (1, T, Hkv, d), generator=g).float()
    k[:, 32:16 * (copies + 2)] = k[:, 16:32].repeat(1, copies, 1, 1)
    return q, k


def _grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def _compare_fwd_bwd(q, k, v, rtol, what, **kw):
    do = torch.randn_like(q)
    ours = _grads(parallel_infllmv2_attn, q, k, v, do, **kw)
    ref = _grads(naive_infllmv2_attn, q, k, v, do, **kw)
    for a, b, n in zip(ours, ref, ("o", "dq", "dk", "dv")):
        assert_close(a, b, rtol=rtol, what=f"{what} {n}")


# ---- stage 1: selection ----

@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16])
def test_select_equals_reference(G):
    # groups 2–8 score rows in select.row_order's interleaved order, 1 and 16 token-major
    q, k, _ = _qkv(2, 75, 75, 2 * G if G < 16 else G, 2 if G < 16 else 1, 16, seed=G)
    kw = dict(topk=4, **SMALL)
    assert torch.equal(parallel_infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw))


@pytest.mark.parametrize("rows,G", [(128, 3), (256, 16)])
def test_select_tall_scoring_tiles(rows, G, monkeypatch):
    # SELECT_ROWS above the default: more tokens per scoring tile, same blocks
    monkeypatch.setattr(select_mod, "SELECT_ROWS", rows)
    tokens = []
    real = select_mod.make_tiles
    monkeypatch.setattr(select_mod, "make_tiles", lambda seqs, BT, dev: tokens.append(BT) or real(seqs, BT, dev))
    q, k, _ = _qkv(1, 150, 150, 2 * G, 2, 16, seed=rows)
    kw = dict(topk=4, **SMALL)
    assert torch.equal(parallel_infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw))
    assert tokens == [rows // (4 if G == 3 else 16)]


@pytest.mark.parametrize("elems", [1, 3000])
def test_select_in_groups_of_tiles_aligned(elems, monkeypatch):
    # a bounded score buffer scores the tiles in groups: same blocks, and every group's tile_n /
    # tile_i slice starts a multiple of 4 int32 in (16-byte aligned: one compiled variant on the GPU)
    starts, real = [], select_mod._select_scores_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                starts.append((args[4].storage_offset(), args[5].storage_offset()))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(select_mod, "_select_scores_kernel", Spy())
    whole = parallel_mod.select_blocks
    monkeypatch.setattr(parallel_mod, "select_blocks", lambda *a, **kw: whole(*a, chunk_elems=elems, **kw))
    q, k, _ = _qkv(1, 150, 150, 4, 2, 16, seed=9)
    kw = dict(topk=4, **SMALL)
    assert torch.equal(parallel_infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw))
    assert len(starts) > 1 and all(a % 4 == 0 and b % 4 == 0 for a, b in starts), starts


def test_select_ties_broken_by_lowest_block():
    # identical key blocks give exactly equal block scores: both sides must keep the lowest ids
    q, k = _tied_qk(90, 4, 2, 16, seed=5, copies=3)
    kw = dict(topk=4, **SMALL)
    ours, ref = parallel_infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw)
    assert torch.equal(ours, ref)
    assert (ours[0, -1, :, :2] == torch.tensor([0, 1])).all(), "among tied blocks the lowest ids win"


@pytest.mark.parametrize("G", [1, 3, 16])
def test_select_coarse_norm_equals_reference(G):
    # normaliser over the coarse keys (32/16 here, 4× the 8/4 windows): the same sets as the reference
    # with coarse_norm, and for G > 1 not the exact normaliser's sets (else the option would do
    # nothing; at G = 1 a per-row normaliser cannot change a ranking)
    Hkv = 1 if G == 16 else 2
    q, k, _ = _qkv(1, 150, 150, G * Hkv, Hkv, 16, seed=40 + G)
    kw = dict(topk=5, **SMALL)
    coarse = parallel_infllmv2_select(q, k, coarse_norm=True, **kw)
    assert torch.equal(coarse, naive_infllmv2_select(q, k, coarse_norm=True, **kw))
    assert torch.equal(coarse, naive_infllmv2_select(q, k, **kw)) == (G == 1), "coarse_norm vs exact"
    cu = torch.tensor([0, 20, 150])  # the first sequence sees no coarse key for a while
    assert torch.equal(parallel_infllmv2_select(q, k, cu_seqlens=cu, coarse_norm=True, **kw),
                       naive_infllmv2_select(q, k, cu_seqlens=cu, coarse_norm=True, **kw))


def test_coarse_norm_fwd_bwd():
    q, k, v = _qkv(1, 90, 90, 8, 2, 16, seed=44)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, "coarse_norm", topk=3, dense_len=0, coarse_norm=True, **SMALL)


@pytest.mark.parametrize("G", [1, 4])
def test_select_both_topks_on_ties(G, monkeypatch):
    # either top-k (radix kernel; torch.topk plus the tie fix-up) on inputs full of exact ties
    q, k = _tied_qk(130, 2 * G, 2, 16, seed=50 + G, copies=5)
    kw = dict(topk=4, **SMALL)
    for coarse in (False, True):
        for topk in ("radix", "torch"):
            monkeypatch.setattr(select_mod, "FP32_TOPK", topk)
            assert torch.equal(parallel_infllmv2_select(q, k, coarse_norm=coarse, **kw),
                               naive_infllmv2_select(q, k, coarse_norm=coarse, **kw))


@pytest.mark.parametrize("bc,G,pool", [(16, 3, (16, 8, 4)), (16, 16, (16, 8, 4)), (64, 4, (16, 8, 4)),
                                       (16, 4, (16, 16, 8)), (16, 3, (16, 4, 4)), (16, 4, (16, 20, 4))])
def test_select_across_window_chunks(bc, G, pool, monkeypatch):
    # many chunks of `bc` windows: blocks whose windows every token sees (the unmasked loop), the
    # carry of each chunk's last windows into the next chunk's first block, and window shapes with
    # E = 1 (8/4, 16/8), E = 0 (4/4: windows never cross a block) and E = R (20/4). One local
    # block, so the block before the query's own is scored, with windows not all visible yet.
    monkeypatch.setattr(select_mod, "SELECT_BC", bc)
    block, kernel, stride = pool
    Hkv = 1 if G == 16 else 2
    q, k, _ = _qkv(1, 150, 333, G * Hkv, Hkv, 16, seed=bc + G + kernel)
    kw = dict(topk=6, block_size=block, kernel_size=kernel, stride=stride, init_blocks=1, local_blocks=1)
    assert torch.equal(parallel_infllmv2_select(q, k, **kw), naive_infllmv2_select(q, k, **kw))


def test_select_rejects_windows_the_max_pool_cannot_take():
    q, k, _ = _qkv(1, 40, 40, 2, 1, 16)
    with pytest.raises(ValueError, match="multiples of stride"):
        parallel_infllmv2_select(q, k, topk=4, block_size=16, kernel_size=6, stride=4, init_blocks=1, local_blocks=2)


def test_fix_ties_reranks_ambiguous_rows():
    # a top-K that kept the highest ids among blocks tied at the K-th score must come back lowest-id first
    scores = torch.tensor([[5., 3., 3., 3., 1., float("-inf")],
                           [2., 2., 9., -1., 2., 2.],
                           [1., float("-inf"), float("-inf"), 4., float("-inf"), float("-inf")]])
    K = 3
    rev = torch.topk(scores.flip(-1), K, dim=-1)  # ties resolved towards the highest ids
    vals, ids = select_mod.fix_ties(scores, rev.values, scores.shape[-1] - 1 - rev.indices)
    assert torch.equal(select_mod._ascending(vals, ids), torch.tensor([[0, 1, 2], [0, 1, 2], [0, 3, -1]],
                                                                      dtype=torch.int32))


@pytest.mark.parametrize("NB,K", [(1, 1), (7, 3), (50, 8), (300, 96), (1000, 96), (20000, 96)])
def test_radix_topk_equals_ranked_reference(NB, K):
    # rows full of exact ties, −inf (not causal), +inf (forced), −1 (no visible window), fewer
    # selectable blocks than K, more forced ones than K, fewer visible ones than K, scores spread
    # over many orders of magnitude; rows per program > 1 with a partial last program (N = 37)
    g = torch.Generator().manual_seed(NB)
    N = 37
    scores = torch.randint(-2, 5, (N, NB), generator=g).float() / 2
    scores[:N // 2] = torch.rand(N // 2, NB, generator=g)
    scores[torch.rand(N, NB, generator=g) < 0.3] = float("-inf")
    scores[torch.rand(N, NB, generator=g) < 0.05] = float("inf")
    scores[0], scores[1], scores[2, 1:] = float("-inf"), 0., float("-inf")
    scores[3], scores[4, ::2] = float("inf"), float("inf")  # more forced blocks than K
    scores[5], scores[5, :K // 2] = -1., 0.5  # fewer visible scores than K
    scores[6] = torch.exp(torch.randn(NB, generator=g) * 20)  # spread over ~2^60
    want = _ranked_topk(scores, K)
    got = torch.full((N, K + 2), -1, dtype=torch.int32)
    select_mod.radix_topk(scores, got, K)
    assert torch.equal(got[:, :K], want) and (got[:, K:] == -1).all()
    assert torch.equal(select_mod.scores_to_blocks(scores, K), want)


def _ranked_topk(scores, K):
    """The K best of each row by (score desc, id asc), ascending ids, −1 for −inf picks: by a stable sort."""
    NB = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    ids = torch.where(order.values[:, :K] > float("-inf"), order.indices[:, :K], NB + 1)
    want = torch.sort(ids, dim=-1).values
    return torch.where(want > NB, -1, want).to(torch.int32)


def test_select_end_aligned_and_varlen():
    q, k, _ = _qkv(1, 100, 100, 6, 2, 16, seed=7)
    kw = dict(topk=5, **SMALL)
    full = parallel_infllmv2_select(q, k, **kw)
    assert torch.equal(parallel_infllmv2_select(q[:, -9:], k, **kw), full[:, -9:])
    cu = torch.tensor([0, 30, 31, 100])
    assert torch.equal(parallel_infllmv2_select(q, k, cu_seqlens=cu, **kw), naive_infllmv2_select(q, k, cu_seqlens=cu, **kw))


# ---- stage 2: attention forward and backward ----

@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_sparse_fwd_bwd_equals_reference(G):
    Hkv = 1 if G == 16 else 2
    q, k, v = _qkv(2, 70, 70, G * Hkv, Hkv, 16, seed=G)  # 70: not a multiple of the block size
    _compare_fwd_bwd(q, k, v, RTOL_FP32, f"G={G}", topk=3, dense_len=0, **SMALL)


@pytest.fixture
def by_block_everywhere(monkeypatch):
    """The inference forward (forced blocks over union tiles, chosen ones block-major) at any size and
    group, with a spy on the block-major part: the list of chosen entries it was given."""
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MAX_GROUP", 64)
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MIN_KEYS", 0)
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MIN_SPREAD", 0)
    seen = []
    real = by_block_mod.add_chosen
    monkeypatch.setattr(by_block_mod, "add_chosen", lambda q, k, v, idx, *a: seen.append(int((idx >= 0).sum()))
                        or real(q, k, v, idx, *a))
    return seen


@pytest.mark.parametrize("G", [1, 3, 4, 16])
def test_inference_forward_equals_reference(G, by_block_everywhere):
    Hkv = 1 if G == 16 else 2
    q, k, v = _qkv(2, 150, 150, G * Hkv, Hkv, 16, seed=G)  # 150: not a multiple of the block size
    kw = dict(topk=5, dense_len=0, **SMALL)
    with torch.no_grad():
        got = parallel_infllmv2_attn(q, k, v, **kw)
        stage2 = parallel_mod.attend_selected(q, k, v, parallel_infllmv2_select(q, k, **kw), **kw)
    assert by_block_everywhere and by_block_everywhere[0] > 0, "no chosen block went block-major"
    assert_close(got, naive_infllmv2_attn(q, k, v, **kw), rtol=RTOL_FP32, what=f"G={G}")
    assert torch.equal(stage2, got), "stage 2 over the call's own lists differs from the call"


@pytest.mark.parametrize("budget", [1, 4000])
def test_inference_forward_in_chunks_varlen_and_end_aligned(monkeypatch, by_block_everywhere, budget):
    # partial outputs of one row only (budget 1) or of a few rows per chunk, the rows listed a few at
    # a time (passes of 3 rows' entries; the first rows choose nothing past their forced blocks); two
    # init blocks; packed sequences; queries after cached keys
    monkeypatch.setattr(by_block_mod, "PARTIAL_BYTES", budget)
    monkeypatch.setattr(by_block_mod, "PASS_ENTRIES", 3 * 2 * 6)
    kw = dict(block_size=16, kernel_size=8, stride=4, init_blocks=2, local_blocks=2, topk=6, dense_len=0)
    q, k, v = _qkv(1, 170, 170, 6, 2, 16, seed=5)
    cu = torch.tensor([0, 90, 91, 170])
    with torch.no_grad():
        got = parallel_infllmv2_attn(q, k, v, cu_seqlens=cu, **kw)
        tail = parallel_infllmv2_attn(q[:, -37:], k, v, **kw)
    assert_close(got, naive_infllmv2_attn(q, k, v, cu_seqlens=cu, **kw), rtol=RTOL_FP32, what="varlen")
    assert_close(tail, naive_infllmv2_attn(q, k, v, **kw)[:, -37:], rtol=RTOL_FP32, what="end-aligned")
    assert len(by_block_everywhere) == 2 and min(by_block_everywhere) > 0


@pytest.mark.parametrize("keys", [16, 32, 64])
def test_forced_walk_steps_over_whole_blocks(monkeypatch, by_block_everywhere, keys):
    # a local window of 6 blocks walked 1, 2 or 4 blocks a step: steps inside every row's window go
    # unmasked; 8-token tiles straddle blocks once the queries start mid-block (end-aligned after
    # 163 cached keys), so the first rows see keys the last ones must not
    monkeypatch.setattr(parallel_mod, "FORCED_ROWS", 8 * 4)
    monkeypatch.setattr(parallel_mod, "FORCED_KEYS", keys)
    kw = dict(block_size=16, kernel_size=8, stride=4, init_blocks=1, local_blocks=6, topk=9, dense_len=0)
    q, k, v = _qkv(1, 260, 260, 6, 2, 16, seed=11)
    with torch.no_grad():
        got = parallel_infllmv2_attn(q, k, v, **kw)
        tail = parallel_infllmv2_attn(q[:, -97:], k, v, **kw)
    ref = naive_infllmv2_attn(q, k, v, **kw)
    assert_close(got, ref, rtol=RTOL_FP32, what=f"forced step of {keys} keys")
    assert_close(tail, ref[:, -97:], rtol=RTOL_FP32, what=f"forced step of {keys} keys, end-aligned")


def test_inference_forward_takes_any_given_lists(by_block_everywhere):
    # block_indices of 1 to 6 random causal blocks per row: many rows list none of their forced
    # blocks (the union-tile part attends to nothing there), or only forced ones
    q, k, v = _qkv(1, 150, 150, 8, 2, 16, seed=9)
    kw = dict(topk=6, dense_len=0, **SMALL)
    g = torch.Generator().manual_seed(1)
    idx = torch.full((1, 150, 2, 6), -1, dtype=torch.int32)
    for t in range(150):
        for h in range(2):
            n = int(torch.randint(1, min(6, t // 16 + 1) + 1, (1,), generator=g))
            idx[0, t, h, :n] = torch.sort(torch.randperm(t // 16 + 1, generator=g)[:n]).values
    with torch.no_grad():
        got = parallel_infllmv2_attn(q, k, v, block_indices=idx, **kw)
    assert by_block_everywhere and by_block_everywhere[0] > 0
    assert_close(got, naive_infllmv2_attn(q, k, v, block_indices=idx, **kw), rtol=RTOL_FP32, what="given lists")


def test_inference_forward_goes_block_major_only_where_lists_spread(monkeypatch, by_block_everywhere):
    # the same 4 blocks for every token (a tile walks one list) stay on the union tiles; random
    # causal blocks (16-token tiles walk many lists' worth) go block-major; both equal the reference
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MIN_SPREAD", 3.0)
    T, Hkv, K = 1024, 2, 4
    q, k, v = _qkv(1, T, T, 8, Hkv, 16, seed=4)
    kw = dict(topk=K, dense_len=0, **SMALL)
    g = torch.Generator().manual_seed(2)
    own = (torch.arange(T) // 16).view(1, T, 1, 1)  # each token's own block
    alike = torch.arange(K, dtype=torch.int32).expand(1, T, Hkv, K)
    alike = torch.where(alike <= own, alike, -1).int()
    spread = torch.sort((torch.rand(1, T, Hkv, K, generator=g) * (own + 1)).int(), -1).values  # causal
    spread[..., 1:][spread[..., 1:] == spread[..., :-1]] = -1  # each block once
    seqs = layout.make_seqs(1, T, T, None, SMALL["kernel_size"], SMALL["stride"], "cpu")
    assert float(parallel_mod.lists_spread(alike[0], seqs, 4)) == 1.0
    assert float(parallel_mod.lists_spread(spread[0], seqs, 4)) > 3.0
    router = Router()  # one layer's: on the CPU each call reads its own spread at once
    for idx, block_major in ((alike, False), (spread, True)):
        by_block_everywhere.clear()
        with torch.no_grad():
            got = parallel_infllmv2_attn(q, k, v, block_indices=idx, router=router, **kw)
        assert bool(by_block_everywhere) == block_major
        assert_close(got, naive_infllmv2_attn(q, k, v, block_indices=idx, **kw), rtol=RTOL_FP32,
                     what=f"block-major {block_major}")


def test_router_reads_cpu_measurements_at_once_and_copies_start_afresh():
    router = Router()
    assert router.spread_now(lambda: torch.tensor(2.0)) == 2.0
    assert router.spread_now(lambda: torch.tensor(5.0)) == 5.0
    assert copy.deepcopy(router).spread is None  # a model's deepcopy: no CUDA event to copy


def test_inference_forward_only_without_autograd(by_block_everywhere):
    q, k, v = _qkv(1, 100, 100, 4, 2, 16, seed=3)
    kw = dict(topk=5, dense_len=0, **SMALL)
    parallel_infllmv2_attn(q, k, v.requires_grad_(), **kw).sum().backward()
    assert not by_block_everywhere and v.grad is not None


def _random_lists(Nq, Hkv, K, NB, seed=0):
    """Ascending random block lists with −1 anywhere."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randint(0, NB, (Nq, Hkv, K), generator=g), -1).values.int()
    idx[torch.rand(Nq, Hkv, K, generator=g) < 0.3] = -1
    return idx


def _segment_entries(tok, sh, sb, lo, hi, seg):
    """(row, KV head, block) of every entry the segments cover; each segment holds 1 … seg rows."""
    pairs = []
    for h, b, a, z in zip(sh.tolist(), sb.tolist(), lo.tolist(), hi.tolist()):
        assert 0 < z - a <= seg
        pairs += [(int(tok[p]), h, b) for p in range(a, z)]
    return pairs


def test_block_segments_list_every_entry_once():
    # each segment holds rows that picked its block, ≤ seg of them; the segments cover every valid entry once
    Nq, Hkv, K, NB = 40, 2, 6, 9
    idx = _random_lists(Nq, Hkv, K, NB)
    seqs = layout.make_seqs(1, Nq, NB * 16, None, 8, 4, "cpu")
    tok, sh, sn, sb, lo, hi = layout.block_segments(idx, seqs, 16, 0, 5)
    want = [(r, h, b) for r in range(Nq) for h in range(Hkv) for b in idx[r, h].tolist() if b >= 0]
    assert sorted(_segment_entries(tok, sh, sb, lo, hi, 5)) == sorted(want)


def test_chosen_segments_fixed_sizes_and_slots():
    # rows 9..30 of two packed sequences alone: their entries once each, in segments of ≤ seg rows of one
    # (head, sequence, block) with rows ascending; slot points at each entry; the segment count comes
    # from the shapes and `most` alone, the ones past the last empty
    Hkv, K, most = 2, 6, 5
    idx = _random_lists(40, Hkv, K, 5, seed=1)  # blocks of 4 tokens: 5 in the first sequence, 6 in the second
    idx[:, :, most:] = -1
    seqs = layout.make_seqs(1, 40, 40, torch.tensor([0, 17, 40]), 8, 4, "cpu")
    tok, slot, sh, sn, sb, lo, hi = layout.chosen_segments(idx[9:31], seqs, 9, 4, 5, most)
    n_groups = Hkv * 2 * 6
    E = 22 * Hkv * most
    assert sh.numel() == (E + 4) // 5 + min(n_groups, E)
    real = lo < hi
    assert (lo[~real] == 0).all() and (hi[~real] == 0).all() and real.nonzero().max() < real.sum()
    seq_of = lambda r: 0 if r < 17 else 1  # noqa: E731
    for n, a, z in zip(sn[real].tolist(), lo[real].tolist(), hi[real].tolist()):
        rows = tok[a:z].tolist()
        assert rows == sorted(rows) and all(seq_of(r) == n for r in rows)
    want = [(r, h, b) for r in range(9, 31) for h in range(Hkv) for b in idx[r, h].tolist() if b >= 0]
    assert sorted(_segment_entries(tok, sh[real], sb[real], lo[real], hi[real], 5)) == sorted(want)
    assert slot.shape == (22, Hkv, K) and (slot[idx[9:31] < 0] == -1).all()
    for r in range(22):
        for h in range(Hkv):
            for j in range(K):
                if idx[9 + r, h, j] >= 0:
                    p = int(slot[r, h, j])
                    assert int(tok[p]) == 9 + r and int(sb[real][(lo[real] <= p) & (p < hi[real])]) == idx[9 + r, h, j]


# the backward kernels exponentiate masked (future) keys too and discard them: at growth 4 those overflow
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("growth", [1.0, 4.0])
def test_forward_follows_growing_row_maxima(growth):
    # every token sees every block (topk > blocks); block b's keys are scaled by 1 + growth·b, so each
    # step raises a row's max a little (~2^0.5) or by far more than 2^8 (scores up to ~2^150 in fp32):
    # the running max, l and acc must follow it at every step
    q, k, v = _qkv(1, 80, 80, 8, 2, 16, seed=7)
    k = k * (1 + growth * (torch.arange(80) // 16)).view(1, 80, 1, 1)
    q = q * (4.0 if growth > 1 else 0.5)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, f"growth {growth}", topk=6, dense_len=0, **SMALL)


@pytest.mark.parametrize("seg", [1, 5])
def test_dkv_sums_a_block_split_over_many_programs(monkeypatch, seg):
    # the dk/dv kernel takes at most DKV_SEG tokens of a block per program; the programs of one block
    # meet through atomic adds: with 1 or 5 tokens a program every block is split (unevenly at 5)
    monkeypatch.setattr(parallel_mod, "DKV_SEG", seg)
    q, k, v = _qkv(1, 70, 70, 6, 2, 16, seed=11)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, f"seg {seg}", topk=3, dense_len=0, **SMALL)


def test_kernels_walk_the_listed_unions(monkeypatch):
    # the forward reads tile_unions' token masks: with every mask cleared no row attends to anything
    real = parallel_mod.tile_unions
    monkeypatch.setattr(parallel_mod, "tile_unions", lambda *a: (lambda b, m, n: (b, m * 0, n))(*real(*a)))
    q, k, v = _qkv(1, 70, 70, 6, 2, 16, seed=61)
    assert parallel_infllmv2_attn(q, k, v, topk=3, dense_len=0, **SMALL).abs().max() == 0


@pytest.mark.parametrize("spread", [12, 1000])
def test_tile_unions_lists_every_block_once_with_its_tokens(spread):
    # random ascending lists (−1 padded, some empty), 37 rows in tiles of 4 (the last one partial);
    # spread 1000 makes most unions hold all BT·K entries (no padding slot left)
    g = torch.Generator().manual_seed(spread)
    Nq, Hkv, K, BT = 37, 2, 5, 4
    seqs = layout.make_seqs(1, Nq, Nq, None, 8, 4, "cpu")
    idx = torch.full((Nq, Hkv, K), -1, dtype=torch.int32)
    for r in range(Nq):
        for h in range(Hkv):
            n = K if spread == 1000 and r % 7 else int(torch.randint(0, K + 1, (), generator=g))
            idx[r, h, :n] = torch.sort(torch.randperm(spread, generator=g)[:n]).values
    tile_n, tile_i = layout.make_tiles(seqs, BT, "cpu")
    blocks, bits, lengths = parallel_mod.tile_unions(idx, seqs, tile_n, tile_i, BT)
    in_groups = parallel_mod.tile_unions(idx, seqs, tile_n, tile_i, BT, chunk_entries=3 * Hkv * BT * K)  # 4 groups
    assert all(torch.equal(a, b) for a, b in zip((blocks, bits, lengths), in_groups))
    full = 0
    for m in range(tile_n.numel()):
        for h in range(Hkv):
            want = {}
            for t in range(min(BT, Nq - int(tile_i[m]))):
                for b in idx[tile_i[m] + t, h].tolist():
                    if b >= 0:
                        want[b] = want.get(b, 0) | (1 << t)
            row, L = m * Hkv + h, int(lengths[m * Hkv + h])
            assert blocks[row, :L].tolist() == sorted(want) and (blocks[row, L:] == -1).all()
            assert bits[row, :L].tolist() == [want[b] for b in sorted(want)]
            full += L == BT * K
    assert (full > 0) == (spread == 1000)


def test_one_token_tiles_fwd_bwd(monkeypatch):
    # ATTN_TOKENS = 1 at group 16: the per-token loop over K slots (−1 padding included) instead of the union walk
    monkeypatch.setattr(parallel_mod, "ATTN_TOKENS", 1)
    q, k, v = _qkv(1, 50, 50, 16, 1, 16, seed=21)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, "1-token tiles", topk=4, dense_len=0, **SMALL)


def test_dense_below_dense_len_fwd_bwd():
    q, k, v = _qkv(1, 45, 45, 6, 2, 32)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, "dense", topk=3, dense_len=45, **SMALL)
    assert_close(parallel_infllmv2_attn(q, k, v, topk=3, dense_len=45, **SMALL), dense_causal_attn(q, k, v),
                 rtol=RTOL_FP32, what="== dense causal")


def test_every_block_selected_is_dense():
    q, k, v = _qkv(1, 60, 60, 4, 2, 16, seed=3)
    o = parallel_infllmv2_attn(q, k, v, topk=6, dense_len=0, **SMALL)  # 60 tokens = 4 blocks < topk
    assert_close(o, dense_causal_attn(q, k, v), rtol=RTOL_FP32, what="all blocks")
    idx = parallel_infllmv2_select(q, k, topk=6, **SMALL)
    assert (idx[0, -1, :, :4] == torch.arange(4)).all() and (idx[..., 4:] == -1).all()


def test_sequences_shorter_than_a_window():
    # no compressed key exists (T < kernel_size) or only a few: forced blocks and −∞ candidates
    cu = torch.tensor([0, 1, 6, 30])
    q, k, v = _qkv(1, 30, 30, 4, 2, 16, seed=17)
    kw = dict(topk=3, dense_len=0, **SMALL)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, "short varlen", cu_seqlens=cu, **kw)
    assert torch.equal(parallel_infllmv2_select(q, k, cu_seqlens=cu, **kw), naive_infllmv2_select(q, k, cu_seqlens=cu, **kw))


def test_bad_shapes_raise():
    q, k, v = _qkv(1, 20, 20, 6, 4, 16)
    with pytest.raises(ValueError):
        parallel_infllmv2_attn(q, k, v, topk=3, **SMALL)  # 6 query heads over 4 KV heads
    q, k, v = _qkv(1, 20, 20, 4, 2, 16)
    with pytest.raises(ValueError):
        infllmv2_attn(q, k, v, topk=2, **SMALL)  # topk < init + local
    with pytest.raises(ValueError):
        triton_infllmv2_decode(q[:, :2], k, v, torch.tensor([20], dtype=torch.int32), topk=3, **SMALL)


@pytest.mark.parametrize("first", [46, 47])
def test_queries_starting_inside_a_block_fwd_bwd(first):
    # end-aligned queries whose first one sits at block 2's second-to-last (46) or last (47) token:
    # a row chunk of the backward that starts there sees the block's later keys masked or not
    q, k, v = _qkv(1, 70 - first, 70, 4, 1, 16, seed=first)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, f"first query at {first}", topk=3, dense_len=0, **SMALL)


def test_chunked_queries_are_last_rows():
    q, k, v = _qkv(1, 80, 80, 4, 2, 16, seed=11)
    kw = dict(topk=3, dense_len=0, **SMALL)
    full = parallel_infllmv2_attn(q, k, v, **kw)
    _compare_fwd_bwd(q[:, -21:], k, v, RTOL_FP32, "Tq<Tk", **kw)
    assert_close(parallel_infllmv2_attn(q[:, -21:], k, v, **kw), full[:, -21:], rtol=RTOL_FP32, what="last rows")


def test_varlen_equals_per_sequence():
    q, k, v = _qkv(1, 96, 96, 6, 2, 16, seed=13)
    cu = torch.tensor([0, 17, 60, 96])  # the first sequence stays dense (≤ dense_len), the others go sparse
    kw = dict(topk=3, dense_len=20, **SMALL)
    _compare_fwd_bwd(q, k, v, RTOL_FP32, "varlen", cu_seqlens=cu, **kw)
    o = parallel_infllmv2_attn(q, k, v, cu_seqlens=cu, **kw)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert_close(o[:, a:b], parallel_infllmv2_attn(q[:, a:b], k[:, a:b], v[:, a:b], **kw), rtol=RTOL_FP32,
                     what=f"seq {a}:{b}")


def test_fp16_runs_in_the_interpreter():
    q, k, v = _qkv(1, 40, 40, 4, 2, 16, dtype=torch.float16)
    kw = dict(topk=3, dense_len=0, **SMALL)
    o = parallel_infllmv2_attn(q, k, v, **kw)
    ref = naive_infllmv2_attn(q.float(), k.float(), v.float(), block_indices=infllmv2_select(q.float(), k.float(), **kw),
                              **kw)
    assert o.dtype == torch.float16
    assert_close(o, ref, rtol=RTOL_BF16, what="fp16")


# ---- decode ----

@pytest.mark.parametrize("G,dense_len,coarse", [(1, 0, False), (3, 0, False), (16, 0, False), (4, 64, False),
                                                (3, 0, True)])
def test_decode_equals_last_row_of_prefill(G, dense_len, coarse, monkeypatch):
    monkeypatch.setattr(decode_mod, "DECODE_CH", 16)  # several stats splits even at this size
    Hkv = 1 if G == 16 else 2
    B, Tmax = 2, 120
    q, k, v = _qkv(B, Tmax, Tmax, G * Hkv, Hkv, 16, seed=G)
    kw = dict(topk=5, dense_len=dense_len, coarse_norm=coarse, **SMALL)  # 2 chosen blocks besides the forced 3
    kc = torch.zeros(B, (Tmax - 8) // 4 + 1, Hkv, 16)
    # coarse: rows whose selection the coarse normaliser changes (checked below), else one sparse, one short
    lens = torch.tensor([110, 99] if coarse else [100, 57], dtype=torch.int32)
    for L in range(1, Tmax + 1):  # the cache grows one token at a time
        update_compressed_cache(k, kc, torch.full((B,), L, dtype=torch.int32), kernel_size=8, stride=4)
    assert_close(kc, compress_k(k, 8, 4), rtol=1e-6, what="incremental compressed keys")
    qd = torch.stack([q[b, L - 1] for b, L in enumerate(lens.tolist())])[:, None]
    o = triton_infllmv2_decode(qd, k, v, lens, kc, **kw)
    for b, L in enumerate(lens.tolist()):
        last = parallel_infllmv2_attn(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], **kw)[:, -1:]
        assert_close(o[b:b + 1], last, rtol=RTOL_FP32, what=f"decode b={b}")
        if coarse:
            sel = [naive_infllmv2_select(q[b:b + 1, :L], k[b:b + 1, :L], **dict(kw, coarse_norm=c))[0, -1] for c in (0, 1)]
            assert not torch.equal(*sel), f"b={b}: the coarse normaliser must matter at this row"


def test_decode_reads_fp8_caches():
    # an fp8 K/V cache: the kernel widens what it reads, so it equals the reference on the widened caches
    B, Tmax, G, Hkv = 2, 120, 3, 2
    q, k, v = _qkv(B, Tmax, Tmax, G * Hkv, Hkv, 16, seed=9)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    assert not torch.equal(k8.float(), k)
    lens = torch.tensor([100, 57], dtype=torch.int32)
    kw = dict(topk=5, dense_len=0, **SMALL)
    kc = compress_k(k8, 8, 4)  # the compressed keys of the stored values, as the cache keeps them
    o = triton_infllmv2_decode(q[:, -1:], k8, v8, lens, kc, **kw)
    assert_close(o, naive_infllmv2_decode(q[:, -1:], k8.float(), v8.float(), lens, **kw), rtol=RTOL_FP32,
                 what="fp8-cache decode")


@pytest.mark.parametrize("R,n,K,chunk", [(2, 300, 7, 16), (2, 96, 96, 1024), (1, 17, 5, 8), (1, 2048, 96, 1024)])
def test_decode_topk_rounds_keep_the_largest_keys(R, n, K, chunk, monkeypatch):
    monkeypatch.setattr(decode_mod, "DECODE_TOPK_CHUNK", chunk)  # (2, 300, 7, 16): five rounds
    g = torch.Generator().manual_seed(n)
    # unique within a row, as block keys are (score in the high bits, block id in the low ones)
    keys = ((torch.randint(-(1 << 30), 1 << 30, (R, n), generator=g) << 20) | torch.arange(n)).contiguous()
    keys[:, ::5] = -(1 << 63)  # and many "not causal" keys, the smallest int64, as the score kernel writes
    got = decode_mod._topk_keys(keys, K)
    assert got.shape == (R, K)
    expected = torch.topk(keys, K, dim=-1).values
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


def test_public_dispatch_reaches_triton(monkeypatch):
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    calls = []
    real = parallel_mod.InfLLMv2Function.apply
    monkeypatch.setattr(parallel_mod.InfLLMv2Function, "apply", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv(1, 40, 40, 4, 2, 16)
    kw = dict(topk=3, dense_len=0, **SMALL)
    assert_close(infllmv2_attn(q, k, v, **kw), naive_infllmv2_attn(q, k, v, **kw), rtol=RTOL_FP32, what="dispatch")
    assert calls, "infllmv2_attn did not reach the Triton path"
    lens = torch.tensor([40], dtype=torch.int32)
    assert_close(infllmv2_decode(q[:, -1:], k, v, lens, **kw), naive_infllmv2_attn(q, k, v, **kw)[:, -1:],
                 rtol=RTOL_FP32, what="decode dispatch")


# ---- GPU: compiled kernels at real sizes ----

@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("GPU tests compile the kernels: run them as TRITON_INTERPRET=0 pytest -m gpu")


def gpu(fn):
    return pytest.mark.gpu(pytest.mark.usefixtures("cuda")(fn))


@gpu
@pytest.mark.parametrize("Hq,Hkv,d,dtype", [(32, 2, 128, torch.bfloat16), (12, 4, 64, torch.float16),
                                            (8, 8, 128, torch.float32)])
def test_gpu_fwd_bwd(Hq, Hkv, d, dtype):
    T = 5000
    kw = dict(topk=16, local_blocks=4, dense_len=1024)
    q, k, v = _qkv(1, T, T, Hq, Hkv, d, dtype=dtype, device="cuda")
    idx = infllmv2_select(q, k, **kw)
    ref_idx = naive_infllmv2_select(q.float(), k.float(), **kw)
    agree = (torch.sort(idx, -1).values == torch.sort(ref_idx, -1).values).all(-1).float().mean().item()
    assert agree > 0.97, f"selection agrees with the fp32 reference on {agree:.3f} of rows"
    do = torch.randn_like(q)
    ours = _grads(parallel_infllmv2_attn, q, k, v, do, **kw)
    ref = _grads(naive_infllmv2_attn, q.float(), k.float(), v.float(), do.float(), block_indices=idx, **kw)
    for a, b, n in zip(ours, ref, ("o", "dq", "dk", "dv")):
        assert_close(a, b, rtol=RTOL_BF16, what=f"{dtype} {n}")


@gpu
@pytest.mark.parametrize("Hq,Hkv", [(32, 8), (32, 2), (12, 4)])
def test_gpu_inference_forward(Hq, Hkv, by_block_everywhere):
    T = 5000
    kw = dict(topk=16, local_blocks=4, dense_len=1024)
    q, k, v = _qkv(1, T, T, Hq, Hkv, 128, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        idx = infllmv2_select(q, k, **kw)
        got = parallel_infllmv2_attn(q, k, v, block_indices=idx, **kw)
        ref = naive_infllmv2_attn(q.float(), k.float(), v.float(), block_indices=idx, **kw)
    assert by_block_everywhere and by_block_everywhere[0] > 0
    assert_close(got, ref, rtol=RTOL_BF16, what=f"inference forward Hq={Hq} Hkv={Hkv}")


@gpu
@pytest.mark.parametrize("min_spread", [0, float("inf")], ids=["block-major", "union"])
def test_gpu_inference_forward_never_waits(monkeypatch, min_spread):
    # a chunked prefill queues the whole sparse call (selection, the lists' spread, forced blocks,
    # the block-major CSR, partials, merge; or the union lists and walk) without waiting for the
    # GPU: every size comes from the shapes, and the layer's router reads the spread once it has
    # arrived (its first call waits)
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MIN_KEYS", 0)
    monkeypatch.setattr(parallel_mod, "BY_BLOCK_MIN_SPREAD", min_spread)
    router = Router()
    kw = dict(topk=16, local_blocks=4, dense_len=1024, router=router)
    q, k, v = _qkv(1, 6000, 6000, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    q = q[:, -2000:].contiguous()
    with torch.no_grad():
        want = parallel_infllmv2_attn(q, k, v, **kw)  # compiles outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = parallel_infllmv2_attn(q, k, v, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert router.spread is not None and torch.equal(got, want)


@gpu
def test_gpu_router_routes_by_the_newest_measurement_arrived():
    router = Router()
    on_gpu = lambda x: lambda: torch.tensor(x, device="cuda")  # noqa: E731
    assert router.spread_now(on_gpu(3.0)) == 3.0  # the first call waits for its own
    assert router.spread_now(on_gpu(7.0)) == 3.0  # sent, not waited for
    torch.cuda.synchronize()
    assert router.spread_now(on_gpu(1.0)) == 7.0  # arrived: 1.0 is on its way
    torch.cuda.synchronize()
    assert router.spread_now(on_gpu(5.0)) == 1.0


@gpu
def test_gpu_varlen_and_decode_graph():
    kw = dict(topk=16, local_blocks=4, dense_len=1500)
    q, k, v = _qkv(1, 6000, 6000, 16, 2, 128, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 1000, 4100, 6000], device="cuda")
    o = infllmv2_attn(q, k, v, cu_seqlens=cu, **kw)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert_close(o[:, a:b], infllmv2_attn(q[:, a:b], k[:, a:b], v[:, a:b], **kw), rtol=1e-3, what="varlen")
    # decode captured in a CUDA graph, replayed as the cache grows, == the prefill's last rows
    Tmax = 6000
    kc = compress_k(k, 32, 16).to(k.dtype).contiguous()
    lens = torch.tensor([4000], dtype=torch.int32, device="cuda")
    qd = q[:, 3999:4000].clone()
    triton_infllmv2_decode(qd, k, v, lens, kc, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        od = triton_infllmv2_decode(qd, k, v, lens, kc, **kw)
    for L in (4000, 4500, 5999):
        lens.fill_(L)
        qd.copy_(q[:, L - 1:L])
        graph.replay()
        ref = infllmv2_attn(q[:, :L], k[:, :L], v[:, :L], **kw)[:, -1:]
        assert_close(od, ref, rtol=1e-2, what=f"graph decode L={L}")
    assert Tmax == k.shape[1]


@gpu
def test_gpu_decode_coarse_norm_at_head_dim_128():
    # the coarse normaliser's decode pass loads 4 compressed tiles per block: it must fit the card
    # at d = 128 (it once asked for 260 KB of shared memory) and select the prefill's blocks
    kw = dict(topk=16, local_blocks=4, dense_len=1500, coarse_norm=True)
    q, k, v = _qkv(1, 6000, 6000, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    kc = compress_k(k, 32, 16).to(k.dtype).contiguous()
    for L in (3000, 5999):
        lens = torch.tensor([L], dtype=torch.int32, device="cuda")
        od = triton_infllmv2_decode(q[:, L - 1:L], k, v, lens, kc, **kw)
        ref = infllmv2_attn(q[:, :L], k[:, :L], v[:, :L], **kw)[:, -1:]
        assert_close(od, ref, rtol=1e-2, what=f"coarse-normaliser decode L={L}")


@gpu
def test_gpu_decode_fp8_cache():
    # an fp8 K/V cache on the GPU (incremental compressed keys included) == decode on the widened caches
    kw = dict(topk=16, local_blocks=4, dense_len=1500)
    q, k, v = _qkv(1, 6000, 6000, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    kc = torch.zeros(1, (6000 - 32) // 16 + 1, 8, 128, device="cuda")
    for L in range(1, 6001):
        update_compressed_cache(k8, kc, torch.tensor([L], dtype=torch.int32, device="cuda"))
    assert_close(kc, compress_k(k8, 32, 16), rtol=1e-6, what="compressed keys of an fp8 cache")
    lens = torch.tensor([5999], dtype=torch.int32, device="cuda")
    o = triton_infllmv2_decode(q[:, 5998:5999], k8, v8, lens, kc, **kw)
    ref = triton_infllmv2_decode(q[:, 5998:5999], k8.to(k.dtype), v8.to(k.dtype), lens, kc, **kw)
    assert_close(o, ref, rtol=1e-3, what="fp8-cache decode")


@gpu
def test_gpu_64bit_offsets():
    # q holds more than 2^31 elements: the last rows must still be right
    T, Hq, Hkv, d = 540_000, 32, 2, 128
    kw = dict(topk=8, local_blocks=2)
    q, k, v = _qkv(1, T, T, Hq, Hkv, d, dtype=torch.bfloat16, device="cuda")
    assert q.numel() > 2 ** 31
    with torch.no_grad():
        o = infllmv2_attn(q, k, v, **kw)
        tail = 8
        idx = infllmv2_select(q[:, -tail:], k, **kw)
        ref = naive_infllmv2_attn(q[:, -tail:].float(), k.float(), v.float(), block_indices=idx, **kw)
    assert_close(o[:, -tail:], ref, rtol=RTOL_BF16, what="tail rows past 2^31 elements")


@gpu
@pytest.mark.parametrize("NB", [2048, 16384])
def test_gpu_radix_topk(NB):
    # the compiled kernel at 128K's and 1M's row lengths, with ties quantised in, vs a stable sort
    g = torch.Generator(device="cuda").manual_seed(NB)
    scores = (torch.rand(3000, NB, device="cuda", generator=g) * 64).floor()
    scores[:, :NB // 4] = float("-inf")
    scores[:, -33:] = float("inf")
    scores[:1000] = torch.rand(1000, NB, device="cuda", generator=g)
    got = torch.full((3000, 96), -1, dtype=torch.int32, device="cuda")
    select_mod.radix_topk(scores, got, 96)
    assert torch.equal(got, _ranked_topk(scores, 96))
