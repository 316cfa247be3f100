"""InfLLM-V2 decode in Triton: one query token per sequence against a preallocated K/V cache.

Legend: B batch, Hq/Hkv heads, G = Hq // Hkv, D head dim, Tmax cache capacity, L = cache_seqlens[b]
(tokens in the cache, the new one included: the query sits at position L − 1), Tc = compressed
keys of L tokens, NB = blocks of Tmax tokens.

Every launch has a grid fixed by the cache's capacity, and the current length is read on the
device, so the whole step (select + attend) can be captured in a CUDA graph and replayed while L
grows. Work is split so that a 1M-token cache still fills the GPU:
  1. stats:  (B·Hkv, splits of DECODE_CH compressed keys) -> partial softmax max/sum per head row;
  2. scores: (B·Hkv, chunks of BNB blocks) -> merges the partials, group-summed max-pooled block
             scores, forced/causal rules, int64 sort keys (select.py explains the key);
  3. top-k over the keys: rounds of per-program sorts (_topk_keys), fixed shapes;
  4. attend: (B·Hkv, splits of DECODE_SPP block slots) -> decodes the block ids from the keys,
             partial flash-decoding states;
  5. merge:  (B·Hkv) -> the output.
`update_compressed_cache` appends the compressed key that the newest token completes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index
from salaconvert.kernels.infllmv2._interp import rmax, rsum
from salaconvert.kernels.infllmv2 import layout
from salaconvert.kernels.infllmv2.layout import next_pow2, pool_shape
from salaconvert.kernels.infllmv2.select import orderable_int32

fix_interpreter_index()
LOG2E = 1.4426950408889634
# Split sizes: compressed keys per stats program and selected blocks per attention program. H100
# run 4 (attention reading the raw top-k), graph replay at 1M: 1024 / 4 0.126 ms, 512 / 1 0.143 ms,
# 256 / 2 0.203 ms, 1024 / 8 0.207 ms (run 3, before that change: 256 / 2 0.155 ms).
DECODE_CH = 1024
DECODE_SPP = 4
# Keys per program in each round of the decode top-k (_topk_keys); 0 uses torch.topk, whose one
# block per row leaves a B·Hkv = 2-row problem latency-bound. H100 run 5, graph replay at 1M:
# 512 0.0747 ms, 1024 0.0906, 2048 0.1133, torch.topk 0.1908.
DECODE_TOPK_CHUNK = 512


@triton.jit
def _n_comp(L, KS: tl.constexpr, ST: tl.constexpr):
    return tl.where(L >= KS, (tl.maximum(L, KS) - KS) // ST + 1, 0)


@triton.jit
def _load_q(q, b, h, stride_qb, G: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    o_r = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_r = o_r < G
    b_q = tl.load(q + b.to(tl.int64) * stride_qb + (h * G + o_r)[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
    return b_q, m_r


@triton.jit
def _dec_stats_kernel(q, kc, lens, m_buf, l_buf, scale_log2, dense_len, Hkv, stride_qb, stride_kcb, stride_kct,
                      G: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, CH: tl.constexpr, BC: tl.constexpr,
                      KS: tl.constexpr, ST: tl.constexpr, NSP: tl.constexpr, COARSE: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // Hkv, i_bh % Hkv
    L = tl.load(lens + b)
    # the normaliser's keys: the compressed keys, or with COARSE the coarse ones (window 4·KS,
    # stride 4·ST), each the mean of the 4 disjoint compressed windows 4j + m·KS/ST, m = 0..3
    NKS: tl.constexpr = 4 * KS if COARSE else KS
    NST: tl.constexpr = 4 * ST if COARSE else ST
    Tn = _n_comp(L, NKS, NST)
    b_q, m_r = _load_q(q, b, h, stride_qb, G, BM, D)
    o_d = tl.arange(0, D)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.full([BM], 0, tl.float32)
    if (L > dense_len) & (i_s * CH < Tn):
        for j0 in range(0, CH, BC):
            o_j = i_s * CH + j0 + tl.arange(0, BC)
            m_j = o_j < Tn
            if COARSE:
                p_k = kc + b.to(tl.int64) * stride_kcb + (4 * o_j).to(tl.int64)[:, None] * stride_kct + h * D + \
                    o_d[None, :]
                b_k = tl.load(p_k, mask=m_j[:, None], other=0.).to(tl.float32)
                for m in tl.static_range(1, 4):
                    b_k += tl.load(p_k + m * (KS // ST) * stride_kct, mask=m_j[:, None], other=0.).to(tl.float32)
                b_k = (b_k * 0.25).to(b_q.dtype)
            else:
                p_k = kc + b.to(tl.int64) * stride_kcb + o_j.to(tl.int64)[:, None] * stride_kct + h * D + o_d[None, :]
                b_k = tl.load(p_k, mask=m_j[:, None], other=0.).to(b_q.dtype)
            b_s = tl.where(m_j[None, :], tl.dot(b_q, tl.trans(b_k)) * scale_log2, float("-inf"))
            m_new = tl.maximum(b_m, rmax(b_s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0., m_new)
            b_l = b_l * tl.exp2(b_m - m_safe) + rsum(tl.exp2(b_s - m_safe[:, None]), 1)
            b_m = m_new
    o_r = tl.arange(0, BM)
    o_buf = (i_bh * NSP + i_s) * BM + o_r
    tl.store(m_buf + o_buf, b_m)
    tl.store(l_buf + o_buf, b_l)


@triton.jit
def _dec_score_kernel(q, kc, lens, m_buf, l_buf, keys, scale_log2, dense_len, Hkv, NBMAX, stride_qb, stride_kcb,
                      stride_kct, G: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BNB: tl.constexpr,
                      P: tl.constexpr, BS: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, INIT: tl.constexpr,
                      LOCAL: tl.constexpr, NSP: tl.constexpr, NSPP: tl.constexpr):
    i_bh, i_c = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // Hkv, i_bh % Hkv
    L = tl.load(lens + b)
    Tc = _n_comp(L, KS, ST)
    qb = (L - 1) // BS
    o_b = i_c * BNB + tl.arange(0, BNB)
    best = tl.full([BNB], float("-inf"), tl.float32)
    if (L > dense_len) & (i_c * BNB <= qb):
        b_q, m_r = _load_q(q, b, h, stride_qb, G, BM, D)
        o_d = tl.arange(0, D)
        # merge the split softmax statistics of each head row
        o_s = tl.arange(0, NSPP)
        o_r = tl.arange(0, BM)
        p_s = (i_bh * NSP + o_s)[:, None] * BM + o_r[None, :]
        m_s = (o_s < NSP)[:, None]
        sm = tl.load(m_buf + p_s, mask=m_s, other=float("-inf"))
        sl = tl.load(l_buf + p_s, mask=m_s, other=0.)
        b_m = rmax(sm, 0)
        m_safe = tl.where(b_m == float("-inf"), 0., b_m)
        b_l = rsum(sl * tl.exp2(sm - m_safe[None, :]), 0)
        inv_l = tl.where(b_l > 0, 1. / tl.where(b_l > 0, b_l, 1.), 0.)
        m_r = m_r & (b_l > 0)  # coarse normaliser: a head that sees no coarse key scores 0 (naive.py)
        num = o_b * BS - KS
        lo = tl.where(num < 0, 0, tl.maximum(num, 0) // ST + 1)
        hi = (o_b * BS + BS + ST - 1) // ST - 1
        for p in tl.static_range(P):
            o_j = lo + p
            ok_j = (o_j <= hi) & (o_j < Tc)
            p_k = kc + b.to(tl.int64) * stride_kcb + o_j.to(tl.int64)[:, None] * stride_kct + h * D + o_d[None, :]
            b_k = tl.load(p_k, mask=ok_j[:, None], other=0.).to(b_q.dtype)
            b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
            b_p = tl.where(ok_j[None, :] & m_r[:, None], tl.exp2(b_s - m_safe[:, None]) * inv_l[:, None], 0.)
            best = tl.where(ok_j, tl.maximum(best, rsum(b_p, 0)), best)
    causal = o_b <= qb
    forced = (o_b < INIT) | (o_b > qb - LOCAL)
    score = tl.where(forced, float("inf"), best)
    key = (orderable_int32(score).to(tl.int64) << 32) | (4294967295 - o_b.to(tl.int64))
    key = tl.where(causal, key, -9223372036854775807 - 1)
    tl.store(keys + i_bh.to(tl.int64) * NBMAX + o_b, key, mask=o_b < NBMAX)


@triton.jit
def _dec_attn_kernel(q, k, v, lens, idx, m_buf, l_buf, acc_buf, scale_log2, dense_len, Hkv, stride_qb, stride_kb,
                     stride_kt, K, G: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                     SPP: tl.constexpr, NSP: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // Hkv, i_bh % Hkv
    L = tl.load(lens + b)
    qb = (L - 1) // BS
    dense = L <= dense_len
    b_q, m_r = _load_q(q, b, h, stride_qb, G, BM, D)
    o_d = tl.arange(0, D)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.full([BM], 0, tl.float32)
    b_acc = tl.full([BM, D], 0, tl.float32)
    for i in range(0, SPP):
        slot = i_s * SPP + i
        # idx holds the top-K sort keys, unordered: the block id is in the low 32 bits
        key = tl.load(idx + i_bh.to(tl.int64) * K + slot, mask=(slot < K) & (~dense), other=-9223372036854775807 - 1)
        blk = tl.where(key == -9223372036854775807 - 1, -1, (4294967295 - (key & 4294967295)).to(tl.int32))
        blk = tl.where(dense, tl.where(slot <= qb, slot, -1), blk)
        if blk >= 0:
            o_k = blk * BS + tl.arange(0, BS)
            m_k = o_k < L
            p_k = k + b.to(tl.int64) * stride_kb + o_k.to(tl.int64)[:, None] * stride_kt + h * D + o_d[None, :]
            p_v = v + b.to(tl.int64) * stride_kb + o_k.to(tl.int64)[:, None] * stride_kt + h * D + o_d[None, :]
            b_k = tl.load(p_k, mask=m_k[:, None], other=0.).to(b_q.dtype)  # an fp8 cache widens here
            b_v = tl.load(p_v, mask=m_k[:, None], other=0.).to(b_q.dtype)
            b_s = tl.where(m_k[None, :], tl.dot(b_q, tl.trans(b_k)) * scale_log2, float("-inf"))
            m_new = tl.maximum(b_m, rmax(b_s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0., m_new)
            alpha = tl.exp2(b_m - m_safe)
            b_p = tl.exp2(b_s - m_safe[:, None])
            b_l = b_l * alpha + rsum(b_p, 1)
            b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
            b_m = m_new
    o_r = tl.arange(0, BM)
    o_buf = (i_bh * NSP + i_s) * BM + o_r
    tl.store(m_buf + o_buf, b_m)
    tl.store(l_buf + o_buf, b_l)
    tl.store(acc_buf + o_buf.to(tl.int64)[:, None] * D + o_d[None, :], b_acc)


@triton.jit
def _dec_merge_kernel(o, m_buf, l_buf, acc_buf, Hkv, stride_ob, G: tl.constexpr, BM: tl.constexpr,
                      D: tl.constexpr, NSP: tl.constexpr):
    i_bh = tl.program_id(0)
    b, h = i_bh // Hkv, i_bh % Hkv
    o_r = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    for s in range(0, NSP):
        b_m = tl.maximum(b_m, tl.load(m_buf + (i_bh * NSP + s) * BM + o_r))
    m_safe = tl.where(b_m == float("-inf"), 0., b_m)
    b_l = tl.full([BM], 0, tl.float32)
    b_acc = tl.full([BM, D], 0, tl.float32)
    for s in range(0, NSP):
        o_buf = (i_bh * NSP + s) * BM + o_r
        w = tl.exp2(tl.load(m_buf + o_buf) - m_safe)
        b_l += tl.load(l_buf + o_buf) * w
        b_acc += tl.load(acc_buf + o_buf.to(tl.int64)[:, None] * D + o_d[None, :]) * w[:, None]
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.)[:, None]
    m_r = o_r < G
    tl.store(o + b.to(tl.int64) * stride_ob + (h * G + o_r)[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty),
             mask=m_r[:, None])


@triton.jit
def _update_kc_kernel(k, kc, lens, Hkv, stride_kb, stride_kt, stride_kcb, stride_kct, D: tl.constexpr,
                      KS: tl.constexpr, ST: tl.constexpr):
    i_bh = tl.program_id(0)
    b, h = i_bh // Hkv, i_bh % Hkv
    L = tl.load(lens + b)
    if (L >= KS) & ((tl.maximum(L, KS) - KS) % ST == 0):
        j = (L - KS) // ST
        o_t = j * ST + tl.arange(0, KS)
        o_d = tl.arange(0, D)
        b_k = tl.load(k + b.to(tl.int64) * stride_kb + o_t.to(tl.int64)[:, None] * stride_kt + h * D + o_d[None, :])
        b_c = rsum(b_k.to(tl.float32), 0) / KS
        tl.store(kc + b.to(tl.int64) * stride_kcb + j.to(tl.int64) * stride_kct + h * D + o_d, b_c.to(kc.dtype.element_ty))


def update_compressed_cache(k_cache: torch.Tensor, kc_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                            kernel_size: int = 32, stride: int = 16) -> None:
    """Write, in place, the compressed key completed by the newest token of each sequence.

    k_cache [B, Tmax, Hkv, d] already holds the token at position L − 1 (L = cache_seqlens[b]);
    kc_cache [B, Tcmax, Hkv, d]. Window j = (L − kernel_size) / stride is written when that is a
    whole number ≥ 0, else nothing happens. Graph-capturable (the condition is tested on the device).
    """
    B, _, Hkv, D = k_cache.shape
    _update_kc_kernel[(B * Hkv,)](k_cache, kc_cache, cache_seqlens, Hkv, k_cache.stride(0), k_cache.stride(1),
                                  kc_cache.stride(0), kc_cache.stride(1), D=D, KS=kernel_size, ST=stride)


@triton.jit
def _topk_round_kernel(src, dst, n, stride_src, stride_dst, K: tl.constexpr, C: tl.constexpr):
    """One round: program c keeps the K largest of keys [c·C, c·C + C) of its row, in descending order."""
    r, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o = c * C + tl.arange(0, C)
    top = tl.sort(tl.load(src + r * stride_src + o, mask=o < n, other=-9223372036854775807 - 1), descending=True)
    i = tl.arange(0, C)
    tl.store(dst + r * stride_dst + c * K + i, top, mask=i < K)


def _topk_keys(keys: torch.Tensor, K: int) -> torch.Tensor:
    """The K largest of each row of int64 `keys` [R, n] (n ≥ K), in no particular order: [R, K].

    Rounds of sorting C keys per program and keeping K shrink a row C/K-fold each, until one
    program holds it all. Keys are unique (the block id is in their low bits), so the set is exact,
    and every shape comes from the capacity, so the launches can be captured in a CUDA graph.
    """
    if not DECODE_TOPK_CHUNK:
        return torch.topk(keys, K, dim=-1, sorted=False).values
    C = max(DECODE_TOPK_CHUNK, next_pow2(2 * K))
    R, n = keys.shape
    while True:
        last = n <= C
        width = next_pow2(n) if last else C
        programs = 1 if last else triton.cdiv(n, C)
        out = layout.empty((R, programs * K), torch.int64, keys.device)
        _topk_round_kernel[(R, programs)](keys, out, n, keys.stride(0), out.stride(0), K=K, C=width)
        if last:
            return out
        keys, n = out, programs * K


def check_decode_shapes(q, k_cache, v_cache, cache_seqlens) -> None:
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"decode takes q [B, 1, Hq, d], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be equal [B, Tmax, Hkv, d]")
    B, _, Hq, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be [B={B}], got {tuple(cache_seqlens.shape)}")


def triton_infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                           kc_cache: torch.Tensor | None = None, *, block_size: int = 64, topk: int = 96,
                           init_blocks: int = 1, local_blocks: int = 32, kernel_size: int = 32, stride: int = 16,
                           dense_len: int = 8192, scale: float | None = None, coarse_norm: bool = False) -> torch.Tensor:
    """One decode step. q [B, 1, Hq, d]; k/v_cache [B, Tmax, Hkv, d]; cache_seqlens int32 [B] -> o [B, 1, Hq, d].

    The caches may hold float8_e4m3fn (an fp8 K/V cache): the kernel widens each block it reads to q's dtype.

    kc_cache [B, ≥Tc(L), Hkv, d] (any float dtype; rounded to q's dtype in the kernel): compressed
    keys kept up to date with update_compressed_cache (computed from k_cache here when None, which
    costs a pass over the whole cache). For CUDA-graph capture pass the full-capacity buffers.
    coarse_norm (naive.py) builds each coarse key from 4 compressed ones: needs kernel_size % stride == 0.
    """
    check_decode_shapes(q, k_cache, v_cache, cache_seqlens)
    if coarse_norm and kernel_size % stride:
        raise ValueError(f"coarse_norm in decode needs kernel_size ({kernel_size}) divisible by stride ({stride})")
    B, _, Hq, D = q.shape
    _, Tmax, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    BM = max(16, next_pow2(G))
    scale = D ** -0.5 if scale is None else scale
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != D or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share strides with contiguous [Hkv, d] rows")
    if kc_cache is None:
        Tc = max(0, (Tmax - kernel_size) // stride + 1)
        kc_cache = k_cache.unfold(1, kernel_size, stride)[:, :Tc].float().mean(-1).to(q.dtype) if Tc else \
            q.new_zeros(B, 1, Hkv, D)
    q = q.reshape(B, Hq, D).contiguous()
    lens = cache_seqlens.to(torch.int32)
    NBMAX = (Tmax + block_size - 1) // block_size
    TnMAX = max(1, layout.n_compressed(Tmax, 4 * kernel_size, 4 * stride) if coarse_norm else kc_cache.shape[1])
    CH = DECODE_CH if TnMAX > DECODE_CH else max(16, next_pow2(TnMAX))
    NSP = (TnMAX + CH - 1) // CH
    sl2 = scale * LOG2E
    dev = q.device
    m_buf = layout.empty(B * Hkv * NSP * BM, torch.float32, dev)
    l_buf = layout.empty(B * Hkv * NSP * BM, torch.float32, dev)
    _dec_stats_kernel[(B * Hkv, NSP)](q, kc_cache, lens, m_buf, l_buf, sl2, dense_len, Hkv, q.stride(0),
                                      kc_cache.stride(0), kc_cache.stride(1), G=G, BM=BM, D=D, CH=CH,
                                      # coarse: 4 tiles per key block, so half the width fits shared memory at d = 128
                                      BC=min(CH, 32 if coarse_norm else 64), KS=kernel_size, ST=stride, NSP=NSP,
                                      COARSE=coarse_norm)
    BNB = 64 if NBMAX >= 64 else max(16, next_pow2(NBMAX))
    keys = layout.empty((B * Hkv, NBMAX), torch.int64, dev)
    _dec_score_kernel[(B * Hkv, triton.cdiv(NBMAX, BNB))](
        q, kc_cache, lens, m_buf, l_buf, keys, sl2, dense_len, Hkv, NBMAX, q.stride(0), kc_cache.stride(0),
        kc_cache.stride(1), G=G, BM=BM, D=D, BNB=BNB, P=sum(pool_shape(block_size, kernel_size, stride)), BS=block_size,
        KS=kernel_size, ST=stride, INIT=init_blocks, LOCAL=local_blocks, NSP=NSP, NSPP=next_pow2(NSP))
    K = min(topk, NBMAX)
    idx = _topk_keys(keys, K)  # the attention decodes the ids itself
    n_slots = max(K, min(NBMAX, (dense_len + block_size - 1) // block_size + 1))
    SPP = DECODE_SPP
    NSP2 = triton.cdiv(n_slots, SPP)
    m2 = layout.empty(B * Hkv * NSP2 * BM, torch.float32, dev)
    l2 = layout.empty(B * Hkv * NSP2 * BM, torch.float32, dev)
    acc2 = layout.empty((B * Hkv * NSP2 * BM, D), torch.float32, dev)
    _dec_attn_kernel[(B * Hkv, NSP2)](q, k_cache, v_cache, lens, idx, m2, l2, acc2, sl2, dense_len, Hkv, q.stride(0),
                                      k_cache.stride(0), k_cache.stride(1), K, G=G, BM=BM, D=D, BS=block_size,
                                      SPP=SPP, NSP=NSP2)
    o = layout.empty(q.shape, q.dtype, dev)
    _dec_merge_kernel[(B * Hkv,)](o, m2, l2, acc2, Hkv, o.stride(0), G=G, BM=BM, D=D, NSP=NSP2)
    return o.view(B, 1, Hq, D)
