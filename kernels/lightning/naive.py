"""Pure-PyTorch Lightning attention: the token-by-token reference and the chunked CPU path.

Math (per head h, γ_h = exp(decay_h), decay_h < 0):
    S_t = γ_h · S_{t-1} + k_tᵀ v_t          S: [dk, dv] fp32
    o_t = scale · q_t S_t                  the current token is included

Shape legend: B batch, T tokens, H heads, K key/query head dim, V value head dim,
N sequences (B, or len(cu_seqlens) - 1 when packed), C chunk length, M number of chunks.
"""
from __future__ import annotations

import torch

__all__ = ["naive_lightning_attn", "chunk_lightning_attn_torch", "naive_lightning_attn_step"]


def _check(q, k, v, decay, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    Hkv, V = v.shape[2], v.shape[-1]
    if k.shape != (B, T, Hkv, K) or v.shape[:2] != (B, T) or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected [B,T,H,K], [B,T,Hkv,K], [B,T,Hkv,V] with Hkv dividing H")
    if decay.shape != (H,):
        raise ValueError(f"decay {tuple(decay.shape)}: expected [H]={H}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (sequences packed along T), got B={B}")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"initial_state {tuple(initial_state.shape)}: expected [N,H,K,V]=({N},{H},{K},{V})")
    return N


def _per_query_head(q, *kv):
    """GQA: each key/value head repeated for the query heads of its group (every head keeps its own state)."""
    group = q.shape[2] // kv[0].shape[2]
    return tuple(x.repeat_interleave(group, dim=2) for x in kv) if group > 1 else kv


