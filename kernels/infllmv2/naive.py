"""Pure-PyTorch reference of InfLLM-V2 block-sparse attention (SPEC §2, §6).

Every convention (causality of compressed keys, ties, padding, the dense/sparse switch) is written
down in README.md beside this file; the Triton kernels must reproduce this file exactly.

Legend: B batch, Tq queries, Tk keys, Hq query heads, Hkv key/value heads, G = Hq // Hkv (group),
d head dim, Tc compressed keys, NB key blocks, K = topk.
Queries are the LAST Tq positions of the key sequence: query i sits at absolute position
Tk − Tq + i (decode is Tq = 1, chunked prefill is Tq < Tk).

Memory: queries are processed in chunks so that no chunk holds more than ~2^24 scores, so the
reference never materialises a whole [Tq, Tk] matrix per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK_ELEMS = 1 << 24


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cfg: dict) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, T, heads, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, Tq, Hq, d = q.shape
    Bk, Tk, Hkv, dk = k.shape
    if B != Bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch or head dim")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hkv}")
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk}): queries are the last Tq key positions")
    if cfg["topk"] < cfg["init_blocks"] + cfg["local_blocks"]:
        raise ValueError(f"topk={cfg['topk']} < init_blocks + local_blocks = {cfg['init_blocks'] + cfg['local_blocks']}")
    if cfg["local_blocks"] < 1:
        raise ValueError("local_blocks must be >= 1: it counts the query's own block")
    if cfg["kernel_size"] < 1 or cfg["stride"] < 1 or cfg["block_size"] < 1:
        raise ValueError("kernel_size, stride and block_size must be >= 1")


def compress_k(k: torch.Tensor, kernel_size: int = 32, stride: int = 16) -> torch.Tensor:
    """Mean-pooled compressed keys. k [B, Tk, Hkv, d] -> kc [B, Tc, Hkv, d] in fp32.

    kc[j] = mean(k[j*stride : j*stride + kernel_size]); Tc = max(0, (Tk - kernel_size) // stride + 1):
    only whole windows exist.
    """
    B, Tk, H, d = k.shape
    Tc = max(0, (Tk - kernel_size) // stride + 1)
    if Tc == 0:
        return k.new_zeros(B, 0, H, d, dtype=torch.float32)
    # Sums of g-token pieces (g = gcd), then each window's kernel_size / g pieces: no window copy
    # (an unfolded [Tc, H, d, kernel_size] copy is 2× the keys in fp32: 8.6 GB at 1M tokens).
    if k.element_size() == 1:  # fp8 storage (the cache's --kv-cache fp8): not every device's sum reads fp8
        k = k.float()
    g = math.gcd(kernel_size, stride)
    step, n_pieces = stride // g, (Tc - 1) * (stride // g) + kernel_size // g
    pieces = k[:, :n_pieces * g].reshape(B, n_pieces, g, H, d).sum(2, dtype=torch.float32)
    total = pieces[:, 0:(Tc - 1) * step + 1:step].clone()
    for i in range(1, kernel_size // g):
        total += pieces[:, i:i + (Tc - 1) * step + 1:step]
    return total / kernel_size


def _overlap_table(NB: int, Tc: int, block_size: int, kernel_size: int, stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block b, the compressed keys whose window overlaps it: idx [NB, P], valid [NB, P].

    Window j covers [j*stride, j*stride + kernel_size); block b covers [b*bs, (b+1)*bs). With the
    defaults (64/32/16) that is j in [4b-1, 4b+3]: max-pool of width 5, stride 4, padding 1.
    """
    b = torch.arange(NB, device=device)
    lo = torch.clamp(torch.div(b * block_size - kernel_size, stride, rounding_mode="floor") + 1, min=0)
    hi = torch.div((b + 1) * block_size + stride - 1, stride, rounding_mode="floor") - 1  # ceil(...) - 1
    P = max(1, int((hi - lo).max()) + 1) if NB else 1
    idx = lo[:, None] + torch.arange(P, device=device)[None, :]
    valid = (idx <= hi[:, None]) & (idx < Tc)
    return idx.clamp(max=max(Tc - 1, 0)), valid


def coarse_pool(cfg: dict) -> tuple[int, int]:
    """Kernel and stride of the coarse keys of the approximate normaliser: 4× the fine ones (128/64)."""
    return 4 * cfg["kernel_size"], 4 * cfg["stride"]


def _softmax_stats(q: torch.Tensor, kn: torch.Tensor, pos: torch.Tensor, ks: int, st: int, scale: float):
    """Per-row softmax max and sum over the causally visible keys kn [B, Tn, Hkv, d] (window ks/st).

    Returns m, l [B, C, Hkv, G, 1]; m = 0 and l = 0 for rows that see no key."""
    B, C, Hq, d = q.shape
    Hkv = kn.shape[2]
    qg = q.float().view(B, C, Hkv, Hq // Hkv, d)
    s = torch.einsum("bchgd,bjhd->bchgj", qg, kn.float()) * scale
    vis = (torch.arange(kn.shape[1], device=q.device)[None, :] * st + ks - 1) <= pos[:, None]  # [C, Tn]
    s = s.masked_fill(~vis[None, :, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True) if kn.shape[1] else s.new_full(s.shape[:-1] + (1,), float("-inf"))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m, torch.exp(s - m).sum(-1, keepdim=True)


def _block_scores(q: torch.Tensor, kc: torch.Tensor, pos: torch.Tensor, NB: int, cfg: dict, scale: float,
                  kc_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Block scores for one query chunk. q [B, C, Hq, d], kc [B, Tc, Hkv, d], pos [C] absolute.

    Returns [B, C, Hkv, NB] fp32: forced blocks +inf, blocks after the query's own -inf, blocks
    with no causally visible compressed key -inf (still candidates), the rest the max-pooled
    group-summed compressed-attention probability. `kc_norm` (coarse keys, cfg["coarse_norm"])
    replaces the softmax normaliser by the one over the coarse keys visible at each position.
    """
    B, C, Hq, d = q.shape
    Tc, Hkv = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    bs, ks, st = cfg["block_size"], cfg["kernel_size"], cfg["stride"]
    qb = torch.div(pos, bs, rounding_mode="floor")  # [C] the query's own block
    blk = torch.full((B, C, Hkv, NB), float("-inf"), device=q.device)
    if Tc > 0:
        qg = q.float().view(B, C, Hkv, G, d)
        s = torch.einsum("bchgd,bjhd->bchgj", qg, kc) * scale  # [B, C, Hkv, G, Tc]
        j = torch.arange(Tc, device=q.device)
        # compressed key j is visible to the query at t once its whole window has been seen
        vis = (j[None, :] * st + ks - 1) <= pos[:, None]  # [C, Tc]
        s = s.masked_fill(~vis[None, :, None, None, :], float("-inf"))
        if kc_norm is None:
            p = torch.softmax(s, dim=-1).nan_to_num(0.0).sum(3)  # [B, C, Hkv, Tc]; rows with nothing visible -> 0
        else:
            m, l = _softmax_stats(q, kc_norm, pos, *coarse_pool(cfg), scale)
            p = torch.where(l > 0, torch.exp(s - m) / torch.where(l > 0, l, 1.0), 0.0).sum(3)
        p = p.masked_fill(~vis[None, :, None, :], float("-inf"))
        idx, valid = _overlap_table(NB, Tc, bs, ks, st, q.device)
        pooled = p[..., idx].masked_fill(~valid, float("-inf")).amax(-1)  # [B, C, Hkv, NB]
        blk = pooled
    b = torch.arange(NB, device=q.device)
    causal = b[None, :] <= qb[:, None]  # [C, NB]
    forced = (b[None, :] < cfg["init_blocks"]) | (b[None, :] > qb[:, None] - cfg["local_blocks"])
    blk = blk.masked_fill((forced & causal)[None, :, None, :], float("inf"))
    blk = blk.masked_fill(~causal[None, :, None, :], float("-inf"))
    return blk


def _topk_blocks(blk: torch.Tensor, qb: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k of block scores by (score desc, block id asc), returned ascending, −1 padded.

    blk [B, C, Hkv, NB]; qb [C]. Non-candidate blocks (after the query's own) are −inf and have
    larger ids than every candidate, so a stable descending sort puts them last.
    """
    B, C, H, NB = blk.shape
    order = torch.sort(blk, dim=-1, descending=True, stable=True).indices[..., :topk]
    n_cand = torch.clamp(qb + 1, max=NB)  # [C]
    keep = torch.arange(order.shape[-1], device=blk.device)[None, :] < n_cand[:, None]  # [C, K']
    order = torch.where(keep[None, :, None, :], order, torch.full_like(order, NB))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == NB, torch.full_like(order, -1), order)
    if order.shape[-1] < topk:
        order = F.pad(order, (0, topk - order.shape[-1]), value=-1)
    return order.to(torch.int32)


def _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm=False) -> dict:
    return dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                kernel_size=kernel_size, stride=stride, dense_len=dense_len, coarse_norm=bool(coarse_norm))


def _norm_keys(k: torch.Tensor, cfg: dict) -> torch.Tensor | None:
    return compress_k(k, *coarse_pool(cfg)) if cfg["coarse_norm"] else None


def _chunk_len(Hq: int, Tk: int) -> int:
    return max(1, min(4096, _CHUNK_ELEMS // max(1, Hq * Tk)))


def _select_one(q, k, cfg, scale, kc=None):
    B, Tq, Hq, d = q.shape
    Tk = k.shape[1]
    NB = (Tk + cfg["block_size"] - 1) // cfg["block_size"]
    if kc is None:
        kc = compress_k(k, cfg["kernel_size"], cfg["stride"])
    kc = kc.float()
    kn = _norm_keys(k, cfg)
    out = []
    C = _chunk_len(Hq, max(kc.shape[1], NB))
    for s0 in range(0, Tq, C):
        pos = torch.arange(Tk - Tq + s0, Tk - Tq + min(Tq, s0 + C), device=q.device)
        blk = _block_scores(q[:, s0:s0 + C], kc, pos, NB, cfg, scale, kn)
        out.append(_topk_blocks(blk, torch.div(pos, cfg["block_size"], rounding_mode="floor"), cfg["topk"]))
    return torch.cat(out, 1)


def naive_infllmv2_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, topk: int = 96,
                          init_blocks: int = 1, local_blocks: int = 32, kernel_size: int = 32, stride: int = 16,
                          dense_len: int = 8192, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                          kc: torch.Tensor | None = None, coarse_norm: bool = False) -> torch.Tensor:
    """Blocks each query token attends to, shared by the query heads of one KV group.

    q [B, Tq, Hq, d], k [B, Tk, Hkv, d] (Tq ≤ Tk, queries end-aligned) -> int32 [B, Tq, Hkv, topk],
    each row ascending block ids, −1 padding. `dense_len` is accepted for signature symmetry but
    ignored: selection is always computed. `kc` optionally gives precomputed compressed keys
    [B, Tc, Hkv, d] (a decode cache). With `cu_seqlens` (int [N+1]), B = 1, Tq = Tk and the
    sequences are packed; block ids are relative to each sequence's start. `coarse_norm` takes the
    softmax normaliser over coarse compressed keys (4× kernel and stride: 128/64) instead of the
    exact one (README, step 5).
    """
    cfg = _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm)
    _check(q, k, None, cfg)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        if cu_seqlens is None:
            return _select_one(q, k, cfg, scale, kc)
        _check_varlen(q, k, cu_seqlens)
        bounds = cu_seqlens.tolist()
        return torch.cat([_select_one(q[:, a:b], k[:, a:b], cfg, scale) for a, b in zip(bounds[:-1], bounds[1:])], 1)


def _check_varlen(q, k, cu_seqlens):
    if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
        raise ValueError("cu_seqlens needs B = 1 and Tq = Tk (packed prefill)")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[1]:
        raise ValueError(f"cu_seqlens must run from 0 to T={q.shape[1]}, got {cu_seqlens.tolist()}")


def _attend_chunk(qc, k, v, allowed, scale):
    """qc [B, C, Hq, d]; k, v [B, Tk, Hkv, d]; allowed bool [B, C, Hkv, Tk] -> [B, C, Hq, d] fp32."""
    B, C, Hq, d = qc.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qg = qc.float().view(B, C, Hkv, G, d)
    s = torch.einsum("bchgd,bthd->bchgt", qg, k.float()) * scale
    s = s.masked_fill(~allowed[:, :, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bchgt,bthd->bchgd", p, v.float())
    return o.reshape(B, C, Hq, d)


def _attn_one(q, k, v, cfg, scale, block_indices=None):
    B, Tq, Hq, d = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    bs = cfg["block_size"]
    sparse = Tk > cfg["dense_len"]
    t = torch.arange(Tk, device=q.device)
    C = _chunk_len(Hq, Tk)
    outs = []
    for s0 in range(0, Tq, C):
        qc = q[:, s0:s0 + C]
        pos = torch.arange(Tk - Tq + s0, Tk - Tq + s0 + qc.shape[1], device=q.device)
        allowed = (t[None, :] <= pos[:, None])[None, :, None, :].expand(B, -1, Hkv, -1)  # [B, C, Hkv, Tk]
        if sparse:
            with torch.no_grad():
                NB = (Tk + bs - 1) // bs
                kc = compress_k(k, cfg["kernel_size"], cfg["stride"])
                if block_indices is None:
                    blk = _block_scores(qc, kc, pos, NB, cfg, scale, _norm_keys(k, cfg))
                    idx = _topk_blocks(blk, torch.div(pos, bs, rounding_mode="floor"), cfg["topk"]).long()
                else:
                    idx = block_indices[:, s0:s0 + C].long()
                sel = torch.zeros(B, qc.shape[1], Hkv, NB + 1, dtype=torch.bool, device=q.device)
                sel.scatter_(-1, torch.where(idx < 0, NB, idx), True)
                tok = sel[..., :NB].repeat_interleave(bs, -1)[..., :Tk]
            allowed = allowed & tok
        outs.append(_attend_chunk(qc, k, v, allowed, scale))
    return torch.cat(outs, 1).to(q.dtype)


def naive_infllmv2_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64, topk: int = 96,
                        init_blocks: int = 1, local_blocks: int = 32, kernel_size: int = 32, stride: int = 16,
                        dense_len: int = 8192, scale: float | None = None,
                        cu_seqlens: torch.Tensor | None = None,
                        block_indices: torch.Tensor | None = None, coarse_norm: bool = False) -> torch.Tensor:
    """InfLLM-V2 attention, reference. q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] -> o [B, Tq, Hq, d].

    Queries are the last Tq key positions (end-aligned causal). Tk ≤ dense_len: dense causal
    attention. Above: each query attends exactly (softmax) to the tokens of its selected blocks
    (naive_infllmv2_select), causal inside its own block. Differentiable in q, k, v (selection is
    a discrete choice: no gradient flows through it). Computed in fp32, returned in q's dtype.
    With `cu_seqlens` (int [N+1]): B = 1, Tq = Tk, packed sequences, each treated independently
    (the dense/sparse switch looks at each sequence's own length). `block_indices`
    ([B, Tq, Hkv, K], −1 padded) replaces the selection on the sparse path (to test stage 2 alone).
    `coarse_norm`: as in naive_infllmv2_select.
    """
    cfg = _cfg(block_size, topk, init_blocks, local_blocks, kernel_size, stride, dense_len, coarse_norm)
    _check(q, k, v, cfg)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _attn_one(q, k, v, cfg, scale, block_indices)
    _check_varlen(q, k, cu_seqlens)
    bounds = cu_seqlens.tolist()
    bi = (lambda a, b: None) if block_indices is None else (lambda a, b: block_indices[:, a:b])
    return torch.cat([_attn_one(q[:, a:b], k[:, a:b], v[:, a:b], cfg, scale, bi(a, b))
                      for a, b in zip(bounds[:-1], bounds[1:])], 1)


def dense_causal_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """End-aligned dense causal attention in fp32 (test oracle). Shapes as naive_infllmv2_attn."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tq, Tk = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    qh = q.float().transpose(1, 2)
    kh = k.float().repeat_interleave(G, 2).transpose(1, 2)
    vh = v.float().repeat_interleave(G, 2).transpose(1, 2)
    mask = torch.arange(Tk)[None, :] <= (torch.arange(Tq)[:, None] + Tk - Tq)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to(q.device), scale=scale)
    return o.transpose(1, 2).to(q.dtype)



def naive_infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                          kc_cache: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """One decode step, reference: row b is naive_infllmv2_attn of q[b] against the first
    cache_seqlens[b] cached tokens. q [B, 1, Hq, d], caches [B, Tmax, Hkv, d] -> [B, 1, Hq, d].
    `kc_cache` is accepted for signature symmetry and ignored (recomputed from k). Caches of another
    dtype (an fp8 cache) are widened to q's."""
    if q.dim() != 4 or q.shape[1] != 1 or cache_seqlens.shape != (q.shape[0],):
        raise ValueError(f"decode takes q [B, 1, Hq, d] and cache_seqlens [B], got {tuple(q.shape)}, "
                         f"{tuple(cache_seqlens.shape)}")
    outs = []
    for b, L in enumerate(cache_seqlens.tolist()):
        k, v = (c[b:b + 1, :L].to(q.dtype) for c in (k_cache, v_cache))
        outs.append(naive_infllmv2_attn(q[b:b + 1], k, v, **kw))
    return torch.cat(outs, 0)


__all__ = ["naive_infllmv2_attn", "naive_infllmv2_select", "naive_infllmv2_decode", "compress_k", "dense_causal_attn"]
