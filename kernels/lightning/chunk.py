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

from salaconvert.kernels.lightning._triton_compat import patch_interpreter

patch_interpreter()

__all__ = ["chunk_lightning_attn"]

BT_DEFAULT = 64


def _empty(*shape, dtype, device):
    """Every output buffer comes from here, so that tests can poison them (fill with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)

# Benchmarks override launch parameters here ({"BV": 32, "num_warps": 4, "num_stages": 2}).
TUNE: dict = {}


@triton.jit(do_not_specialize=["T", "NT_MAX", "scale"])
def lightning_chunk_kernel(
    q, k, v, o, h0, ht, decay, cu_seqlens, scale, T, NT_MAX,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """o_t = scale · q_t S_t with S_t = γ S_{t-1} + k_tᵀ v_t, taken in time order, or against it if REVERSE.

    q, k: [*, H, K] rows; v, o: [*, H, V] rows; h0, ht: [N, H, K, V] fp32; decay: [H] log γ.
    REVERSE (the backward pass) differs in two places besides the direction: the initial state
    enters the first token undecayed (it is ∂L/∂S_T, not S_{-1}), and the stored final state is
    γ · scale · S, which is ∂L/∂S_{-1} when the inputs are (k, q, dO).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
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
    o_h = i_nh.to(tl.int64) * K * V
    o_hkv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.full([BK, BV], 0.0, dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + o_h + o_hkv, mask=m_kv, other=0.0).to(tl.float32)

    # The loop runs to the longest sequence's chunk count (a host-side int: the interpreter, and
    # software pipelining, want a plain bound); chunks past this sequence's end have L = 0 and
    # change nothing (all loads masked, all decay factors 1).
    for it in range(0, NT_MAX):
        if REVERSE:
            i_t = NT - 1 - it
        else:
            i_t = it
        L = tl.where(it < NT, tl.minimum(BT, seq_len - i_t * BT), 0)   # real length of this chunk
        m_t = o_i < L
        # p: position of each row in processing order (0 = first processed); 0 on padding rows,
        # so every decay exponent below is ≥ 0 and no factor exceeds 1.
        if REVERSE:
            p = tl.where(m_t, L - 1 - o_i, 0)
            # the gradient state ∂L/∂S_T enters the first processed token without a γ
            sh = tl.where(it == 0, 1.0, 0.0)
        else:
            p = o_i
            sh = 0.0
        o_row = (bos + i_t * BT) * H + i_h                       # int64 row index of the chunk's first token
        p_q = q + o_row * K + o_i[:, None] * (H * K) + o_k[None, :]
        p_k = k + o_row * K + o_i[:, None] * (H * K) + o_k[None, :]
        p_v = v + o_row * V + o_i[:, None] * (H * V) + o_v[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(p_q, mask=m_tk, other=0.0)
        b_k = tl.load(p_k, mask=m_tk, other=0.0)
        b_v = tl.load(p_v, mask=m_tv, other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16: compute in fp32 there
            b_q, b_k, b_v = b_q.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32)

        pf = p.to(tl.float32)
        b_dq = tl.exp(b_g * (pf + 1.0 - sh))                     # state → row i: γ^(p+1)
        b_dk = tl.exp(b_g * ((L - 1).to(tl.float32) - pf))       # row j → end of chunk: γ^(L-1-p)
        b_dc = tl.exp(b_g * (L.to(tl.float32) - sh))             # whole chunk: γ^L
        m_A = (p[:, None] >= p[None, :]) & m_t[:, None] & m_t[None, :]
        b_D = tl.where(m_A, tl.exp(b_g * tl.maximum(pf[:, None] - pf[None, :], 0.0)), 0.0)

        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * b_D
        b_o = tl.dot(b_A.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_o += tl.dot((b_q * b_dq[:, None]).to(b_q.dtype), b_h.to(b_q.dtype), input_precision=DOT_PREC)
        p_o = o + o_row * V + o_i[:, None] * (H * V) + o_v[None, :]
        tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_tv)

        b_h = b_h * b_dc + tl.dot(tl.trans((b_k * b_dk[:, None]).to(b_k.dtype)), b_v, input_precision=DOT_PREC)

    if STORE_HT:
        if REVERSE:
            b_h = b_h * (tl.exp(b_g) * scale)
        tl.store(ht + o_h + o_hkv, b_h, mask=m_kv)


def _block_v(V: int, programs_per_block: int, device: torch.device) -> int:
    """Value-block width: 64 when that already fills the GPU, narrower when there are too few programs."""
    BV = min(64, max(16, triton.next_power_of_2(V)))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while BV > 16 and programs_per_block * triton.cdiv(V, BV) < sms:
            BV //= 2
    return BV


def lightning_chunk_launch(q, k, v, decay, scale, h0, cu_seqlens, *, reverse=False, store_ht=False, out=None):
    """Launch the chunk kernel. q, k: [B, T, H, K]; v: [B, T, H, V]; h0: [N, H, K, V] fp32 or None.

    Returns (o [B, T, H, V] in v's dtype unless `out` is given, ht [N, H, K, V] fp32 or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    o = _empty(B, T, H, V, dtype=v.dtype, device=v.device) if out is None else out
    ht = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_ht else None
    BK = max(16, triton.next_power_of_2(K))
    BV = TUNE.get("BV") or _block_v(V, N * H, q.device)
    grid = (triton.cdiv(V, BV), N * H)
    BT = TUNE.get("BT", BT_DEFAULT)
    if cu_seqlens is None:
        max_len = T
    else:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if N > 0 else 0
    lightning_chunk_kernel[grid](
        q, k, v, o, h0, ht, decay, cu_seqlens, scale, T, triton.cdiv(max_len, BT),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        REVERSE=reverse, USE_H0=h0 is not None, STORE_HT=store_ht, IS_VARLEN=cu_seqlens is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
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
        dk, _ = lightning_chunk_launch(v, do, q, decay, scale, g0_t, cu_seqlens, reverse=True, out=_empty(*k.shape, dtype=k.dtype, device=k.device))
        need_dh0 = ctx.needs_input_grad[5]
        dv, dh0 = lightning_chunk_launch(
            k, q, do, decay, scale, None if g0 is None else g0.contiguous(), cu_seqlens,
            reverse=True, store_ht=need_dh0, out=_empty(*v.shape, dtype=v.dtype, device=v.device),
        )
        if dh0 is not None and ctx.initial_state_dtype is not None:
            dh0 = dh0.to(ctx.initial_state_dtype)
        return dq, dk, dv, None, None, dh0, None, None


def chunk_lightning_attn(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Lightning attention through the fused Triton kernels, differentiable in q, k, v and initial_state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; bf16, fp16 or fp32, all one dtype (math in fp32).
    decay: [H] log-decay (negative, γ = exp(decay)); scale defaults to K**-0.5.
    initial_state: [N, H, K, V] fp32 or None; cu_seqlens: [N+1] int offsets of N sequences packed
    along T (then B == 1), else N = B.
    Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] fp32 or None).
    """
    B, T, H, K = q.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (sequences packed along T), got B={B}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    return LightningAttnFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), decay.to(q.device), scale, initial_state, output_final_state, cu_seqlens
    )
