"""InfLLM-V2 stage 1 in Triton: compressed-key scores, group sum, max-pool into blocks, forced blocks.

One program scores a tile of BT query tokens × the G query heads of one KV head (BT·GP rows, GP =
next power of two ≥ G; padded head rows get an infinite offset, so p = 0). Pass 1 runs an online softmax
over the causally visible compressed keys to get each row's exact normaliser (or over the coarse
keys with coarse_norm: README, step 5). Pass 2 walks the compressed keys once more, BC at a time:
recomputes the row scores, normalises them, sums the G heads of each token in registers (per-head
scores never reach memory), and max-pools the windows into blocks. With R = block / stride windows
starting in each block and E = kernel / stride − 1 windows of the previous block reaching into it,

    score(block b) = max(windows bR … bR + R − 1, windows bR − E … bR − 1),

so each chunk of BC windows gives BC / R whole blocks, and the previous block's last E windows come
from the neighbour in the chunk (or the carry from the chunk before). In both passes only the
chunks at the diagonal build the causal masks, and pass 2 stops at the tile's last non-local
block (local blocks are forced). Forced/causal rules are applied in the same pass
and each (token, block) score is written in fp32 (forced +inf, no visible window −1, after the
query's own block −inf); an exact top-k (_radix_topk_kernel, or torch.topk + fix_ties) picks
the blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index
from salaconvert.kernels.infllmv2._interp import rcumsum, rmax, rmin, rsum

from salaconvert.kernels.infllmv2 import layout
from salaconvert.kernels.infllmv2.layout import Seqs, make_tiles, next_pow2, pool_shape

fix_interpreter_index()


@triton.jit
def _row_heads(BM: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr):
    """Each row's token (within the tile) and head (within the group): token-major (token = row //
    GP) when HALF is 0, else interleaved (row_order)."""
    o_r = tl.arange(0, BM)
    if HALF == 0:
        r_t, r_g = o_r // GP, o_r % GP
    else:
        in_slab = o_r % 16
        r_t, r_g = o_r // 16 * (8 // HALF) + in_slab % 8 // HALF, in_slab // 8 * HALF + in_slab % HALF
    return r_t, r_g


@triton.jit
def _group_sum(b_p, BT: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr, HALF: tl.constexpr):
    """[BT·GP, BC] -> [BT, BC]: the sum over each token's heads, in _row_heads' order."""
    if HALF == 0:
        b_w = rsum(tl.reshape(b_p, [BT, GP, BC]), 1)
    else:
        b_w = tl.reshape(rsum(rsum(tl.reshape(b_p, [BT * GP // 16, 2, 8 // HALF, HALF, BC]), 3), 1), [BT, BC])
    return b_w


@triton.jit
def _tile_queries(q, tile_n, tile_i, q_start, kc_start, seq_Tq, seq_Tk, seq_Tc, i_tile, i_h, stride_qt,
                  G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """The tile's query rows [BM, D] and where they sit (rows in _row_heads' order)."""
    BM: tl.constexpr = BT * GP
    n = tl.load(tile_n + i_tile)
    i0 = tl.load(tile_i + i_tile)
    qs = tl.load(q_start + n)
    kcs = tl.load(kc_start + n)
    Tq = tl.load(seq_Tq + n)
    Tk = tl.load(seq_Tk + n)
    Tc = tl.load(seq_Tc + n)
    r_t, r_g = _row_heads(BM, GP, HALF)
    tok = i0 + r_t
    m_row = (tok < Tq) & (r_g < G)
    o_d = tl.arange(0, D)
    p_q = q + (qs + tok).to(tl.int64)[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.)
    return b_q, m_row, Tk - Tq + tok, i0, qs, kcs, Tq, Tk, Tc


@triton.jit
def _n_visible(pos, Tc, KS: tl.constexpr, ST: tl.constexpr):
    """How many compressed keys are visible at position pos: window j once j*ST + KS − 1 <= pos."""
    return tl.minimum(Tc, tl.where(pos >= KS - 1, (tl.maximum(pos, KS - 1) - KS + 1) // ST + 1, 0))


@triton.jit
def _key_tile(kc, kcs, Tc, i_h, j0, stride_kct, BC: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """Compressed keys [j0, j0 + BC) of KV head i_h: [BC, D]."""
    o_j = j0 + tl.arange(0, BC)
    o_d = tl.arange(0, D)
    p_k = kc + (kcs + o_j).to(tl.int64)[:, None] * stride_kct + i_h * D + o_d[None, :]
    if MASKED:
        return tl.load(p_k, mask=(o_j < Tc)[:, None], other=0.)
    return tl.load(p_k)


@triton.jit
def _softmax_step(b_q, kc, kcs, Tc, i_h, j0, b_m, b_l, pos, stride_kct, scale_log2, D: tl.constexpr,
                  BC: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, MASKED: tl.constexpr):
    """One chunk of the online softmax; b_m is the running max of the raw (unscaled) scores, so the
    scale folds into the exponent's FMA."""
    b_s = tl.dot(b_q, tl.trans(_key_tile(kc, kcs, Tc, i_h, j0, stride_kct, BC, D, MASKED).to(b_q.dtype)))
    if MASKED:
        o_j = j0 + tl.arange(0, BC)
        b_s = tl.where((o_j[None, :] < Tc) & (o_j[None, :] * ST + KS - 1 <= pos[:, None]), b_s, float("-inf"))
    m_new = tl.maximum(b_m, rmax(b_s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0., m_new) * scale_log2
    b_l = b_l * tl.exp2(b_m * scale_log2 - m_safe) + rsum(tl.exp2(b_s * scale_log2 - m_safe[:, None]), 1)
    return m_new, b_l


@triton.jit
def _normaliser(b_q, kc, kcs, Tc, i_h, pos, pos_lo, pos_hi, m_row, stride_kct, scale_log2, BM: tl.constexpr,
                D: tl.constexpr, BC: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr):
    """Pass 1: each row's log2-domain softmax offset over its causally visible keys kc (window KS,
    stride ST: the fine compressed keys, or the coarse ones with coarse_norm), m + log2(sum), so
    that p = exp2(s·scale_log2 − offset); +inf for rows that see nothing or are padding (p = 0)."""
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.full([BM], 0, tl.float32)
    n_all = _n_visible(pos_lo, Tc, KS, ST) // BC * BC  # chunks every row sees whole: no mask
    for j0 in range(0, n_all, BC):
        b_m, b_l = _softmax_step(b_q, kc, kcs, Tc, i_h, j0, b_m, b_l, pos, stride_kct, scale_log2, D, BC, KS, ST,
                                 False)
    for j0 in range(n_all, _n_visible(pos_hi, Tc, KS, ST), BC):
        b_m, b_l = _softmax_step(b_q, kc, kcs, Tc, i_h, j0, b_m, b_l, pos, stride_kct, scale_log2, D, BC, KS, ST,
                                 True)
    ok = m_row & (b_l > 0)
    return tl.where(ok, tl.where(ok, b_m, 0.) * scale_log2 + tl.log2(tl.where(ok, b_l, 1.)), float("inf"))


@triton.jit
def _chunk_blocks(b_q, kc, kcs, Tc, i_h, c, offset, pos, pos_t, carry, stride_kct, scale_log2,
                  BT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, R: tl.constexpr,
                  E: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr):
    """Pass 2 for the windows [c·BC, (c + 1)·BC): max-pooled group-summed probabilities of the
    blocks they start, [BT, BC // R] (−inf where no window is visible to the token), and the new
    carry: each token's max over the chunk's last E windows (they reach into the next block)."""
    NBC: tl.constexpr = BC // R
    j0 = c * BC
    b_s = tl.dot(b_q, tl.trans(_key_tile(kc, kcs, Tc, i_h, j0, stride_kct, BC, D, MASKED).to(b_q.dtype)))
    b_p = tl.exp2(b_s * scale_log2 - offset[:, None])
    o_j = j0 + tl.arange(0, BC)
    if MASKED:
        b_p = tl.where(o_j[None, :] * ST + KS - 1 <= pos[:, None], b_p, 0.)
    b_w = _group_sum(b_p, BT, GP, BC, HALF)  # the group's heads of each token
    if MASKED:
        b_w = tl.where(o_j[None, :] * ST + KS - 1 <= pos_t[:, None], b_w, float("-inf"))
    b_w = tl.reshape(b_w, [BT, NBC, R])
    own = rmax(b_w, 2)
    o_r = tl.arange(0, R)[None, None, :]
    tail = rmax(tl.where(o_r >= R - E, b_w, float("-inf")), 2)  # [BT, NBC]
    # the previous block's tail, one block to the right (a gather: the same shift by a broadcast
    # compare-and-max was 1.7x the loop's instructions); block 0 of the chunk takes the carry
    o_b = tl.arange(0, NBC)
    prev = tl.gather(tail, tl.broadcast_to(tl.maximum(o_b - 1, 0)[None, :], (BT, NBC)), 1)
    prev = tl.where(o_b[None, :] == 0, carry[:, None], prev)
    return tl.maximum(own, prev), rmax(tl.where(o_b[None, :] == NBC - 1, tail, float("-inf")), 1)


@triton.jit
def _store_scores(scores, best, b0, qb_t, row_t, m_t, stride_st, i_h, NBMAX, NBC: tl.constexpr,
                  INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Blocks [b0, b0 + NBC) of each token: forced +inf, −1 where no window is visible, −inf after
    the token's own block (never selectable), else the score."""
    o_b = b0 + tl.arange(0, NBC)
    causal = o_b[None, :] <= qb_t[:, None]
    forced = (o_b[None, :] < INIT) | (o_b[None, :] > qb_t[:, None] - LOCAL)
    score = tl.where(forced, float("inf"), tl.where(best == float("-inf"), -1., best))
    score = tl.where(causal, score, float("-inf"))
    p_o = scores + row_t.to(tl.int64)[:, None] * stride_st + i_h * NBMAX + o_b[None, :]
    tl.store(p_o, score, mask=m_t[:, None] & (o_b[None, :] < NBMAX))


@triton.jit
def _select_scores_kernel(q, kc, kn, scores, tile_n, tile_i, q_start, kc_start, kn_start, seq_Tq, seq_Tk, seq_Tc,
                          seq_Tn, scale_log2, stride_qt, stride_kct, stride_knt, stride_st, NBMAX, row0,
                          G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
                          R: tl.constexpr, E: tl.constexpr, BS: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr,
                          NKS: tl.constexpr, NST: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                          HALF: tl.constexpr):
    """Writes every (token, block) score of the tile; a top-k picks the blocks (radix_topk /
    scores_to_blocks). kn: the normaliser's keys (window NKS, stride NST), kc itself when exact."""
    NBC: tl.constexpr = BC // R
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    b_q, m_row, pos, i0, qs, kcs, Tq, Tk, Tc = _tile_queries(q, tile_n, tile_i, q_start, kc_start, seq_Tq, seq_Tk,
                                                             seq_Tc, i_tile, i_h, stride_qt, G, GP, BT, D, HALF)
    n = tl.load(tile_n + i_tile)
    pos_lo = Tk - Tq + i0
    pos_hi = Tk - Tq + tl.minimum(i0 + BT, Tq) - 1
    offset = _normaliser(b_q, kn, tl.load(kn_start + n), tl.load(seq_Tn + n), i_h, pos, pos_lo, pos_hi, m_row,
                         stride_knt, scale_log2, BT * GP, D, BC, NKS, NST)
    tok_t = i0 + tl.arange(0, BT)
    pos_t = Tk - Tq + tok_t
    qb_t = pos_t // BS
    row_t = qs + tok_t - row0
    m_t = tok_t < Tq
    carry = tl.full([BT], float("-inf"), tl.float32)
    # only blocks up to the last token's last non-local one need a score (later ones are forced
    # or after the token's own block): chunks [0, n_scored), the first n_all of them unmasked
    last = pos_hi // BS - LOCAL
    n_scored = tl.where(last >= INIT, last // NBC + 1, 0)
    n_all = tl.minimum(_n_visible(pos_lo, Tc, KS, ST) // BC, n_scored)
    for c in range(0, n_all):
        best, carry = _chunk_blocks(b_q, kc, kcs, Tc, i_h, c, offset, pos, pos_t, carry, stride_kct, scale_log2,
                                    BT, GP, D, BC, R, E, KS, ST, HALF, False)
        _store_scores(scores, best, c * NBC, qb_t, row_t, m_t, stride_st, i_h, NBMAX, NBC, INIT, LOCAL)
    for c in range(n_all, n_scored):
        best, carry = _chunk_blocks(b_q, kc, kcs, Tc, i_h, c, offset, pos, pos_t, carry, stride_kct, scale_log2,
                                    BT, GP, D, BC, R, E, KS, ST, HALF, True)
        _store_scores(scores, best, c * NBC, qb_t, row_t, m_t, stride_st, i_h, NBMAX, NBC, INIT, LOCAL)
    unscored = tl.full([BT, NBC], float("-inf"), tl.float32)
    for c in range(n_scored, tl.cdiv(NBMAX, NBC)):
        _store_scores(scores, unscored, c * NBC, qb_t, row_t, m_t, stride_st, i_h, NBMAX, NBC, INIT, LOCAL)


@triton.jit
def orderable_int32(x):
    """fp32 -> int32 with the same order (−0 just below +0)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _radix_topk_kernel(scores, out, n_rows, NB, stride_s, stride_o, K,
                       R: tl.constexpr, BLOCK: tl.constexpr):
    """Exact top-K of R rows of fp32 block scores (never NaN), ranked (score desc, block id asc),
    written as ascending block ids (−inf entries never written; the caller pre-fills −1).

    Scores map to int32 keys in the same order; a binary search over the key range finds a threshold
    thr with at least K keys at or above it and at most K above it, in counting passes over the row,
    held in registers: at most 32, fewer where a pass counts exactly K keys (thr is then that pass's
    midpoint). Every block with a key above thr is taken, then the lowest-id blocks equal to thr
    until K are taken; a running count of taken blocks gives each one its output slot, so the ids
    come out ascending.
    """
    rows = tl.program_id(0) * R + tl.arange(0, R)
    o_b = tl.arange(0, BLOCK)
    m = (rows < n_rows)[:, None] & (o_b[None, :] < NB)
    s = tl.load(scores + rows.to(tl.int64)[:, None] * stride_s + o_b[None, :], mask=m, other=float("-inf"))
    key = orderable_int32(s)
    # invariant: count(key >= lo) >= K and count(key > hi) <= K, so once hi <= lo, thr = lo splits
    # the row: every key above it is in the top K, and K − (their count) of the keys equal to it.
    # A pass that counts exactly K keys from mid up ends the row's search (lo = mid, hi = mid − 1).
    # The search starts inside the scores that can decide it: above the −1s (no visible window) and
    # −infs (masked) when K scores ≥ 0 exist, below the +infs (forced) when they are at most K.
    # Their keys are ~2^31 apart while the visible scores' span ~2^24: about 7 passes fewer.
    # Fewer than K finite scores means some are −inf, the smallest key (no NaN); more than K forced
    # ones means the largest key is +inf's.
    big = 2147483647
    vis = s >= 0.
    fin = s > float("-inf")
    forced = s == float("inf")
    n_vis_forced = rsum(vis.to(tl.int32) + (forced.to(tl.int32) << 16), 1)  # BLOCK ≤ RADIX_MAX_BLOCKS
    lo = tl.where(n_vis_forced & 0xFFFF >= K, rmin(tl.where(vis, key, big), 1),
                  tl.where(rsum(fin.to(tl.int32), 1) >= K, rmin(tl.where(fin, key, big), 1), -2139095041))
    hi = tl.where(n_vis_forced >> 16 <= K, rmax(tl.where(forced, -big - 1, key), 1), 2139095040)
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    while tl.max(hi - lo, 0) > big - 1:  # brackets spanning the −1s and the visible scores
        mid = (lo + hi + 1) >> 1
        n = rsum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1)
        lo = tl.where(n >= K, mid, lo)
        hi = tl.where(n > K, hi, mid - 1)
    # then offsets from the bracket's foot: u = clamp(key, lo, hi) − lo and m = mid − lo lie in
    # [0, 2^31), so u − m cannot overflow and its sign bit is [key < mid]: a pass costs two
    # instructions a key instead of ~four
    base = lo.to(tl.int32)
    u = tl.minimum(tl.maximum(key, base[:, None]), hi.to(tl.int32)[:, None]) - base[:, None]
    lo_u = tl.zeros_like(base)
    hi_u = tl.maximum(hi - lo, 0).to(tl.int32)
    while tl.max(hi_u - lo_u, 0) > 0:
        mid = lo_u + ((hi_u - lo_u + 1) >> 1)
        n = BLOCK + rsum((u - mid[:, None]) >> 31, 1)
        lo_u = tl.where(n >= K, mid, lo_u)
        hi_u = tl.where(n > K, hi_u, mid - 1)
    thr = (base + lo_u)[:, None]
    above = key > thr
    tied = (key == thr) & fin
    need = (K - rsum(above.to(tl.int32), 1))[:, None]
    # one running count of both (above ≤ K in the high half, ties in the low one): the taken ones
    # before a block are the above ones plus the first `need` ties
    run = rcumsum(tied.to(tl.int32) + (above.to(tl.int32) << 16), 1)
    n_tied = run & 0xFFFF
    take = above | (tied & (n_tied <= need))
    slot = (run >> 16) + tl.minimum(n_tied, need) - 1
    tl.store(out + rows.to(tl.int64)[:, None] * stride_o + slot, o_b[None, :], mask=take)


# Knobs (README, "Knobs"; benchmarks/infllmv2.py --sweep measures the alternatives).
SELECT_BC = 64  # compressed keys per step of both passes (a multiple of block / stride)
# Query rows (tokens × padded group heads) per scoring tile. Every tile streams all its visible
# compressed keys through both passes, so the keys' traffic falls as the tile grows (64 rows:
# 64 FLOP per byte of keys); run 8 found 64 rows × 4 warps fastest all the same.
SELECT_ROWS = 64
SELECT_WARPS = 4  # num_warps of the selection launch
SELECT_STAGES = 2  # num_stages of the selection launch (run 17, 128K: 36.4 vs 39.4 ms with 3, G = 4 63.8 vs 66.2)
# Top-K of the scores: "radix" (_radix_topk_kernel, exact in one pass) or "torch" (torch.topk,
# then fix_ties re-ranks the rows where a tie at the K-th score makes its answer ambiguous).
FP32_TOPK = "radix"
# The radix top-k's program: rows of at most RADIX_ELEMS scores in all, RADIX_PER_THREAD scores
# per thread (so its warps), at most RADIX_WARPS_MAX warps. Run 21 (H100, results/radix-topk-*):
# one row and 4 warps beat 4096 scores over up to 8 warps (128K 5.61 vs 7.40 ms, 512K 90.6 vs
# 130.6; equal at 256K); more warps per row only add cross-warp reductions to each of 32 passes.
RADIX_ELEMS = 1024
RADIX_PER_THREAD = 8
RADIX_WARPS_MAX = 4
# The longest row it takes: its counts share an int32 by halves (1M tokens in 64-token blocks);
# longer rows go to torch.topk + fix_ties.
RADIX_MAX_BLOCKS = 1 << 14


def row_order(GP: int, BM: int) -> int:
    """HALF of the scoring tile's interleaved row order, or 0 for token-major rows (token = row //
    GP). In 16-row slabs, row 8·hi + HALF·j + lo holds head HALF·hi + lo of the slab's token j
    (GP = 2·HALF). A thread of the wgmma accumulator holds rows a and a + 8 of its warp's slab and
    lane bit 2 steps a, so a token's heads meet in registers and log2(HALF) shuffle rounds
    (token-major: log2(GP) rounds)."""
    return GP // 2 if GP in (2, 4, 8) and BM % 16 == 0 else 0


def select_blocks(q: torch.Tensor, kc: torch.Tensor, seqs: Seqs, *, block_size: int, topk: int,
                  init_blocks: int, local_blocks: int, kernel_size: int, stride: int, scale: float,
                  kn: torch.Tensor | None = None, seqs_n: Seqs | None = None,
                  chunk_elems: int = 1 << 28) -> torch.Tensor:
    """Selected blocks of every query row. q [Nq, Hq, d], kc [sum Tc, Hkv, d] -> int32 [Nq, Hkv, topk].

    Rows ascending, −1 padded; block ids relative to each sequence's first key. kn / seqs_n: the
    coarse keys of coarse_norm (4× kernel and stride) and their sequence table; None = exact
    normaliser over kc. The block scores are materialised for at most `chunk_elems` (row, head,
    block) triples at a time and reduced by a top-k (FP32_TOPK).
    """
    Nq, Hq, D = q.shape
    Hkv = kc.shape[1]
    G = Hq // Hkv
    GP = next_pow2(G)
    R, E = pool_shape(block_size, kernel_size, stride)
    BC = max(SELECT_BC, 16, R)
    NBMAX = max((t + block_size - 1) // block_size for t in seqs.Tk_list)
    BT = max(1, min(SELECT_ROWS // GP, next_pow2(max(seqs.Tq_list))))
    BT = max(BT, 16 // GP if GP < 16 else 1)  # keep BT·GP ≥ 16 for tl.dot
    tile_n, tile_i = make_tiles(seqs, BT, q.device)
    if kc.shape[0] == 0:
        kc = kc.new_zeros(1, Hkv, D)
    if kn is None:
        kn, seqs_n, NKS, NST = kc, seqs, kernel_size, stride
    else:
        NKS, NST = 4 * kernel_size, 4 * stride
        if kn.shape[0] == 0:
            kn = kn.new_zeros(1, Hkv, D)
    sl2 = scale * 1.4426950408889634
    common = dict(G=G, GP=GP, BT=BT, D=D, BC=BC, R=R, E=E, BS=block_size, KS=kernel_size, ST=stride,
                  NKS=NKS, NST=NST, INIT=init_blocks, LOCAL=local_blocks, HALF=row_order(GP, BT * GP),
                  num_warps=SELECT_WARPS, num_stages=SELECT_STAGES)
    seq_args = (seqs.q_start, seqs.kc_start, seqs_n.kc_start, seqs.Tq, seqs.Tk, seqs.Tc, seqs_n.Tc)
    K = min(topk, NBMAX)
    out = torch.full((Nq, Hkv, topk), -1, dtype=torch.int32, device=q.device)
    # whole tiles in groups, so the score buffer stays bounded; a multiple of 4 tiles, so each group's
    # int32 tile_n / tile_i slice starts 16-byte aligned like the whole tables: Triton compiles a
    # variant per pointer alignment, and an unaligned group compiled one inside a timed 256K prefill
    tiles_per_chunk = max(4, chunk_elems // max(1, BT * Hkv * NBMAX) // 4 * 4)
    tile_row = [qs + i for qs, t in zip(seqs.q_start_list, seqs.Tq_list) for i in range(0, t, BT)]
    n_tiles = tile_n.numel()
    for c0 in range(0, n_tiles, tiles_per_chunk):
        c1 = min(n_tiles, c0 + tiles_per_chunk)
        r0 = tile_row[c0]
        r1 = tile_row[c1] if c1 < n_tiles else Nq
        scores = layout.empty((r1 - r0, Hkv, NBMAX), torch.float32, q.device)
        _select_scores_kernel[(c1 - c0, Hkv)](
            q, kc, kn, scores, tile_n[c0:c1], tile_i[c0:c1], *seq_args, sl2, q.stride(0), kc.stride(0),
            kn.stride(0), scores.stride(0), NBMAX, r0, **common)
        if FP32_TOPK == "radix":
            radix_topk(scores.view(-1, NBMAX), out[r0:r1].view(-1, topk), K)
        else:
            out[r0:r1, :, :K] = scores_to_blocks(scores, K)
    return out


def radix_topk(scores: torch.Tensor, out: torch.Tensor, K: int) -> None:
    """Top-K of each row of fp32 scores [N, NB] (−inf = not causal) by (score desc, id asc), written
    into the first slots of out [N, ≥K] (int32, pre-filled with −1) as ascending block ids."""
    N, NB = scores.shape
    if NB > RADIX_MAX_BLOCKS:
        out[:, :K] = scores_to_blocks(scores, K)
        return
    BLOCK = max(16, next_pow2(NB))
    R = max(1, min(16, RADIX_ELEMS // BLOCK))
    warps = max(1, min(RADIX_WARPS_MAX, R * BLOCK // (32 * RADIX_PER_THREAD)))
    _radix_topk_kernel[(triton.cdiv(N, R),)](scores, out, N, NB, scores.stride(0), out.stride(0), K,
                                            R=R, BLOCK=BLOCK, num_warps=warps)


def scores_to_blocks(scores: torch.Tensor, K: int) -> torch.Tensor:
    """Top-K of fp32 block scores [..., NB] (−inf = not causal) by (score desc, id asc) -> int32
    block ids [..., K], ascending, −1 where unselectable. Exact: see fix_ties."""
    vals, ids = torch.topk(scores, K, dim=-1, sorted=False)
    return _ascending(*fix_ties(scores, vals, ids))


def fix_ties(scores: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor):
    """Make an unordered top-K (vals, ids) of `scores` the one ranked by (score desc, id asc).

    Every block above the K-th value v is in any top-K, and so are all blocks equal to v when the
    top-K holds them all; only rows where blocks equal to v (v > −inf) were left out are
    ambiguous: those rows (counted on the device, then gathered) are re-ranked by a stable sort.
    −inf entries become −1 anyway, so which of them were picked does not matter.
    """
    K = vals.shape[-1]
    flat_s, flat_v, flat_i = scores.reshape(-1, scores.shape[-1]), vals.reshape(-1, K), ids.reshape(-1, K)
    thr = flat_v.min(-1, keepdim=True).values
    picked_eq = (flat_v == thr).sum(-1)
    all_eq = (flat_s == thr).sum(-1)
    bad = torch.nonzero((all_eq > picked_eq) & (thr[:, 0] > float("-inf"))).flatten()
    if bad.numel():
        flat_v, flat_i = flat_v.clone(), flat_i.clone()
        order = torch.sort(flat_s[bad], dim=-1, descending=True, stable=True).indices[:, :K]
        flat_i[bad] = order
        flat_v[bad] = torch.gather(flat_s[bad], 1, order)
    return flat_v.view(vals.shape), flat_i.view(ids.shape)


def _ascending(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    ids = torch.where(vals == float("-inf"), 2 ** 30, ids.to(torch.int32))
    ids = torch.sort(ids, dim=-1).values
    return torch.where(ids == 2 ** 30, -1, ids)
