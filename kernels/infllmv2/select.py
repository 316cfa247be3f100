"""InfLLM-V2 stage 1 in Triton: compressed-key scores, group sum, max-pool into blocks, forced blocks.

One program scores a tile of BT query tokens × the G query heads of one KV head (BT·GP rows, GP =
next power of two ≥ G; padded head rows are masked). Pass 1 runs an online softmax over the
causally visible compressed keys to get each row's exact normaliser (m, l) (or over the coarse
keys with coarse_norm: README, step 5); pass 2 walks the key
blocks in chunks of BNB and, for each of the P compressed keys overlapping a block, recomputes the
row scores, normalises them, sums the G heads of each token in registers (per-head scores never
reach memory) and keeps the running max: the max-pool. The forced/causal rules are applied in
the same pass and each (token, block) score is written as one int64 sort key

    key = orderable_int32(score) << 32 | (2^32 − 1 − block)

so that the top K keys are exactly "score descending, block id ascending" (README, ties).
Blocks after the query's own get the smallest int64, which marks them as never selectable.
With SELECT_KEYS = "fp32" (the default) the scores themselves are written and the exact radix
top-k (_radix_topk_kernel; or torch.topk + fix_ties, FP32_TOPK) picks the blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index
from salaconvert.kernels.infllmv2._interp import rcumsum, rmax, rmin, rsum, sort_rows

from salaconvert.kernels.infllmv2 import layout
from salaconvert.kernels.infllmv2.layout import Seqs, make_tiles, next_pow2

fix_interpreter_index()
NEVER = -(2 ** 63)  # key of a block after the query's own


@triton.jit
def _tile_queries(q, tile_n, tile_i, q_start, kc_start, seq_Tq, seq_Tk, seq_Tc, i_tile, i_h, stride_qt,
                  G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """The tile's query rows [BM, D] and where they sit (rows are token-major, GP heads per token)."""
    BM: tl.constexpr = BT * GP
    n = tl.load(tile_n + i_tile)
    i0 = tl.load(tile_i + i_tile)
    qs = tl.load(q_start + n)
    kcs = tl.load(kc_start + n)
    Tq = tl.load(seq_Tq + n)
    Tk = tl.load(seq_Tk + n)
    Tc = tl.load(seq_Tc + n)
    o_r = tl.arange(0, BM)
    r_t, r_g = o_r // GP, o_r % GP
    tok = i0 + r_t
    m_row = (tok < Tq) & (r_g < G)
    o_d = tl.arange(0, D)
    p_q = q + (qs + tok).to(tl.int64)[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.)
    return b_q, m_row, Tk - Tq + tok, i0, qs, kcs, Tq, Tk, Tc