def _segments(T: int, cu_seqlens) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def naive_lightning_attn(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Exact token-by-token recurrence in fp32 (slow; the reference every other path is tested against).

    q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V], Hkv dividing H (query head h reads
    key/value head h // (H/Hkv)); decay: [H] log-decay (negative); initial_state: [N, H, K, V] fp32.
    Returns o [B, T, H, V] in q's dtype and final_state [N, H, K, V] fp32 (None unless output_final_state).
    With cu_seqlens ([N+1] int, B == 1) the N sequences are packed along T and each starts from its own state.
    """
    _check(q, k, v, decay, initial_state, cu_seqlens)
    k, v = _per_query_head(q, k, v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    gamma = decay.float().exp()[:, None, None]                           # [H, 1, 1]
    qf, kf, vf = q.float(), k.float(), v.float()
    rows = []                                                            # one [T_row, H, V] per batch row
    finals = []
    for b in range(B):
        segs = _segments(T, cu_seqlens)
        row = []
        for n, (bos, eos) in enumerate(segs):
            i_n = b if cu_seqlens is None else n
            S = q.new_zeros(H, K, V, dtype=torch.float32) if initial_state is None else initial_state[i_n].float()
            for t in range(bos, eos):
                S = gamma * S + kf[b, t, :, :, None] * vf[b, t, :, None, :]
                row.append(scale * torch.einsum("hk,hkv->hv", qf[b, t], S))
            finals.append(S)
        rows.append(torch.stack(row) if row else q.new_zeros(0, H, V, dtype=torch.float32))
    o = torch.stack(rows)
    final = torch.stack(finals) if output_final_state else None
    return o.to(q.dtype), final


def _chunk_one(q, k, v, decay, scale, S0, C):
    """One sequence, chunked. q, k: [H, T, K]; v: [H, T, V] fp32; S0: [H, K, V] fp32 or None.

    Full chunks are processed together as batched matmuls; only the state hand-off between chunks
    is a Python loop (T/C small [H,K,V] updates). The ragged tail (T mod C tokens) is one more chunk
    of its own length, so no padding ever decays the state. All decay factors are γ^n with n ≥ 0,
    never γ^-n: no overflow for strongly decaying heads.
    """
    H, T, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(H, K, V) if S0 is None else S0
    Mfull, tail = divmod(T, C)
    o_parts = []
    for L, M, start in ((C, Mfull, 0), (tail, 1 if tail else 0, Mfull * C)):
        if M == 0:
            continue
        stop = start + M * L
        qc = q[:, start:stop].reshape(H, M, L, K)
        kc = k[:, start:stop].reshape(H, M, L, K)
        vc = v[:, start:stop].reshape(H, M, L, V)
        pos = torch.arange(L, device=q.device, dtype=torch.float32)
        d = decay.float()[:, None]                                          # [H, 1]
        diff = pos[:, None] - pos[None, :]                                  # i - j
        causal = diff >= 0
        D = torch.where(causal, (d[:, :, None] * diff.clamp_min(0)).exp(), torch.zeros((), device=q.device))  # [H, L, L]
        q_decay = (d * (pos + 1)).exp()                                     # γ^(i+1): [H, L]
        k_decay = (d * (L - 1 - pos)).exp()                                 # γ^(L-1-j): [H, L]
        chunk_decay = (decay.float() * L).exp()[:, None, None]              # γ^L: [H, 1, 1]
        A = torch.einsum("hmik,hmjk->hmij", qc, kc) * D[:, None]
        o_intra = torch.einsum("hmij,hmjv->hmiv", A, vc)
        KV = torch.einsum("hmjk,hmjv->hmkv", kc * k_decay[:, None, :, None], vc)  # each chunk's own state
        states = []
        for m in range(M):
            states.append(S)
            S = chunk_decay * S + KV[:, m]
        Sm = torch.stack(states, dim=1)                                     # state entering each chunk: [H, M, K, V]
        o_inter = torch.einsum("hmik,hmkv->hmiv", qc * q_decay[:, None, :, None], Sm)
        o_parts.append((o_intra + o_inter).reshape(H, M * L, V))
    o = torch.cat(o_parts, dim=1) if o_parts else q.new_zeros(H, 0, V)
    return scale * o, S


def chunk_lightning_attn_torch(q, k, v, decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """Chunked Lightning attention in PyTorch: same contract as `naive_lightning_attn`, differentiable.

    Within a chunk: masked decayed attention (q kᵀ ⊙ γ^(i-j)) v; across chunks: the carried state.
    Internal math in fp32; o is returned in q's dtype, final_state in fp32. This is the CPU path for
    prefill and training.
    """
    _check(q, k, v, decay, initial_state, cu_seqlens)
    k, v = _per_query_head(q, k, v)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))          # [B, H, T, *]
    outs, finals = [], []
    if cu_seqlens is None:
        for b in range(B):
            S0 = None if initial_state is None else initial_state[b].float()
            o_b, S = _chunk_one(qf[b], kf[b], vf[b], decay, scale, S0, chunk_size)
            outs.append(o_b)
            finals.append(S)
        o = torch.stack(outs)                                                # [B, H, T, V]
    else:
        for n, (bos, eos) in enumerate(_segments(T, cu_seqlens)):
            S0 = None if initial_state is None else initial_state[n].float()
            o_n, S = _chunk_one(qf[0, :, bos:eos], kf[0, :, bos:eos], vf[0, :, bos:eos], decay, scale, S0, chunk_size)
            outs.append(o_n)
            finals.append(S)
        o = torch.cat(outs, dim=1)[None]
    final = torch.stack(finals) if output_final_state else None
    return o.transpose(1, 2).to(q.dtype), final


def naive_lightning_attn_step(q, k, v, decay, state, scale=None):
    """One decode step. q: [B, 1, H, K]; k: [B, 1, Hkv, K]; v: [B, 1, Hkv, V]; state: [B, H, K, V]
    fp32, updated in place.

    Returns o [B, 1, H, V] in q's dtype.
    """
    k, v = _per_query_head(q, k, v)
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    gamma = decay.float().exp()[None, :, None, None]
    kv = k[:, 0].float()[..., :, None] * v[:, 0].float()[..., None, :]     # [B, H, K, V]
    state.mul_(gamma).add_(kv)
    o = scale * torch.einsum("bhk,bhkv->bhv", q[:, 0].float(), state)
    return o[:, None].to(q.dtype)
