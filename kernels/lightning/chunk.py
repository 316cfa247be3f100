"""Lightning attention in Triton: one fused chunked kernel for the forward and all three gradients.

The kernels use only builtins of triton.language (no tl.cdiv / tl.zeros / tl.sum, which are
themselves @triton.jit functions): under TRITON_INTERPRET=1 those break when triton was imported
before the variable was set, as happens when transformers is imported first.

Math and design: README.md beside this file. In short, one program owns one (sequence, head,
value block) and walks the sequence chunk by chunk, keeping the running state [K, BV] in fp32
registers the whole way: no chunk state ever goes to memory. The same kernel, run forward or
backward in time with its inputs renamed, gives o, dq, dk and dv (and d initial_state).

Shape legend: B batch, T tokens, H heads, K key head dim, V value head dim, N sequences,
BT chunk length, BK padded K, BV value block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from salaconvert.kernels._interpreter import fix_interpreter_index

fix_interpreter_index()

__all__ = ["chunk_lightning_attn"]

BT_DEFAULT = 64


def _empty(*shape, dtype, device):
    """Every output buffer comes from here, so that tests can poison them (fill with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)

# Benchmarks and tests override launch parameters here: BV, num_warps, num_stages (the walk),
# CPS (chunks per segment, 0 = no split), BV1, num_warps1, num_stages1 (pass 1 of the split).
TUNE: dict = {}