@triton.jit
def _normaliser(b_q, kc, kcs, Tc, i_h, pos, pos_hi, stride_kct, scale_log2, BM: tl.constexpr, D: tl.constexpr,
                BC: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr):
    """Pass 1: each row's softmax max and 1/sum over its causally visible keys kc (window KS, stride
    ST): the fine compressed keys (exact) or the coarse ones (coarse_norm)."""
    o_d = tl.arange(0, D)
    # window j is visible at position t once j*ST + KS - 1 <= t
    n_vis = tl.minimum(Tc, tl.where(pos_hi >= KS - 1, (tl.maximum(pos_hi, KS - 1) - KS + 1) // ST + 1, 0))
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.full([BM], 0, tl.float32)
    for j0 in range(0, n_vis, BC):
        o_j = j0 + tl.arange(0, BC)
        p_k = kc + (kcs + o_j).to(tl.int64)[:, None] * stride_kct + i_h * D + o_d[None, :]
        b_k = tl.load(p_k, mask=(o_j < Tc)[:, None], other=0.).to(b_q.dtype)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        vis = (o_j[None, :] < Tc) & (o_j[None, :] * ST + KS - 1 <= pos[:, None])
        b_s = tl.where(vis, b_s, float("-inf"))
        m_new = tl.maximum(b_m, rmax(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0., m_new)
        b_l = b_l * tl.exp2(b_m - m_safe) + rsum(tl.exp2(b_s - m_safe[:, None]), 1)
        b_m = m_new
    m_safe = tl.where(b_m == float("-inf"), 0., b_m)
    inv_l = tl.where(b_l > 0, 1. / tl.where(b_l > 0, b_l, 1.), 0.)
    return m_safe, inv_l


@triton.jit
def _chunk_scores(b_q, kc, kcs, Tc, i_h, b0, m_safe, inv_l, pos, m_row, pos_t, qb_t, qb_hi, stride_kct, scale_log2,
                  BT: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BNB: tl.constexpr, P: tl.constexpr,
                  BS: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Pass 2 for blocks [b0, b0 + BNB): fp32 block scores [BT, BNB] (forced +inf, no visible window
    −inf) and which blocks are causal candidates."""
    o_d = tl.arange(0, D)
    o_b = b0 + tl.arange(0, BNB)
    best = tl.full([BT, BNB], float("-inf"), tl.float32)
    if b0 <= qb_hi:
        num = o_b * BS - KS
        lo = tl.where(num < 0, 0, tl.maximum(num, 0) // ST + 1)
        hi = (o_b * BS + BS + ST - 1) // ST - 1
        for p in tl.static_range(P):
            # the p-th compressed window overlapping each block: the max-pool, one offset at a time
            o_j = lo + p
            ok_j = (o_j <= hi) & (o_j < Tc)
            p_k = kc + (kcs + o_j).to(tl.int64)[:, None] * stride_kct + i_h * D + o_d[None, :]
            b_k = tl.load(p_k, mask=ok_j[:, None], other=0.).to(b_q.dtype)
            b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
            vis = ok_j[None, :] & (o_j[None, :] * ST + KS - 1 <= pos[:, None]) & m_row[:, None]
            b_p = tl.where(vis, tl.exp2(b_s - m_safe[:, None]) * inv_l[:, None], 0.)
            b_sum = rsum(tl.reshape(b_p, [BT, GP, BNB]), 1)  # the group's heads of each token
            vis_t = ok_j[None, :] & (o_j[None, :] * ST + KS - 1 <= pos_t[:, None])
            best = tl.where(vis_t, tl.maximum(best, b_sum), best)
    causal = o_b[None, :] <= qb_t[:, None]
    forced = (o_b[None, :] < INIT) | (o_b[None, :] > qb_t[:, None] - LOCAL)
    return tl.where(forced, float("inf"), best), causal


@triton.jit
def orderable_int32(x):
    """fp32 -> int32 with the same order (−0 just below +0)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _int64_keys(score, causal, b0, BNB: tl.constexpr):
    """orderable_int32(score) << 32 | (2^32 − 1 − block); int64 min where not causal."""
    o_b = b0 + tl.arange(0, BNB)
    key = (orderable_int32(score).to(tl.int64) << 32) | (4294967295 - o_b[None, :].to(tl.int64))
    return tl.where(causal, key, -9223372036854775807 - 1)


@triton.jit
def _select_keys_kernel(q, kc, kn, keys, tile_n, tile_i, q_start, kc_start, kn_start, seq_Tq, seq_Tk, seq_Tc,
                        seq_Tn, scale_log2, stride_qt, stride_kct, stride_knt, stride_keyt, NBMAX, key_row0,
                        G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
                        BNB: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr,
                        NKS: tl.constexpr, NST: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                        FP32: tl.constexpr):
    """Writes every (token, block) sort key; a top-k picks the blocks (keys_to_blocks /
    scores_to_blocks / radix_topk). kn: the normaliser's keys (window NKS, stride NST), kc itself when exact."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    b_q, m_row, pos, i0, qs, kcs, Tq, Tk, Tc = _tile_queries(q, tile_n, tile_i, q_start, kc_start, seq_Tq, seq_Tk,
                                                             seq_Tc, i_tile, i_h, stride_qt, G, GP, BT, D)
    n = tl.load(tile_n + i_tile)
    pos_hi = Tk - Tq + tl.minimum(i0 + BT, Tq) - 1
    m_safe, inv_l = _normaliser(b_q, kn, tl.load(kn_start + n), tl.load(seq_Tn + n), i_h, pos, pos_hi, stride_knt,
                                scale_log2, BT * GP, D, BC, NKS, NST)
    m_row = m_row & (inv_l > 0)  # coarse_norm: a row that sees no coarse key scores 0 (naive.py)
    tok_t = i0 + tl.arange(0, BT)
    pos_t = Tk - Tq + tok_t
    for b0 in range(0, NBMAX, BNB):
        score, causal = _chunk_scores(b_q, kc, kcs, Tc, i_h, b0, m_safe, inv_l, pos, m_row, pos_t, pos_t // BS,
                                      pos_hi // BS, stride_kct, scale_log2, BT, GP, D, BNB, P, BS, KS, ST, INIT, LOCAL)
        if FP32:
            # visible scores are >= 0: a candidate with no visible window becomes -1, a non-causal block -inf
            key = tl.where(causal, tl.where(score == float("-inf"), -1., score), float("-inf"))
        else:
            key = _int64_keys(score, causal, b0, BNB)
        o_b = b0 + tl.arange(0, BNB)
        p_o = keys + (qs + tok_t - key_row0).to(tl.int64)[:, None] * stride_keyt + i_h * NBMAX + o_b[None, :]
        tl.store(p_o, key, mask=(tok_t < Tq)[:, None] & (o_b[None, :] < NBMAX))


@triton.jit
def _select_topk_kernel(q, kc, kn, out, tile_n, tile_i, q_start, kc_start, kn_start, seq_Tq, seq_Tk, seq_Tc, seq_Tn,
                        scale_log2, stride_qt, stride_kct, stride_knt, stride_ot, NBMAX, TOPK,
                        G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BC: tl.constexpr,
                        KP: tl.constexpr, LOG_KP: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, KS: tl.constexpr,
                        ST: tl.constexpr, NKS: tl.constexpr, NST: tl.constexpr, INIT: tl.constexpr,
                        LOCAL: tl.constexpr):
    """Fused top-k: a running best-KP list of keys per token, merged with each chunk of KP blocks
    by a bitonic sort of the 2·KP candidates; only causal chunks are visited, nothing but the final
    block ids reaches memory."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    b_q, m_row, pos, i0, qs, kcs, Tq, Tk, Tc = _tile_queries(q, tile_n, tile_i, q_start, kc_start, seq_Tq, seq_Tk,
                                                             seq_Tc, i_tile, i_h, stride_qt, G, GP, BT, D)
    n = tl.load(tile_n + i_tile)
    pos_hi = Tk - Tq + tl.minimum(i0 + BT, Tq) - 1
    m_safe, inv_l = _normaliser(b_q, kn, tl.load(kn_start + n), tl.load(seq_Tn + n), i_h, pos, pos_hi, stride_knt,
                                scale_log2, BT * GP, D, BC, NKS, NST)
    m_row = m_row & (inv_l > 0)
    tok_t = i0 + tl.arange(0, BT)
    pos_t = Tk - Tq + tok_t
    qb_hi = pos_hi // BS
    top = tl.full([BT, KP], -9223372036854775807 - 1, tl.int64)
    half = tl.arange(0, 2)[None, :, None]
    for b0 in range(0, NBMAX, KP):
        if b0 <= qb_hi:
            score, causal = _chunk_scores(b_q, kc, kcs, Tc, i_h, b0, m_safe, inv_l, pos, m_row, pos_t, pos_t // BS,
                                          qb_hi, stride_kct, scale_log2, BT, GP, D, KP, P, BS, KS, ST, INIT, LOCAL)
            key = _int64_keys(score, causal, b0, KP)
            both = sort_rows(tl.reshape(tl.join(top, key), [BT, 2 * KP]), LOG_KP + 1, 1)
            top = rsum(tl.reshape(both, [BT, 2, KP]) * (1 - half), 1)  # the larger half, still sorted
    o_c = tl.arange(0, KP)[None, :]
    ids = (4294967295 - (top & 4294967295)).to(tl.int32)
    ids = tl.where((top == -9223372036854775807 - 1) | (o_c >= TOPK), 1073741824, ids)
    ids = sort_rows(ids, LOG_KP, 0)
    ids = tl.where(ids == 1073741824, -1, ids)
    p_o = out + (qs + tok_t).to(tl.int64)[:, None] * stride_ot + i_h * TOPK + o_c
    tl.store(p_o, ids, mask=(tok_t < Tq)[:, None] & (o_c < TOPK))


@triton.jit
def _radix_topk_kernel(scores, out, n_rows, NB, stride_s, stride_o, K,
                       R: tl.constexpr, BLOCK: tl.constexpr):
    """Exact top-K of R rows of fp32 block scores, ranked (score desc, block id asc), written as
    ascending block ids (−inf entries never written; the caller pre-fills −1).

    Scores map to int32 keys in the same order; a binary search over the key range finds each row's
    K-th largest key thr in 32 counting passes over the row, held in registers. Every block with a
    key above thr is taken, then the lowest-id blocks equal to thr until K are taken; a running
    count of taken blocks gives each one its output slot, so the ids come out ascending.
    """
    rows = tl.program_id(0) * R + tl.arange(0, R)
    o_b = tl.arange(0, BLOCK)
    m = (rows < n_rows)[:, None] & (o_b[None, :] < NB)
    s = tl.load(scores + rows.to(tl.int64)[:, None] * stride_s + o_b[None, :], mask=m, other=float("-inf"))
    key = orderable_int32(s)
    lo = rmin(key, 1).to(tl.int64)  # invariant: count(key >= lo) >= K, or lo is the row minimum
    hi = rmax(key, 1).to(tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = rsum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1) >= K
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    thr = lo.to(tl.int32)[:, None]
    above = key > thr
    tied = key == thr
    need = K - rsum(above.to(tl.int32), 1)
    take = (above | (tied & (rcumsum(tied.to(tl.int32), 1) <= need[:, None]))) & (s > float("-inf")) & m
    slot = rcumsum(take.to(tl.int32), 1) - 1
    tl.store(out + rows.to(tl.int64)[:, None] * stride_o + slot, o_b[None, :], mask=take)


def _pool_width(block_size: int, kernel_size: int, stride: int) -> int:
    """Largest number of compressed windows that overlap one block (5 for 64/32/16)."""
    best = 1
    for b in range(0, 64):
        num = b * block_size - kernel_size
        lo = 0 if num < 0 else num // stride + 1
        hi = (b * block_size + block_size + stride - 1) // stride - 1
        best = max(best, hi - lo + 1)
    return best


# Knobs (README, "Knobs"; benchmarks/infllmv2.py --sweep measures the alternatives).
# The fused top-k is exact but slower on an H100 (248 ms vs 69 ms for stage 1 at 128K, run 1 in
# benchmarks/notes-infllmv2.md: the bitonic merge of 2·128 int64 keys per chunk costs more than
# writing the keys and calling torch.topk), so the key path is the default; tests keep both right.
FUSED_TOPK = False
SELECT_BC = 64  # compressed keys per step of the normaliser pass (128: −4% in one run, not adopted)
# Query rows (tokens × padded group heads) per scoring tile. Every tile streams all its visible
# compressed keys through both passes, so the keys' traffic falls as the tile grows (64 rows:
# 64 FLOP per byte of keys).
SELECT_ROWS = 64
SELECT_WARPS = 4  # num_warps of the selection launch
SELECT_STAGES = 3  # num_stages of the selection launch (Triton's default)
# Sort keys of the key path: "int64" (score bits | reversed block id, one torch.topk, exact) or
# "fp32" (the scores alone, half the bytes: torch.topk on fp32, then rows whose K-th score is tied
# with an unselected block are re-ranked by a stable sort; exact too, see scores_to_blocks).
# H100 run 4, 128K: selection 70.7 → 61.2 ms (G = 16), 157.7 → 138.9 ms (G = 4), same blocks on every row.
SELECT_KEYS = "fp32"
# Top-K of the fp32 keys: "radix" (_radix_topk_kernel, exact in one pass) or "torch" (torch.topk,
# then fix_ties re-ranks the rows where a tie at the K-th score makes its answer ambiguous).
FP32_TOPK = "radix"


def select_blocks(q: torch.Tensor, kc: torch.Tensor, seqs: Seqs, *, block_size: int, topk: int,
                  init_blocks: int, local_blocks: int, kernel_size: int, stride: int, scale: float,
                  kn: torch.Tensor | None = None, seqs_n: Seqs | None = None,
                  fused: bool | None = None, chunk_elems: int = 1 << 28) -> torch.Tensor:
    """Selected blocks of every query row. q [Nq, Hq, d], kc [sum Tc, Hkv, d] -> int32 [Nq, Hkv, topk].

    Rows ascending, −1 padded; block ids relative to each sequence's first key. kn / seqs_n: the
    coarse keys of coarse_norm (4× kernel and stride) and their sequence table; None = exact
    normaliser over kc. fused (default FUSED_TOPK) keeps the top-k in registers; otherwise the sort
    keys (SELECT_KEYS) are materialised for at most `chunk_elems` (row, head, block) triples at a
    time and reduced by a top-k (FP32_TOPK).
    """
    Nq, Hq, D = q.shape
    Hkv = kc.shape[1]
    G = Hq // Hkv
    GP = next_pow2(G)
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
    P = _pool_width(block_size, kernel_size, stride)
    sl2 = scale * 1.4426950408889634
    common = dict(G=G, GP=GP, BT=BT, D=D, BC=SELECT_BC, P=P, BS=block_size, KS=kernel_size, ST=stride,
                  NKS=NKS, NST=NST, INIT=init_blocks, LOCAL=local_blocks, num_warps=SELECT_WARPS,
                  num_stages=SELECT_STAGES)
    seq_args = (seqs.q_start, seqs.kc_start, seqs_n.kc_start, seqs.Tq, seqs.Tk, seqs.Tc, seqs_n.Tc)
    if FUSED_TOPK if fused is None else fused:
        KP = max(16, next_pow2(topk))
        out = layout.empty((Nq, Hkv, topk), torch.int32, q.device)
        _select_topk_kernel[(tile_n.numel(), Hkv)](
            q, kc, kn, out, tile_n, tile_i, *seq_args, sl2, q.stride(0), kc.stride(0), kn.stride(0), out.stride(0),
            NBMAX, topk, KP=KP, LOG_KP=KP.bit_length() - 1, **common)
        return out
    K = min(topk, NBMAX)
    fp32 = SELECT_KEYS == "fp32"
    out = torch.full((Nq, Hkv, topk), -1, dtype=torch.int32, device=q.device)
    # whole tiles in groups, so the key buffer stays bounded
    tiles_per_chunk = max(1, chunk_elems // max(1, BT * Hkv * NBMAX))
    BNB = 64 if NBMAX >= 64 else max(16, next_pow2(NBMAX))
    tile_row = (seqs.q_start.to(tile_n.device)[tile_n.long()] + tile_i).tolist()
    n_tiles = tile_n.numel()
    for c0 in range(0, n_tiles, tiles_per_chunk):
        c1 = min(n_tiles, c0 + tiles_per_chunk)
        r0 = tile_row[c0]
        r1 = tile_row[c1] if c1 < n_tiles else Nq
        keys = layout.empty((r1 - r0, Hkv, NBMAX), torch.float32 if fp32 else torch.int64, q.device)
        _select_keys_kernel[(c1 - c0, Hkv)](
            q, kc, kn, keys, tile_n[c0:c1], tile_i[c0:c1], *seq_args, sl2, q.stride(0), kc.stride(0), kn.stride(0),
            keys.stride(0), NBMAX, r0, BNB=BNB, FP32=fp32, **common)
        if not fp32:
            out[r0:r1, :, :K] = keys_to_blocks(keys, K)
        elif FP32_TOPK == "radix":
            radix_topk(keys.view(-1, NBMAX), out[r0:r1].view(-1, topk), K)
        else:
            out[r0:r1, :, :K] = scores_to_blocks(keys, K)
    return out


def radix_topk(scores: torch.Tensor, out: torch.Tensor, K: int) -> None:
    """Top-K of each row of fp32 scores [N, NB] (−inf = not causal) by (score desc, id asc), written
    into the first slots of out [N, ≥K] (int32, pre-filled with −1) as ascending block ids."""
    N, NB = scores.shape
    BLOCK = max(16, next_pow2(NB))
    R = max(1, min(16, 4096 // BLOCK))
    _radix_topk_kernel[(triton.cdiv(N, R),)](scores, out, N, NB, scores.stride(0), out.stride(0), K,
                                            R=R, BLOCK=BLOCK, num_warps=4 if BLOCK <= 4096 else 8)


def keys_to_blocks(keys: torch.Tensor, K: int) -> torch.Tensor:
    """Top-K of int64 sort keys [..., NB] -> int32 block ids [..., K], ascending, −1 where unselectable."""
    vals = torch.topk(keys, K, dim=-1, sorted=False).values
    ids = (4294967295 - (vals & 4294967295)).to(torch.int32)
    ids = torch.where(vals == NEVER, torch.full_like(ids, 2 ** 30), ids)
    ids = torch.sort(ids, dim=-1).values
    return torch.where(ids == 2 ** 30, torch.full_like(ids, -1), ids)


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
