"""InfLLM-V2 stage 2 forward, block-major: for inference (no autograd), where the union tiles waste most rows.

The union tiles of parallel.py load a K/V block once for a tile's tokens and run the dots for all
its rows; when neighbouring tokens choose different blocks (random inputs, small groups: a 16-token
tile at group 4 walks ~7× K blocks at 128K) most of those rows are masked out and every block is
re-read for every tile that picked it. Here one program takes one (KV head, block) and a segment of
the query rows that picked it (layout.chosen_segments: a CSR like the dk/dv kernel's), so no
row is wasted and each block is read once per segment: the price is a partial result per
(row, selected block) — the block's normalised output, in q's dtype, and its log-sum-exp — which a
second kernel merges per row in list order, into the result of the row's forced blocks (init and
local, shared by neighbouring tokens), which parallel._forced_forward computes first by walking them
from positions (for lists from a caller there is none: every entry comes here). Query rows are processed in chunks whose partials fit in PARTIAL_BYTES; every size comes from
the shapes and an upper bound on the entries per row, so the host queues all of it without waiting
for the device. Partial outputs rounded to bf16 add at most one bf16 rounding of max |v| to the
result (the union path rounds only the final output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index
from salaconvert.kernels.infllmv2 import layout
from salaconvert.kernels.infllmv2._interp import rmax, rsum
from salaconvert.kernels.infllmv2.layout import Seqs, next_pow2

fix_interpreter_index()

PARTIAL_BYTES = 2 << 30  # partial outputs of one chunk of query rows, at most (the chunk is ≥ 1 row)
PASS_ENTRIES = 1 << 27  # selection entries (valid or not) of one chunk's CSR, at most
SEG = 256  # query rows of one block per program, at most
ROWS, WARPS, STAGES = 64, 4, 2  # rows (tokens × padded group heads) per dot, launch shape of the partials
# registers per thread of the partials' launch, at most (None: the compiler's choice). 168 fits three
# programs per SM at group 4 (177 otherwise: two), with no spills (sass_stats.py)
PARTIAL_MAXNREG = 168
# rows per program and launch shape of the merge. Run 37, group 4: 128 rows on 8 warps 154 -> 138 ms
# at 128K, 311 -> 278 at 256K against 64 on 4 (group 16, not routed here: 94 -> 116); stages 1 and 4 ±2%
MERGE_ROWS, MERGE_WARPS, MERGE_STAGES = 128, 8, 3


@triton.jit
def segment(i_s, seg_h, seg_n, seg_b, seg_lo, seg_hi, q_start, k_start, seq_Tq, seq_Tk, k, v, stride_kt,
            D: tl.constexpr, BS: tl.constexpr):
    """Segment i_s of a block-major CSR (layout.chosen_segments here, layout.block_segments in
    parallel's dk/dv kernel): its KV head, its rows' range in tok_list, its sequence's first query
    row, Tq and Tk, and its block's key positions, [BS, D] offsets and row mask, K and V (none
    loaded for an empty segment)."""
    i_h = tl.load(seg_h + i_s)
    n = tl.load(seg_n + i_s)
    blk = tl.load(seg_b + i_s)
    lo = tl.load(seg_lo + i_s)
    hi = tl.load(seg_hi + i_s)
    qs = tl.load(q_start + n)
    ks = tl.load(k_start + n)
    Tq = tl.load(seq_Tq + n)
    Tk = tl.load(seq_Tk + n)
    o_k = blk * BS + tl.arange(0, BS)
    o_kd = (ks + o_k).to(tl.int64)[:, None] * stride_kt + i_h * D + tl.arange(0, D)[None, :]
    m_k = o_k < tl.where(lo < hi, Tk, 0)  # an empty segment loads nothing
    b_k = tl.load(k + o_kd, mask=m_k[:, None], other=0.)
    b_v = tl.load(v + o_kd, mask=m_k[:, None], other=0.)
    return i_h, lo, hi, qs, Tq, Tk, o_k, o_kd, m_k, b_k, b_v


@triton.jit
def segment_rows(tok_list, t0, hi, i_h, stride_qt, G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr,
                 D: tl.constexpr):
    """Rows tok_list[t0 : t0 + BT] of a segment × the G heads of KV head i_h (BT·GP rows, token-major):
    each row's query row, mask (before hi, a real head), [BT·GP, D] offsets into q-shaped tensors,
    and its token (0 … BT − 1) and head (0 … GP − 1)."""
    o_r = tl.arange(0, BT * GP)
    r_t, r_g = o_r // GP, o_r % GP
    m_r = ((t0 + r_t) < hi) & (r_g < G)
    row = tl.load(tok_list + t0 + r_t, mask=m_r, other=0).to(tl.int64)
    o_qd = row[:, None] * stride_qt + (i_h * G + r_g)[:, None] * D + tl.arange(0, D)[None, :]
    return row, m_r, o_qd, r_t, r_g


@triton.jit
def _partial_rows(q, b_k, b_v, part_o, part_lse, tok_list, t0, hi, i_h, qs, Tq, Tk, o_k, scale_log2, stride_qt,
                  G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr):
    """The partials of rows tok_list[t0 : t0 + BT] (those before hi) against one block. MASKED: some
    row sees only part of the block (it holds the row's own position); else every key is visible
    and padding rows, q = 0, are only kept from the stores."""
    row, m_r, o_qd, r_t, r_g = segment_rows(tok_list, t0, hi, i_h, stride_qt, G, GP, BT, D)
    b_q = tl.load(q + o_qd, mask=m_r[:, None], other=0.)
    b_s = tl.dot(b_q, tl.trans(b_k))
    if MASKED:
        pos = Tk - Tq + (row - qs)
        b_s = tl.where(m_r[:, None] & (o_k[None, :] <= pos[:, None]), b_s, float("-inf"))
    # the scale folds into the exponent's FMA: m_use is the row's max raw score, times scale_log2
    b_m = rmax(b_s, 1)
    m_use = tl.where(b_m == float("-inf"), 0., b_m) * scale_log2
    b_p = tl.exp2(b_s * scale_log2 - m_use[:, None])
    b_l = rsum(b_p, 1)
    seen = b_l > 0
    # one reciprocal per row: a division per element costs several instructions more
    b_o = tl.dot(b_p.to(b_v.dtype), b_v) * (1. / tl.where(seen, b_l, 1.))[:, None]
    p_out = (t0 + r_t).to(tl.int64) * G + r_g
    tl.store(part_o + p_out[:, None] * D + tl.arange(0, D)[None, :], b_o.to(part_o.dtype.element_ty),
             mask=m_r[:, None])
    tl.store(part_lse + p_out, tl.where(seen, m_use + tl.log2(tl.where(seen, b_l, 1.)), float("-inf")), mask=m_r)


@triton.jit
def _partial_kernel(q, k, v, part_o, part_lse, tok_list, seg_h, seg_n, seg_b, seg_lo, seg_hi,
                    q_start, k_start, seq_Tq, seq_Tk, scale_log2, stride_qt, stride_kt,
                    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Segment program id: one block, the rows in tok_list[lo:hi] that picked it, each row's softmax
    over the block alone. Writes, for the row at position p of tok_list, part_o[p·G + g] = the
    normalised output and part_lse[p·G + g] = log2 Σ exp2(scores) (−inf when no key is visible).
    A segment's rows are ascending, so when its first row sees the block's last key, every row
    sees every key: no masks (the chosen blocks of a selection, all before the rows' local ones)."""
    i_h, lo, hi, qs, Tq, Tk, o_k, _, _, b_k, b_v = segment(tl.program_id(0), seg_h, seg_n, seg_b, seg_lo, seg_hi,
                                                          q_start, k_start, seq_Tq, seq_Tk, k, v, stride_kt, D, BS)
    first = tl.load(tok_list + lo, mask=lo < hi, other=0)
    if rmax(o_k, 0) <= Tk - Tq + (first - qs):
        for t0 in range(lo, hi, BT):
            _partial_rows(q, b_k, b_v, part_o, part_lse, tok_list, t0, hi, i_h, qs, Tq, Tk, o_k, scale_log2,
                          stride_qt, G, GP, BT, D, False)
    else:
        for t0 in range(lo, hi, BT):
            _partial_rows(q, b_k, b_v, part_o, part_lse, tok_list, t0, hi, i_h, qs, Tq, Tk, o_k, scale_log2,
                          stride_qt, G, GP, BT, D, True)


# the first row changes from chunk to chunk: specialising on it (divisibility by 16) would compile
# new variants inside timed prefills
@triton.jit(do_not_specialize=["r0", "n_rows"])
def _merge_kernel(part_o, part_lse, slot, o, lse, r0, n_rows, stride_ot, Hq, Hkv,
                  G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, K: tl.constexpr):
    """BT query rows (from r0) × the G heads of one KV head: the online softmax of the result so far
    (o, lse; lse −inf: nothing yet) and the partials of the rows' list entries (slot [rows from r0,
    Hkv, K]: positions in tok_list, −1: none), in list order; o in place."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    BM: tl.constexpr = BT * GP
    o_r = tl.arange(0, BM)
    r_t, r_g = o_r // GP, o_r % GP
    tok = i_t * BT + r_t
    m_row = (tok < n_rows) & (r_g < G)
    o_d = tl.arange(0, D)
    p_o = o + (r0 + tok).to(tl.int64)[:, None] * stride_ot + (i_h * G + r_g)[:, None] * D + o_d[None, :]
    b_m = tl.load(lse + (r0 + tok).to(tl.int64) * Hq + i_h * G + r_g, mask=m_row, other=float("-inf"))
    b_l = tl.where(b_m == float("-inf"), 0., 1.)
    b_acc = tl.load(p_o, mask=m_row[:, None], other=0.).to(tl.float32)
    p_slot = slot + (tok.to(tl.int64) * Hkv + i_h) * K
    for j in range(K):
        s = tl.load(p_slot + j, mask=m_row, other=-1)
        ok = m_row & (s >= 0)
        p = s * G + r_g
        x = tl.load(part_lse + p, mask=ok, other=float("-inf"))
        b_o = tl.load(part_o + p[:, None] * D + o_d[None, :], mask=ok[:, None], other=0.).to(tl.float32)
        m_new = tl.maximum(b_m, x)
        m_use = tl.where(m_new == float("-inf"), 0., m_new)
        alpha = tl.exp2(b_m - m_use)
        w = tl.exp2(x - m_use)
        b_l = b_l * alpha + w
        b_acc = b_acc * alpha[:, None] + w[:, None] * b_o
        b_m = m_new
    tl.store(p_o, (b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]).to(o.dtype.element_ty), mask=m_row[:, None])


def forced_entries(idx: torch.Tensor, seqs: Seqs, block_size: int, init_blocks: int, local_blocks: int) -> torch.Tensor:
    """bool [Nq, Hkv, K]: the selection entries that are forced blocks (init, or among the row's local ones)."""
    dev = idx.device
    seq_of_row = layout.seq_of_rows(seqs, dev)
    local = torch.arange(idx.shape[0], device=dev) - seqs.q_start.to(dev)[seq_of_row]
    qb = (seqs.Tk.to(dev)[seq_of_row] - seqs.Tq.to(dev)[seq_of_row] + local) // block_size
    return (idx >= 0) & ((idx < init_blocks) | (idx > (qb - local_blocks)[:, None, None]))


def add_chosen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, seqs: Seqs, block_size: int,
               scale_log2: float, o: torch.Tensor, lse: torch.Tensor, most: int) -> None:
    """Merge into o (with lse [Nq, Hq], log2 units, −inf where nothing yet) the attention over the
    blocks in idx [Nq, Hkv, K] (−1 anywhere: none; at most `most` others per row and KV head).
    Flattened q [Nq, Hq, D], k/v [Nk, Hkv, D], every sequence sparse; no autograd."""
    Nq, Hq, D = q.shape
    Hkv, K = k.shape[1], idx.shape[2]
    if most == 0 or Nq == 0:
        return
    G = Hq // Hkv
    GP = next_pow2(G)
    BT = max(1, ROWS // GP, (16 + GP - 1) // GP)
    BTM = max(1, MERGE_ROWS // GP)
    chunk = max(1, min(Nq, PARTIAL_BYTES // (Hq * most * (D * q.element_size() + 4)), PASS_ENTRIES // (Hkv * K)))
    part_o = layout.empty((chunk * Hkv * most * G, D), q.dtype, q.device)
    part_lse = layout.empty((part_o.shape[0],), torch.float32, q.device)
    for r0 in range(0, Nq, chunk):
        r1 = min(Nq, r0 + chunk)
        tok_list, slot, sh, sn, sb, slo, shi = layout.chosen_segments(idx[r0:r1], seqs, r0, block_size, SEG, most)
        _partial_kernel[(sh.numel(),)](
            q, k, v, part_o, part_lse, tok_list, sh, sn, sb, slo, shi,
            seqs.q_start, seqs.k_start, seqs.Tq, seqs.Tk, scale_log2, q.stride(0), k.stride(0),
            G=G, GP=GP, BT=BT, D=D, BS=block_size, num_warps=WARPS, num_stages=STAGES, maxnreg=PARTIAL_MAXNREG)
        _merge_kernel[(triton.cdiv(r1 - r0, BTM), Hkv)](
            part_o, part_lse, slot, o, lse, r0, r1 - r0, o.stride(0), Hq, Hkv,
            G=G, GP=GP, BT=BTM, D=D, K=K, num_warps=MERGE_WARPS, num_stages=MERGE_STAGES)