@triton.jit(do_not_specialize=["T", "NSEG", "CPS", "scale"])
def lightning_chunk_kernel(
    q, k, v, o, h0, ht, decay, cu_seqlens, scale, T, NSEG, CPS,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GQ: tl.constexpr, GK: tl.constexpr, GV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STATE_ONLY: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """o_t = scale · q_t S_t with S_t = γ S_{t-1} + k_tᵀ v_t, taken in time order, or against it if REVERSE.

    q, k: [*, H/GQ, K] and [*, H/GK, K] rows; v: [*, H/GV, V] rows; o: [*, H, V] rows; decay: [H]
    log γ. Head h reads head h // GX of an input with H/GX heads: GQA keys and values (GK = GV =
    the group) are shared by the query heads of a group, each of which keeps its own state and
    decay. Program (i_v, (n, s, h)) walks
    the CPS chunks of segment s of sequence n (NSEG segments; NSEG = 1 and CPS = the longest
    sequence's chunk count when the sequence is not split). h0, ht: [N, NSEG, H, K, V] fp32, the
    state entering / leaving each segment. STATE_ONLY: skip q and o, only accumulate the state
    (pass 1 of the split forward). REVERSE (the backward pass) differs in two places besides the
    direction: the initial state enters the first token undecayed (it is ∂L/∂S_T, not S_{-1}), and
    the stored final state is γ · scale · S, which is ∂L/∂S_{-1} when the inputs are (k, q, dO).
    """
    i_v, i_nsh = tl.program_id(0), tl.program_id(1)
    i_h = i_nsh % H
    i_ns = i_nsh // H
    i_n, i_s = i_ns // NSEG, i_ns % NSEG
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    seq_len = (eos - bos).to(tl.int32)
    NT = (seq_len + BT - 1) // BT
    b_g = tl.load(decay + i_h).to(tl.float32)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    # 64-bit: one sequence can hold more than 2^31 elements (1M tokens x 32 heads x 128).
    o_h = i_nsh.to(tl.int64) * K * V
    o_hkv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + o_h + o_hkv, mask=m_kv, other=0.0).to(tl.float32)

    if not REVERSE:
        # Forward in time, every chunk's rows sit at p = 0..BT-1, so the intra-chunk decay matrix
        # and the state→row factors are loop invariants (rows past a short chunk's end load as 0).
        of = o_i.to(tl.float32)
        b_dq_f = tl.exp(b_g * (of + 1.0))
        b_D_f = tl.where(o_i[:, None] >= o_i[None, :], tl.exp(b_g * tl.maximum(of[:, None] - of[None, :], 0.0)), 0.0)

    # The bound is a host-side int (the interpreter, and software pipelining, want a plain one);
    # chunks past this sequence's end have L = 0 and change nothing (loads masked, factors 1).
    for it in range(0, CPS):
        c = i_s * CPS + it                                       # chunk index in processing order
        if REVERSE:
            i_t = NT - 1 - c
        else:
            i_t = c
        L = tl.where(c < NT, tl.minimum(BT, seq_len - i_t * BT), 0)    # real length of this chunk
        m_t = o_i < L
        o_tok = bos + i_t * BT                                   # int64 index of the chunk's first token
        p_k = k + (o_tok * (H // GK) + i_h // GK) * K + o_i[:, None] * (H // GK * K) + o_k[None, :]
        p_v = v + (o_tok * (H // GV) + i_h // GV) * V + o_i[:, None] * (H // GV * V) + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_k = tl.load(p_k, mask=m_tk, other=0.0)
        b_v = tl.load(p_v, mask=m_tv, other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16: compute in fp32 there
            b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)

        if REVERSE:
            # p: position of each row in processing order; 0 on padding rows, so every decay
            # exponent is ≥ 0 and no factor exceeds 1. ∂L/∂S_T enters the first token without a γ.
            p = tl.where(m_t, L - 1 - o_i, 0)
            pf = p.to(tl.float32)
            sh = tl.where((c == 0) & (L > 0), 1.0, 0.0)
            b_dq = tl.exp(b_g * (pf + 1.0 - sh))                 # state → row: γ^(p+1)
            b_D = tl.where((p[:, None] >= p[None, :]) & m_t[:, None] & m_t[None, :],
                           tl.exp(b_g * tl.maximum(pf[:, None] - pf[None, :], 0.0)), 0.0)
            b_dc = tl.exp(b_g * (L.to(tl.float32) - sh))         # whole chunk: γ^L
        else:
            pf = o_i.to(tl.float32)
            b_dq = b_dq_f
            b_D = b_D_f
            b_dc = tl.exp(b_g * L.to(tl.float32))
        b_dk = tl.exp(b_g * tl.maximum((L - 1).to(tl.float32) - pf, 0.0))    # row → end of chunk: γ^(L-1-p)

        if not STATE_ONLY:
            p_q = q + (o_tok * (H // GQ) + i_h // GQ) * K + o_i[:, None] * (H // GQ * K) + o_k[None, :]
            b_q = tl.load(p_q, mask=m_tk, other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
            b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * b_D
            b_o = tl.dot(b_A.to(b_v.dtype), b_v, input_precision=DOT_PREC)
            b_o += tl.dot((b_q * b_dq[:, None]).to(b_q.dtype), b_h.to(b_q.dtype), input_precision=DOT_PREC)
            p_o = o + (o_tok * H + i_h) * V + o_i[:, None] * (H * V) + o_v[None, :]
            tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_tv)

        b_h = b_h * b_dc + tl.dot(tl.trans((b_k * b_dk[:, None]).to(b_k.dtype)), b_v, input_precision=DOT_PREC)

    if STORE_HT:
        if REVERSE:
            if not STATE_ONLY:  # pass 1 stores the raw segment sum; the scan applies this
                # an empty sequence leaves S_{-1} = S_T: its gradient passes through with no γ
                b_h = b_h * (tl.where(seq_len > 0, tl.exp(b_g), 1.0) * scale)
        tl.store(ht + o_h + o_hkv, b_h, mask=m_kv)


@triton.jit(do_not_specialize=["T_VIEW", "FIRST_CUT", "NSEG", "SEG_LEN", "scale"])
def lightning_segment_scan_kernel(
    hs, h0, ht, decay, scale, T_VIEW, FIRST_CUT, NSEG, SEG_LEN,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Pass 2 of the split walk: turn each segment's own state into the state entering it, in place.

    hs: [N, NSEG, H, K, V] fp32, on entry each segment's contribution decayed to its end, on exit
    the state entering it: S_{s+1} = γ^n(s) S_s + ΔS_s, S_0 = h0 (or 0). n(s), the decay steps
    across segment s, is min(SEG_LEN, T_VIEW - s·SEG_LEN), less FIRST_CUT for s = 0: forward
    T_VIEW = T and FIRST_CUT = 0; in reverse the padding of the last chunk comes first, and the
    incoming gradient state skips one γ, so T_VIEW = NT·BT and FIRST_CUT = padding + 1.
    ht gets S_NSEG (times γ·scale in reverse, as the chunk kernel stores it).
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    b_g = tl.load(decay + i_h).to(tl.float32)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_hkv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_hkv, mask=m_kv, other=0.0)
    for i_s in range(0, NSEG):
        p_s = hs + ((i_n * NSEG + i_s) * H + i_h).to(tl.int64) * K * V + o_hkv
        b_d = tl.load(p_s, mask=m_kv, other=0.0)
        tl.store(p_s, b_h, mask=m_kv)
        n_dec = tl.minimum(SEG_LEN, T_VIEW - i_s * SEG_LEN) - tl.where(i_s == 0, FIRST_CUT, 0)
        b_h = b_h * tl.exp(b_g * n_dec.to(tl.float32)) + b_d
    if STORE_HT:
        if REVERSE:
            b_h = b_h * (tl.exp(b_g) * scale)
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_hkv, b_h, mask=m_kv)


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _block_v(V: int, programs_per_block: int, device: torch.device) -> int:
    """Value-block width: 64 when that already fills the GPU, narrower when there are too few programs."""
    BV = min(64, max(16, triton.next_power_of_2(V)))
    while BV > 16 and programs_per_block * triton.cdiv(V, BV) < _sms(device):
        BV //= 2
    return BV


def _chunks_per_segment(N: int, H: int, NT: int, device: torch.device) -> int:
    """Chunks per segment for the split walk, or 0 to walk each sequence in one program.

    Splitting costs one more read of two inputs (pass 1), 4 × K·V·4 bytes of state traffic per
    segment and a sequential scan over the segments, but multiplies the programs by the number of
    segments: worth it when N·H alone leaves most of the GPU idle (B=1 prefill). H100 sweeps
    (benchmarks/notes-lightning.md), B=1, H=32, d=128: no split was best at N·H = 128; at 8K
    tokens 32 chunks per segment (4 segments) beat 8 and 16; at 32K 64 beat 32 and 128; at 256K
    128 beat 32 and 64. So: about 2 programs per SM, between 32 and 128 chunks per segment.
    """
    if "CPS" in TUNE:
        return TUNE["CPS"]
    sms = _sms(device)
    if device.type != "cuda" or 2 * N * H > sms:
        return 0
    ideal = triton.next_power_of_2(triton.cdiv(NT * N * H, 2 * sms))
    cps = min(128, max(32, ideal))
    if 2 * N * H * triton.cdiv(NT, cps) < sms:      # small problems: parallelism first
        cps = max(8, ideal)
    return cps if NT > cps else 0


def lightning_chunk_launch(q, k, v, decay, scale, h0, cu_seqlens, *, reverse=False, store_ht=False, out=None):
    """Launch the chunk kernel(s). q, k: [B, T, Hq, K], [B, T, Hk, K]; v: [B, T, Hv, V], each head
    count dividing H, the largest; h0: [N, H, K, V] fp32 or None.

    Returns (o [B, T, H, V] in v's dtype unless `out` is given, ht [N, H, K, V] fp32 or None).
    """
    B, T, _, K = q.shape
    V = v.shape[-1]
    H = max(x.shape[2] for x in (q, k, v))
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    o = _empty(B, T, H, V, dtype=v.dtype, device=v.device) if out is None else out
    ht = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_ht else None
    BT = TUNE.get("BT", BT_DEFAULT)
    BK = max(16, triton.next_power_of_2(K))
    common = dict(
        H=H, K=K, V=V, GQ=H // q.shape[2], GK=H // k.shape[2], GV=H // v.shape[2],
        BT=BT, BK=BK, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
    )
    NT = triton.cdiv(T, BT)
    cps = 0 if cu_seqlens is not None else _chunks_per_segment(N, H, NT, q.device)
    if cps and NT > cps:
        # Split walk: pass 1 sums each segment's kᵀv (decayed to the segment's end), pass 2
        # chains those into the state entering each segment, pass 3 is the usual walk per segment.
        # Segments follow the processing order, so in reverse segment 0 holds the sequence's end.
        NSEG = triton.cdiv(NT, cps)
        hs = _empty(N, NSEG, H, K, V, dtype=torch.float32, device=q.device)
        BV1 = TUNE.get("BV1", min(128, max(16, triton.next_power_of_2(V))))
        lightning_chunk_kernel[(triton.cdiv(V, BV1), N * NSEG * H)](
            q, k, v, o, None, hs, decay, cu_seqlens, scale, T, NSEG, cps, BV=BV1,
            USE_H0=False, STORE_HT=True, STATE_ONLY=True, **common,
            num_warps=TUNE.get("num_warps1", 4), num_stages=TUNE.get("num_stages1", 2),
        )
        BKS, BVS = min(32, BK), min(64, max(16, triton.next_power_of_2(V)))
        t_view, first_cut = (NT * BT, NT * BT - T + 1) if reverse else (T, 0)
        lightning_segment_scan_kernel[(triton.cdiv(K, BKS), triton.cdiv(V, BVS), N * H)](
            hs, h0, ht, decay, scale, t_view, first_cut, NSEG, cps * BT, H=H, K=K, V=V, BK=BKS, BV=BVS,
            REVERSE=reverse, USE_H0=h0 is not None, STORE_HT=store_ht, num_warps=4,
        )
        BV = TUNE.get("BV", min(128, max(16, triton.next_power_of_2(V))))
        lightning_chunk_kernel[(triton.cdiv(V, BV), N * NSEG * H)](
            q, k, v, o, hs, None, decay, cu_seqlens, scale, T, NSEG, cps, BV=BV,
            USE_H0=True, STORE_HT=False, STATE_ONLY=False, **common,
            num_warps=TUNE.get("num_warps", 8), num_stages=TUNE.get("num_stages", 3),
        )
        return o, ht
    if cu_seqlens is None:
        max_len = T
    else:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if N > 0 else 0
    BV = TUNE.get("BV") or _block_v(V, N * H, q.device)
    lightning_chunk_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, o, h0, ht, decay, cu_seqlens, scale, T, 1, triton.cdiv(max_len, BT), BV=BV,
        USE_H0=h0 is not None, STORE_HT=store_ht, STATE_ONLY=False, **common,
        num_warps=TUNE.get("num_warps", 4), num_stages=TUNE.get("num_stages", 2),
    )
    return o, ht


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
        decay = decay.float().contiguous()
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, ht = lightning_chunk_launch(q, k, v, decay, scale, h0, cu_seqlens, store_ht=output_final_state)
        ctx.save_for_backward(q, k, v, decay, h0, cu_seqlens)
        ctx.scale = scale
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, decay, h0, cu_seqlens = ctx.saved_tensors
        scale = ctx.scale
        do = do.to(q.dtype).contiguous()
        # dq_t = scale · dO_t S_tᵀ: the forward recurrence with (q, k, v, S0) → (dO, v, k, S0ᵀ).
        h0_t = None if h0 is None else h0.transpose(-1, -2).contiguous()
        dq, _ = lightning_chunk_launch(do, v, k, decay, scale, h0_t, cu_seqlens, out=_empty(*q.shape, dtype=q.dtype, device=q.device))
        # G_t = ∂L/∂S_t runs backward in time: G_t = γ G_{t+1} + scale · q_tᵀ dO_t, G_{T-1} ∋ dS_final.
        # dk_t = G_t v_t and dv_t = G_tᵀ k_t are that recurrence read by v and by k. The kernel
        # scales its whole output, so the final-state gradient goes in divided by scale.
        g0 = None if dht is None else (dht.float() / scale)
        g0_t = None if g0 is None else g0.transpose(-1, -2).contiguous()
        dk, _ = lightning_chunk_launch(v, do, q, decay, scale, g0_t, cu_seqlens, reverse=True, out=_grad_out(q, k))
        need_dh0 = ctx.needs_input_grad[5]
        dv, dh0 = lightning_chunk_launch(
            k, q, do, decay, scale, None if g0 is None else g0.contiguous(), cu_seqlens,
            reverse=True, store_ht=need_dh0, out=_grad_out(q, v),
        )
        if dh0 is not None and ctx.initial_state_dtype is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return dq, _group_sum(dk, k), _group_sum(dv, v), None, None, dh0, None, None


def _grad_out(q, x):
    """The buffer for x's gradient: x's own shape, or one row per query head in fp32 when x has
    fewer heads (GQA), summed over each group by `_group_sum`."""
    if x.shape[2] == q.shape[2]:
        return _empty(*x.shape, dtype=x.dtype, device=x.device)
    return _empty(*q.shape[:3], x.shape[3], dtype=torch.float32, device=x.device)


def _group_sum(dx, x):
    if dx.shape == x.shape:
        return dx
    B, T, Hx, d = x.shape
    return dx.view(B, T, Hx, -1, d).sum(3).to(x.dtype)


def chunk_lightning_attn(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Lightning attention through the fused Triton kernels, differentiable in q, k, v and initial_state.

    q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V] with Hkv dividing H (GQA: query head h
    reads key/value head h // (H/Hkv) and keeps its own state); bf16, fp16 or fp32 (k and v are
    cast to q's dtype; the dots accumulate in fp32, the state is fp32).
    decay: [H] log-decay (negative, γ = exp(decay)); scale defaults to K**-0.5.
    initial_state: [N, H, K, V] fp32 or None; cu_seqlens: [N+1] int offsets of N sequences packed
    along T (then B == 1), else N = B.
    Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None).
    """
    B, T, H, K = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[:2] != (B, T) or H % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected [B,T,H,K], [B,T,Hkv,K], [B,T,Hkv,V] with Hkv dividing H")
    # Mixed dtypes (say fp32 q, k after a norm and RoPE, bf16 v) run in q's dtype, o's dtype.
    k, v = k.to(q.dtype), v.to(q.dtype)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (sequences packed along T), got B={B}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    return LightningAttnFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), decay.to(q.device), scale, initial_state, output_final_state, cu_seqlens
    )
