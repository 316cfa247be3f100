"""InfLLM-V2 stage 2 in Triton: exact softmax attention over each query's selected blocks, fwd + bwd.

Legend: Nq/Nk flattened query/key rows, Hq/Hkv heads, G = Hq // Hkv, GP = next_pow2(G), D head
dim, BS block size, BT tokens per tile, BM = BT·GP rows per tile, K selected blocks per token.

Forward / dq: one program = BT consecutive query tokens × the G heads of one KV head. Every token
has its own ascending block list; the program walks the UNION of its tokens' lists and masks the
rows of tokens that did not pick the current block, so K/V are loaded once per tile and the dots
are BM rows tall (tokens of one 64-token block share their 33 forced blocks, so the union stays
close to K when neighbours choose alike). The unions are listed on the host side beforehand
(tile_unions: one sort per tile row, with a token bitmask per block), so the kernels run a plain
`for` loop over the list, which Triton software-pipelines; an in-kernel k-way merge of the
tokens' lists (a `while` loop, not pipelined) was 18–25% slower in every measured case (H100 run
9, benchmarks/notes-infllmv2.md). Sequences at or under dense_len walk every causal block instead.
dk/dv: one program = one key block × a segment of ≤ SEG query tokens that selected it (a CSR built
on the host by sorting (head, block, token) triples); no row is wasted, partial sums of a block
split over several segments meet through fp32 atomic adds. A forward without autograd on long
sequences at small groups takes each row's chosen blocks block-major instead (by_block.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index
from salaconvert.kernels.infllmv2._interp import rmax, rsum

from salaconvert.kernels.infllmv2 import by_block, layout
from salaconvert.kernels.infllmv2.by_block import segment, segment_rows
from salaconvert.kernels.infllmv2.layout import (Seqs, compress_k_flat, make_seqs, make_tiles, next_pow2, pool_shape,
                                                with_windows)
from salaconvert.kernels.infllmv2.naive import _cfg, coarse_pool
from salaconvert.kernels.infllmv2.route import Router
from salaconvert.kernels.infllmv2.select import select_blocks

fix_interpreter_index()
LOG2E = 1.4426950408889634


@triton.jit
def _kv_base(k, v, ks, i_h, stride_kt, BS: tl.constexpr, D: tl.constexpr):
    """The K/V pointers of a (sequence, KV head) and the offsets of one block's [BS, D] rows from its
    first, both computed once per program: a step then adds one scalar offset (cheaper per step
    than forming every row's 64-bit offset from the block id)."""
    base = ks.to(tl.int64) * stride_kt + i_h * D
    kv_off = tl.arange(0, BS)[:, None] * stride_kt + tl.arange(0, D)[None, :]
    return k + base, v + base, kv_off


@triton.jit
def _load_kv(k_h, v_h, kv_off, blk, Tk, stride_kt, BS: tl.constexpr, N: tl.constexpr):
    """N keys from block blk's first on: their positions and K, V rows (rows outside [0, Tk) load zeros)."""
    o_k = blk * BS + tl.arange(0, N)
    step = blk.to(tl.int64) * BS * stride_kt
    m_k = ((o_k >= 0) & (o_k < Tk))[:, None]
    b_k = tl.load(k_h + step + kv_off, mask=m_k, other=0.)
    b_v = tl.load(v_h + step + kv_off, mask=m_k, other=0.)
    return o_k, b_k, b_v


@triton.jit
def _attend_fwd(b_q, b_m, b_l, b_acc, b_k, b_v, o_k, pos, rowsel, scale_log2):
    b_s = tl.dot(b_q, tl.trans(b_k))  # raw scores: the scale folds into the exponent's FMA below
    ok = rowsel[:, None] & (o_k[None, :] <= pos[:, None])
    return _softmax_step(tl.where(ok, b_s, float("-inf")), b_m, b_l, b_acc, b_v, scale_log2)


@triton.jit
def _softmax_step(b_s, b_m, b_l, b_acc, b_v, scale_log2):
    """The online softmax over one step's raw scores b_s (−inf: not attended)."""
    # a rescale at every block: deciding it lazily (only when some row's max grew past a threshold,
    # as FlashAttention-4 does per warp) needs a reduction over the whole tile here, which cost as
    # much as the [BM × D] products it saves (H100 run 27: the eager form as fast or up to 9% faster)
    m_new = tl.maximum(b_m, rmax(b_s, 1) * scale_log2)
    m_use = tl.where(m_new == float("-inf"), 0., m_new)
    alpha = tl.exp2(b_m - m_use)
    b_p = tl.exp2(b_s * scale_log2 - m_use[:, None])
    b_l = b_l * alpha + rsum(b_p, 1)
    b_acc = b_acc * alpha[:, None]
    b_acc += tl.dot(b_p.to(b_v.dtype), b_v)
    return m_new, b_l, b_acc


@triton.jit
def _attend_dq(b_q, b_do, b_lse, b_delta, b_dq, b_k, b_v, o_k, pos, rowsel, scale_log2):
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
    ok = rowsel[:, None] & (o_k[None, :] <= pos[:, None])
    b_p = tl.where(ok, tl.exp2(b_s - b_lse[:, None]), 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    return b_dq


@triton.jit
def _walk(idx, u_blk, u_bits, u_len, U, qs, i0, i_tile, i_h, Tq, Tk, dense_len, stride_it,
          BT: tl.constexpr, BS: tl.constexpr, K: tl.constexpr):
    """Where a (tile, KV head) reads its block ids and token masks, and how many blocks it walks:
    every causal block when the sequence is at or under dense_len, else its K slots (one-token
    tiles) or its union (tile_unions). One loop serves all three: a second loop in the kernel makes
    ptxas serialise every wgmma (C7515)."""
    if BT == 1:
        p_blk = idx + (qs + i0).to(tl.int64) * stride_it + i_h * K
        p_bits = u_bits
        n_sparse = K
    else:
        row = i_tile.to(tl.int64) * tl.num_programs(1) + i_h
        p_blk = u_blk + row * U
        p_bits = u_bits + row * U
        n_sparse = tl.load(u_len + row)
    n_dense = (Tk - Tq + tl.minimum(i0 + BT, Tq) - 1) // BS + 1
    return p_blk, p_bits, tl.where(Tk <= dense_len, n_dense, n_sparse)


@triton.jit
def _step(p_blk, p_bits, u, sparse, r_t, m_row, BT: tl.constexpr):
    """Block u of the walk and the rows that attend to it (padding slots, −1, select no row)."""
    blk = tl.where(sparse, tl.load(p_blk + u, mask=sparse, other=0), u)
    if BT == 1:
        rowsel = m_row & (blk >= 0)
    else:
        bits = tl.load(p_bits + u, mask=sparse, other=-1)
        rowsel = (((bits >> r_t) & 1) != 0) & m_row
    return blk, rowsel


@triton.jit
def _fwd_kernel(q, k, v, o, lse, idx, tile_n, tile_i, q_start, k_start, seq_Tq, seq_Tk,
                u_blk, u_bits, u_len, U, scale_log2, dense_len, stride_qt, stride_kt, stride_it, Hq,
                G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                K: tl.constexpr, FORCED: tl.constexpr = False, INIT: tl.constexpr = 0, LOCAL: tl.constexpr = 0,
                W: tl.constexpr = 0):
    """o and lse (log2 units) of a tile's rows over their walk (_walk). FORCED: the walk is each
    row's forced blocks alone, from positions (blocks 0 … INIT − 1 and the LOCAL up to the row's
    own, as the selection forces them), W keys a step, without lists; a row that attends to
    nothing gets lse −inf."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    BM: tl.constexpr = BT * GP
    n = tl.load(tile_n + i_tile)
    i0 = tl.load(tile_i + i_tile)
    qs = tl.load(q_start + n)
    ks = tl.load(k_start + n)
    Tq = tl.load(seq_Tq + n)
    Tk = tl.load(seq_Tk + n)

    o_r = tl.arange(0, BM)
    r_t, r_g = o_r // GP, o_r % GP
    tok = i0 + r_t
    m_row = (tok < Tq) & (r_g < G)
    pos = Tk - Tq + tok
    o_d = tl.arange(0, D)
    p_q = q + (qs + tok).to(tl.int64)[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None], other=0.)

    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.full([BM], 0, tl.float32)
    b_acc = tl.full([BM, D], 0, tl.float32)
    if FORCED:  # the init keys, then the local ones from the tile's first row's window to its last row
        pos_first = Tk - Tq + i0
        qb_last = (Tk - Tq + tl.minimum(i0 + BT, Tq) - 1) // BS
        n_init = tl.minimum(INIT, qb_last + 1) * BS
        lo_local = tl.maximum(pos_first // BS - LOCAL + 1, INIT) * BS
        lo_last = (qb_last - LOCAL + 1) * BS  # keys from here on lie in every row's window
        lo_row = (pos // BS - LOCAL + 1) * BS
        n_init_steps = tl.cdiv(n_init, W)
        n_blk = n_init_steps + tl.cdiv(tl.maximum((qb_last + 1) * BS - lo_local, 0), W)
        k_h, v_h, kv_off = _kv_base(k, v, ks, i_h, stride_kt, W, D)
    else:
        p_blk, p_bits, n_blk = _walk(idx, u_blk, u_bits, u_len, U, qs, i0, i_tile, i_h, Tq, Tk, dense_len, stride_it,
                                     BT, BS, K)
        k_h, v_h, kv_off = _kv_base(k, v, ks, i_h, stride_kt, BS, D)
    for u in range(0, n_blk):
        if FORCED:
            init = u < n_init_steps
            first = tl.where(init, u * W, lo_local + (u - n_init_steps) * W)
            o_k, b_k, b_v = _load_kv(k_h, v_h, kv_off, first // BS, Tk, stride_kt, BS, W)
            b_s = tl.dot(b_q, tl.trans(b_k))
            # masks only where some row does not see every key of the step: the init keys, the
            # diagonal, and the keys below the last row's window (a runtime flag: a second loop
            # would serialise the wgmmas)
            if init | (first + W - 1 > pos_first) | (first < lo_last):
                lo_k = tl.where(init, 0, lo_row)
                hi_k = tl.where(init, n_init, first + W)
                ok = (o_k[None, :] >= lo_k[:, None]) & (o_k[None, :] < hi_k) & (o_k[None, :] <= pos[:, None])
                b_s = tl.where(ok, b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_m, b_l, b_acc, b_v, scale_log2)
        else:
            blk, rowsel = _step(p_blk, p_bits, u, Tk > dense_len, r_t, m_row, BT)
            o_k, b_k, b_v = _load_kv(k_h, v_h, kv_off, blk, Tk, stride_kt, BS, BS)
            b_m, b_l, b_acc = _attend_fwd(b_q, b_m, b_l, b_acc, b_k, b_v, o_k, pos, rowsel, scale_log2)

    ok = b_l > 0
    b_o = b_acc / tl.where(ok, b_l, 1.)[:, None]
    p_o = o + (qs + tok).to(tl.int64)[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_row[:, None])
    if FORCED:
        b_lse = tl.where(ok, b_m + tl.log2(tl.where(ok, b_l, 1.)), float("-inf"))
    else:
        b_lse = tl.where(ok, b_m + tl.log2(tl.where(ok, b_l, 1.)), 0.)
    tl.store(lse + (qs + tok).to(tl.int64) * Hq + i_h * G + r_g, b_lse, mask=m_row)


@triton.jit
def _dq_kernel(q, k, v, do, dq, lse, delta, idx, tile_n, tile_i, q_start, k_start, seq_Tq, seq_Tk,
               u_blk, u_bits, u_len, U, scale, scale_log2, dense_len, stride_qt, stride_kt, stride_it, Hq,
               G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
               K: tl.constexpr):
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    BM: tl.constexpr = BT * GP
    n = tl.load(tile_n + i_tile)
    i0 = tl.load(tile_i + i_tile)
    qs = tl.load(q_start + n)
    ks = tl.load(k_start + n)
    Tq = tl.load(seq_Tq + n)
    Tk = tl.load(seq_Tk + n)

    o_r = tl.arange(0, BM)
    r_t, r_g = o_r // GP, o_r % GP
    tok = i0 + r_t
    m_row = (tok < Tq) & (r_g < G)
    pos = Tk - Tq + tok
    o_d = tl.arange(0, D)
    o_qd = (qs + tok).to(tl.int64)[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    b_q = tl.load(q + o_qd, mask=m_row[:, None], other=0.)
    b_do = tl.load(do + o_qd, mask=m_row[:, None], other=0.)
    o_l = (qs + tok).to(tl.int64) * Hq + i_h * G + r_g
    b_lse = tl.load(lse + o_l, mask=m_row, other=0.)
    b_delta = tl.load(delta + o_l, mask=m_row, other=0.)
    b_dq = tl.full([BM, D], 0, tl.float32)
    p_blk, p_bits, n_blk = _walk(idx, u_blk, u_bits, u_len, U, qs, i0, i_tile, i_h, Tq, Tk, dense_len, stride_it,
                                 BT, BS, K)
    k_h, v_h, kv_off = _kv_base(k, v, ks, i_h, stride_kt, BS, D)
    for u in range(0, n_blk):
        blk, rowsel = _step(p_blk, p_bits, u, Tk > dense_len, r_t, m_row, BT)
        o_k, b_k, b_v = _load_kv(k_h, v_h, kv_off, blk, Tk, stride_kt, BS, BS)
        b_dq = _attend_dq(b_q, b_do, b_lse, b_delta, b_dq, b_k, b_v, o_k, pos, rowsel, scale_log2)
    tl.store(dq + o_qd, (b_dq * scale).to(dq.dtype.element_ty), mask=m_row[:, None])


@triton.jit
def _dkv_rows(q, do, lse, delta, tok_list, b_k, b_v, b_dk, b_dv, t0, hi, i_h, qs, Tq, Tk, o_k, scale_log2,
              stride_qt, Hq, masked, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """dk, dv of one block plus the rows tok_list[t0 : t0 + BT] (those before hi). masked: some row
    sees only part of the block; else every key is visible, and padding rows (q, dO, lse and delta
    all 0) add nothing."""
    row, m_r, o_qd, _, r_g = segment_rows(tok_list, t0, hi, i_h, stride_qt, G, GP, BT, D)
    b_q = tl.load(q + o_qd, mask=m_r[:, None], other=0.)
    b_do = tl.load(do + o_qd, mask=m_r[:, None], other=0.)
    o_l = row * Hq + i_h * G + r_g
    b_lse = tl.load(lse + o_l, mask=m_r, other=0.)
    b_delta = tl.load(delta + o_l, mask=m_r, other=0.)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k)) * scale_log2 - b_lse[:, None])
    if masked:
        pos = Tk - Tq + (row - qs)
        b_p = tl.where(m_r[:, None] & (o_k[None, :] <= pos[:, None]), b_p, 0.)
    b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    return b_dk, b_dv


@triton.jit
def _dkv_kernel(q, k, v, do, dk, dv, lse, delta, tok_list, seg_h, seg_n, seg_b, seg_lo, seg_hi,
                q_start, k_start, seq_Tq, seq_Tk, scale, scale_log2, stride_qt, stride_kt, Hq,
                G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Segment program id: dk, dv of one block over the rows in tok_list[lo:hi] that attend to it.
    A segment's rows are ascending, so when its first row sees the block's last key every row sees
    every key: no masks (all of a block's segments but the one holding its own rows)."""
    i_h, lo, hi, qs, Tq, Tk, o_k, o_kd, m_k, b_k, b_v = segment(
        tl.program_id(0), seg_h, seg_n, seg_b, seg_lo, seg_hi, q_start, k_start, seq_Tq, seq_Tk, k, v, stride_kt, D, BS)
    b_dk = tl.full([BS, D], 0, tl.float32)
    b_dv = tl.full([BS, D], 0, tl.float32)
    first = tl.load(tok_list + lo, mask=lo < hi, other=0)
    masked = rmax(o_k, 0) > Tk - Tq + (first - qs)
    for t0 in range(lo, hi, BT):
        b_dk, b_dv = _dkv_rows(q, do, lse, delta, tok_list, b_k, b_v, b_dk, b_dv, t0, hi, i_h, qs, Tq, Tk, o_k,
                               scale_log2, stride_qt, Hq, masked, G, GP, BT, D)
    # relaxed: the partial sums need no ordering (the kernel's end publishes them); the default
    # acq_rel put a GPU-wide fence around every atomic (run 31: fwd+bwd at group 4 −9%)
    tl.atomic_add(dk + o_kd, b_dk * scale, mask=m_k[:, None], sem="relaxed")
    tl.atomic_add(dv + o_kd, b_dv, mask=m_k[:, None], sem="relaxed")


# Tokens of a forward / dq query tile. Every token of a tile walks the union of the tile's block
# lists: more tokens fill the tensor cores better but waste rows on blocks only some of them
# picked, so the best tile depends on how much neighbouring tokens' lists overlap
# (notes-infllmv2.md). H100, attention alone, run 6: at group 16, 4 tokens (64 rows) beat 2 and 8
# on random inputs' lists and on SmolLM2's own (128K: 129 / 85 ms); at group 4, 16 tokens (64 rows)
# beat 4 and 8 on SmolLM2's lists at every length (128K: 85 vs 181 ms with 4 tokens) and are
# within 7% either way on random ones. So a tile is ATTN_ROWS rows, at most 16 tokens; ATTN_TOKENS
# (when set) fixes the tokens instead. 1 token takes the plain slot loop (kept, tested, slower).
ATTN_ROWS = 64
ATTN_TOKENS: int | None = None
ATTN_WARPS = 4  # num_warps of the forward launch
ATTN_STAGES = 3  # num_stages of the forward launch (Triton's default; run 11: 2 and 4 slower)
# the dq launch (q, dO and dq per row). Run 12, 32K fwd+bwd: 68.3 ms vs 77.4 with 3 stages; 8 warps 88.6
DQ_WARPS, DQ_STAGES = 4, 2
# the dk/dv launch for rows of q / dO up to 256 bytes (bf16 at d = 128): query rows (tokens × padded
# group heads) per step, warps, stages. Run 24, stage 2 fwd+bwd on fixed lists: 128 rows on 8 warps
# against 64 on 4 took 32K 62.0 -> 60.8 ms, 64K 144.1 -> 135.0, group 4 at 128K 745.4 -> 745.5 and
# at 32K 95.0 -> 96.1; on 4 warps the [64 x 128] dk and dv accumulators spill (sass_stats.py).
# Wider rows (fp32, d = 256) take 64 rows on 4 warps: 3 stages of 128 would not fit in shared memory.
DKV_ROWS, DKV_WARPS, DKV_STAGES = 128, 8, 3
DKV_SEG = 256  # query tokens per dk/dv program at most: a block's tokens beyond it go to further programs
# A forward that autograd will not differentiate, with every sequence sparse and at least
# BY_BLOCK_MIN_KEYS keys long, takes each row's chosen (not forced) blocks block-major
# (by_block.py) at groups up to BY_BLOCK_MAX_GROUP. H100 runs 34-37, stage 2 alone on random lists,
# union -> split: group 4 at 32K 27 -> 38 ms, 64K 83 -> 76, 128K 255 -> 138, 256K 685 -> 279;
# group 16 at 32K 17 -> 24, 128K 92 -> 94. Run 43 (forced blocks from positions, no host waits):
# group 4 at 16K 8.8 -> 12.0 ms, 32K 27.0 -> 25.5, 128K 253 -> 123; group 16 at 32K 17.4 -> 25.6.
BY_BLOCK_MAX_GROUP = 8
BY_BLOCK_MIN_KEYS = 32768
# ... and only when the lists spread: block-major pays one partial per (row, chosen block) whatever
# the lists, the union tiles pay per block of their tokens' union, which stays near one list when
# neighbouring tokens choose alike (a real model's lists, notes-infllmv2.md "On real block lists")
# and grows towards BT lists when they do not (random inputs). The spread (lists_spread, on
# UNION_SAMPLE_TILES tiles) reaches the decision through a route.Router, without waiting for the
# device; above BY_BLOCK_MIN_SPREAD the call goes block-major. H100 run 55, stage 2 alone, union /
# block-major at spread s: SmolLM2's lists (s 1.5-1.8) 69 / 96 ms at 128K and group 4, 148 / 196 at
# 256K, 68 / 91 at 128K and group 8; random ones (s 3.4-7.8) 253 / 100, 689 / 207, 163 / 92: the
# union costs 41 ms per unit of s at 128K and group 4, 88 at 256K, so the two cross near 2.4.
BY_BLOCK_MIN_SPREAD = 2.5
UNION_SAMPLE_TILES = 256
# The forced blocks of that forward (_forced_forward): rows per tile, warps, and keys per step (the
# local window is contiguous: whole blocks, at least one). Run 42, group 4, one 64-key block a step:
# 128 rows on 8 warps as fast as 64 on 4 (32K 28.3 vs 28.1 ms, 128K 123.2 vs 123.1). 128 keys a step
# on 128 rows: 613 instructions a thread per unmasked step, against 639 per 64 keys before
# (sass_stats.py); 256 keys spill 88 bytes.
FORCED_ROWS, FORCED_WARPS, FORCED_KEYS = 128, 8, 128


def lists_spread(idx: torch.Tensor, seqs: Seqs, G: int, tiles: int | None = None) -> torch.Tensor:
    """Blocks a forward tile walks (the union of its tokens' lists) over the blocks one of its tokens
    lists, on `tiles` tiles (default UNION_SAMPLE_TILES) spread evenly over the rows: 1 when
    neighbouring tokens choose alike, up to BT when no two choose the same block. A 0-d float32
    tensor on idx's device (queued, not waited for)."""
    _, BT = _tile_tokens(G, max(seqs.Tq_list), ATTN_TOKENS)
    tile_n, tile_i = make_tiles(seqs, BT, idx.device)  # queued copies: a .to(device) here would wait
    pick = torch.linspace(0, tile_n.numel() - 1, min(tiles or UNION_SAMPLE_TILES, tile_n.numel()),
                          device=idx.device).long()
    tile_n, tile_i = tile_n[pick], tile_i[pick]
    _, real, _, first, valid = _tile_runs(idx, seqs, tile_n, tile_i, BT)
    # (blocks walked per tile) / (blocks listed per token), both summed over the KV heads
    return (first.sum() * valid.sum() / (real.sum().clamp(min=1) * pick.numel())).float()


def _tile_tokens(G: int, Tq_max: int, tokens: int | None) -> tuple[int, int]:
    GP = next_pow2(G)
    BT = min(16, max(1, ATTN_ROWS // GP)) if tokens is None else tokens
    BT = min(BT, max(next_pow2(Tq_max), 1))
    BT = max(BT, (16 + GP - 1) // GP)  # tl.dot needs ≥ 16 rows
    return GP, BT


def tile_unions(idx: torch.Tensor, seqs: Seqs, tile_n: torch.Tensor, tile_i: torch.Tensor, BT: int,
                chunk_entries: int = 1 << 25):
    """The block lists of each (query tile, KV head) merged: (blocks int32 [M·Hkv, U] ascending, −1
    after the last; token masks int32 [M·Hkv, U], bit t set when the tile's token t picked the
    block; lengths int32 [M·Hkv]), U = BT·K. Rows are tile-major, as the kernels' grid. Tiles are
    merged in groups of at most `chunk_entries` list entries, which bounds the sort's scratch memory."""
    _, Hkv, K = idx.shape
    M, U = tile_n.numel(), BT * K
    u_blk = torch.empty(M * Hkv, U, dtype=torch.int32, device=idx.device)
    u_bits = torch.empty_like(u_blk)
    u_len = torch.empty(M * Hkv, dtype=torch.int32, device=idx.device)
    step = max(1, chunk_entries // (Hkv * U))
    for m0 in range(0, M, step):
        rows = slice(m0 * Hkv, min(M, m0 + step) * Hkv)
        u_blk[rows], u_bits[rows], u_len[rows] = _merge_lists(idx, seqs, tile_n[m0:m0 + step], tile_i[m0:m0 + step], BT)
    return u_blk, u_bits, u_len


def _tile_runs(idx, seqs, tile_n, tile_i, BT):
    """The entries of each (tile, KV head) sorted by block, then token: keys block·BT + token
    [M·Hkv, BT·K] (int32 max: none), which are real, their blocks, which start a block's run; and
    each tile's real tokens [M, BT]."""
    _, Hkv, K = idx.shape
    t = torch.arange(BT, device=idx.device, dtype=torch.int32)
    tok = tile_i[:, None] + t[None, :]  # [M, BT] local query index
    valid = tok < seqs.Tq.to(idx.device)[tile_n.long()][:, None]
    rows = seqs.q_start.to(idx.device)[tile_n.long()][:, None] + tok.long()
    lists = idx[torch.where(valid, rows, 0)]  # [M, BT, Hkv, K]
    key = lists * BT + t[None, :, None, None]
    key = torch.where(valid[:, :, None, None] & (lists >= 0), key, torch.iinfo(torch.int32).max)
    key = torch.sort(key.permute(0, 2, 1, 3).reshape(-1, BT * K), dim=-1).values
    real = key != torch.iinfo(torch.int32).max
    blk = torch.div(key, BT, rounding_mode="floor")
    first = real.clone()
    first[:, 1:] &= blk[:, 1:] != blk[:, :-1]
    return key, real, blk, first, valid


def _merge_lists(idx, seqs, tile_n, tile_i, BT):
    key, real, blk, first, _ = _tile_runs(idx, seqs, tile_n, tile_i, BT)
    slot = (torch.cumsum(first, -1, dtype=torch.int32) - 1).clamp(min=0).long()
    # every entry of a run writes the run's block to its slot; the padding (only present when the
    # union is shorter than U) writes −1 to the last slot, which then holds no run
    u_blk = torch.full_like(key, -1).scatter_(1, torch.where(real, slot, key.shape[1] - 1), torch.where(real, blk, -1))
    u_bits = torch.zeros_like(key).scatter_add_(1, slot, torch.where(real, 1 << (key % BT), 0))
    return u_blk, u_bits, first.sum(-1, dtype=torch.int32)


class InfLLMv2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg, seqs, scale, idx):
        o, lse, tile_n, tile_i, union, meta = _union_forward(q, k, v, idx, seqs, cfg, scale)
        ctx.save_for_backward(q, k, v, o, lse, idx, tile_n, tile_i, *union)
        ctx.cfg, ctx.seqs, ctx.scale = cfg, seqs, scale
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, tile_n, tile_i, *union = ctx.saved_tensors
        cfg, seqs, scale = ctx.cfg, ctx.seqs, ctx.scale
        G, GP, BT = ctx.meta
        Nq, Hq, D = q.shape
        Hkv = k.shape[1]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)
        dq = layout.empty(q.shape, q.dtype, q.device)
        _dq_kernel[(tile_n.numel(), Hkv)](
            q, k, v, do, dq, lse, delta, idx, tile_n, tile_i, seqs.q_start, seqs.k_start, seqs.Tq, seqs.Tk,
            *union, union[0].shape[-1], scale, scale * LOG2E, cfg["dense_len"], q.stride(0), k.stride(0),
            idx.stride(0), Hq, G=G, GP=GP, BT=BT, D=D, BS=cfg["block_size"], K=idx.shape[2],
            num_warps=DQ_WARPS, num_stages=DQ_STAGES)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        tok_list, sh, sn, sb, slo, shi = layout.block_segments(idx, seqs, cfg["block_size"], cfg["dense_len"],
                                                               seg=DKV_SEG)
        if sh.numel():
            rows, warps = (DKV_ROWS, DKV_WARPS) if D * q.element_size() <= 256 else (64, 4)
            _, BTK = _tile_tokens(G, max(seqs.Tq_list), max(1, rows // GP))  # no wasted rows: tall
            _dkv_kernel[(sh.numel(),)](
                q, k, v, do, dk, dv, lse, delta, tok_list, sh, sn, sb, slo, shi,
                seqs.q_start, seqs.k_start, seqs.Tq, seqs.Tk, scale, scale * LOG2E, q.stride(0), k.stride(0), Hq,
                G=G, GP=GP, BT=BTK, D=D, BS=cfg["block_size"], num_warps=warps, num_stages=DKV_STAGES)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _union_forward(q, k, v, idx, seqs, cfg, scale):
    """The forward over union tiles: o, lse (log2 units) and what the backward needs."""
    Nq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    GP, BT = _tile_tokens(G, max(seqs.Tq_list), ATTN_TOKENS)
    tile_n, tile_i = make_tiles(seqs, BT, q.device)
    o = layout.empty(q.shape, q.dtype, q.device)
    lse = layout.empty((Nq, Hq), torch.float32, q.device)
    union = _unions(idx, seqs, tile_n, tile_i, BT, cfg["dense_len"])
    _fwd_kernel[(tile_n.numel(), Hkv)](
        q, k, v, o, lse, idx, tile_n, tile_i, seqs.q_start, seqs.k_start, seqs.Tq, seqs.Tk,
        *union, union[0].shape[-1], scale * LOG2E, cfg["dense_len"], q.stride(0), k.stride(0), idx.stride(0), Hq,
        G=G, GP=GP, BT=BT, D=D, BS=cfg["block_size"], K=idx.shape[2],
        num_warps=ATTN_WARPS, num_stages=ATTN_STAGES)
    return o, lse, tile_n, tile_i, union, (G, GP, BT)


def _forced_forward(q, k, v, seqs, cfg, scale):
    """o and lse (log2 units, −inf: nothing) of every row over its forced blocks alone (init and
    local: the same for the tokens of one block, so a tile wastes no row on them), walked from the
    positions: no lists to read or merge."""
    Nq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    GP, BT = _tile_tokens(G, max(seqs.Tq_list), max(1, FORCED_ROWS // next_pow2(G)))
    tile_n, tile_i = make_tiles(seqs, BT, q.device)
    o = layout.empty(q.shape, q.dtype, q.device)
    lse = layout.empty((Nq, Hq), torch.float32, q.device)
    z = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    _fwd_kernel[(tile_n.numel(), Hkv)](
        q, k, v, o, lse, z, tile_n, tile_i, seqs.q_start, seqs.k_start, seqs.Tq, seqs.Tk,
        z, z, z[0], 1, scale * LOG2E, cfg["dense_len"], q.stride(0), k.stride(0), 0, Hq,
        G=G, GP=GP, BT=BT, D=D, BS=cfg["block_size"], K=1, FORCED=True, INIT=cfg["init_blocks"],
        LOCAL=cfg["local_blocks"], W=max(FORCED_KEYS, cfg["block_size"]), num_warps=FORCED_WARPS, num_stages=ATTN_STAGES)
    return o, lse


def _inference_forward(q, k, v, idx, seqs, cfg, scale, selected):
    """The forward when no gradient is wanted and every sequence is sparse. `selected`: idx came
    from this call's selection, so every row lists its forced blocks: those go through
    _forced_forward and the rest block-major (by_block.py), merged by log-sum-exp. Lists from the
    caller may leave forced blocks out: all of their entries go block-major."""
    if selected:
        o, lse = _forced_forward(q, k, v, seqs, cfg, scale)
        # a row lists its blocks ascending: the init ones first, the local ones (up to its own) last,
        # and the chosen ones, at most topk − init − local, between them (short rows: some forced there)
        first = cfg["init_blocks"]
        most = max(0, cfg["topk"] - first - cfg["local_blocks"])
        idx = idx[:, :, first:first + most]
        forced = by_block.forced_entries(idx, seqs, cfg["block_size"], cfg["init_blocks"], cfg["local_blocks"])
        idx = torch.where(forced, -1, idx)
    else:
        o = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
        most = idx.shape[2]
    by_block.add_chosen(q, k, v, idx, seqs, cfg["block_size"], scale * LOG2E, o, lse, most)
    return o


def _unions(idx, seqs, tile_n, tile_i, BT, dense_len):
    """tile_unions when some tile walks a union (BT > 1, some sequence sparse), else 1-element
    placeholders that no kernel reads."""
    if BT > 1 and any(t > dense_len for t in seqs.Tk_list):
        return tile_unions(idx, seqs, tile_n, tile_i, BT)
    z = torch.zeros(1, 1, dtype=torch.int32, device=idx.device)
    return z, z, z[0]


def _prepare(q, k, cu_seqlens, cfg):
    from salaconvert.kernels.infllmv2.naive import _check, _check_varlen
    _check(q, k, None, cfg)
    if cu_seqlens is not None:
        _check_varlen(q, k, cu_seqlens)
    B, Tq, Hq, D = q.shape
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D}: the Triton path takes 16, 32, 64, 128 or 256")
    if cfg["block_size"] < 16 or cfg["block_size"] & (cfg["block_size"] - 1):
        raise ValueError(f"block_size {cfg['block_size']}: the Triton path needs a power of two >= 16")
    pool_shape(cfg["block_size"], cfg["kernel_size"], cfg["stride"])
    seqs = make_seqs(B, Tq, k.shape[1], cu_seqlens, cfg["kernel_size"], cfg["stride"], q.device)
    return seqs


def _select_flat(qf, kf, seqs, cfg, scale):
    kc = compress_k_flat(kf, seqs, cfg["kernel_size"], cfg["stride"])
    kn = seqs_n = None
    if cfg["coarse_norm"]:
        seqs_n = with_windows(seqs, *coarse_pool(cfg))
        kn = compress_k_flat(kf, seqs_n, *coarse_pool(cfg)).to(qf.dtype)
    return select_blocks(qf, kc.to(qf.dtype), seqs, block_size=cfg["block_size"], topk=cfg["topk"],
                         init_blocks=cfg["init_blocks"], local_blocks=cfg["local_blocks"],
                         kernel_size=cfg["kernel_size"], stride=cfg["stride"], scale=scale, kn=kn, seqs_n=seqs_n)


def parallel_infllmv2_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, topk: int = 96,
                             init_blocks: int = 1, local_blocks: int = 32, kernel_size: int = 32, stride: int = 16,
                             dense_len: int = 8192, scale: float | None = None,
                             cu_seqlens: torch.Tensor | None = None, coarse_norm: bool = False) -> torch.Tensor:
    """Triton stage 1. q [B, Tq, Hq, d], k [B, Tk, Hkv, d] -> int32 [B, Tq, Hkv, topk] (see naive_infllmv2_select)."""
    cfg = _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm)
    seqs = _prepare(q, k, cu_seqlens, cfg)
    B, Tq, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    with torch.no_grad():
        idx = _select_flat(q.reshape(B * Tq, Hq, D).contiguous(), k.reshape(-1, k.shape[2], D).contiguous(),
                           seqs, cfg, scale)
    return idx.view(B, Tq, k.shape[2], topk)


def parallel_infllmv2_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64,
                           topk: int = 96, init_blocks: int = 1, local_blocks: int = 32, kernel_size: int = 32,
                           stride: int = 16, dense_len: int = 8192, scale: float | None = None,
                           cu_seqlens: torch.Tensor | None = None,
                           block_indices: torch.Tensor | None = None, coarse_norm: bool = False,
                           router: Router | None = None) -> torch.Tensor:
    """Triton InfLLM-V2 attention. q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] -> o [B, Tq, Hq, d].

    Same math and keywords as naive_infllmv2_attn; differentiable in q, k, v. `block_indices`
    ([B, Tq, Hkv, K] from infllmv2_select) skips stage 1 when given. `router`: the caller's
    route.Router (one per layer), which routes an inference forward without waiting for the
    device; without one, such a call waits once.
    """
    cfg = _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm)
    return _attn(q, k, v, cfg, scale, cu_seqlens, block_indices, router=router)


def attend_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, *,
                    block_size: int = 64, topk: int = 96, init_blocks: int = 1, local_blocks: int = 32,
                    kernel_size: int = 32, stride: int = 16, dense_len: int = 8192, scale: float | None = None,
                    cu_seqlens: torch.Tensor | None = None, coarse_norm: bool = False,
                    router: Router | None = None) -> torch.Tensor:
    """Stage 2 alone over lists that parallel_infllmv2_select made with the same keywords: exactly
    what parallel_infllmv2_attn does after its own selection. Lists from elsewhere (its
    block_indices=) may leave a row's forced blocks out, so that call cannot walk them from
    positions; the benchmarks time stage 2 with this one."""
    cfg = _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm)
    return _attn(q, k, v, cfg, scale, cu_seqlens, block_indices, selected=True, router=router)


def _attn(q, k, v, cfg, scale, cu_seqlens, block_indices, selected=False, router=None):
    seqs = _prepare(q, k, cu_seqlens, cfg)
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf = q.reshape(B * Tq, Hq, D).contiguous()
    kf = k.reshape(-1, Hkv, D).contiguous()
    vf = v.reshape(-1, Hkv, D).contiguous()
    if block_indices is not None:
        idx = block_indices.reshape(B * Tq, Hkv, -1).to(torch.int32).contiguous()
    elif any(t > cfg["dense_len"] for t in seqs.Tk_list):
        selected = True
        with torch.no_grad():
            idx = _select_flat(qf, kf, seqs, cfg, scale)
    else:
        idx = torch.full((B * Tq, Hkv, 1), -1, dtype=torch.int32, device=q.device)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if (not grad and Hq // Hkv <= BY_BLOCK_MAX_GROUP
            and all(t > cfg["dense_len"] and t >= BY_BLOCK_MIN_KEYS for t in seqs.Tk_list)
            and (router or Router()).spread_now(lambda: lists_spread(idx, seqs, Hq // Hkv)) > BY_BLOCK_MIN_SPREAD):
        o = _inference_forward(qf, kf, vf, idx, seqs, cfg, scale, selected)
    else:
        o = InfLLMv2Function.apply(qf, kf, vf, cfg, seqs, scale, idx)
    return o.view(B, Tq, Hq, D)
