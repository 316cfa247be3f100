"""Host-side bookkeeping shared by the InfLLM-V2 Triton kernels: the sequence table and query tiles.

Every call is reduced to N sequences over flattened rows: sequence n owns query rows
[q_start[n], q_start[n] + Tq[n]) and key rows [k_start[n], k_start[n] + Tk[n]); its queries are the
last Tq[n] key positions (query i sits at absolute position Tk[n] − Tq[n] + i). A batch [B, Tq]
against [B, Tk] is N = B sequences; `cu_seqlens` packs N sequences with Tq = Tk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Seqs:
    q_start: torch.Tensor   # int64 [N]
    k_start: torch.Tensor   # int64 [N]
    kc_start: torch.Tensor  # int64 [N] first compressed-key row of each sequence
    Tq: torch.Tensor        # int32 [N]
    Tk: torch.Tensor        # int32 [N]
    Tc: torch.Tensor        # int32 [N] compressed keys per sequence
    Tq_list: list[int]
    Tk_list: list[int]
    Tc_list: list[int]

    @property
    def n(self) -> int:
        return len(self.Tq_list)


def n_compressed(Tk: int, kernel_size: int, stride: int) -> int:
    return max(0, (Tk - kernel_size) // stride + 1)


def pool_shape(block_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(R, E): windows starting in each block, and windows of the previous block reaching into it.
    The Triton kernels' max-pool (select.py) needs stride | block_size, stride | kernel_size and E <= R."""
    if block_size % stride or kernel_size % stride or not stride <= kernel_size <= block_size + stride:
        raise ValueError(f"block_size {block_size}, kernel_size {kernel_size}, stride {stride}: the kernels need "
                         "block_size and kernel_size multiples of stride, stride <= kernel_size <= block_size + stride")
    R = block_size // stride
    if R & (R - 1):
        raise ValueError(f"block_size / stride = {R}: the kernels need a power of two")
    return R, kernel_size // stride - 1


def make_seqs(B: int, Tq: int, Tk: int, cu_seqlens: torch.Tensor | None, kernel_size: int, stride: int,
              device) -> Seqs:
    if cu_seqlens is None:
        tq, tk = [Tq] * B, [Tk] * B
        qs = [i * Tq for i in range(B)]
        ks = [i * Tk for i in range(B)]
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        qs = bounds[:-1]
        ks = bounds[:-1]
        tq = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        tk = list(tq)
    tc = [n_compressed(t, kernel_size, stride) for t in tk]
    kcs = [0]
    for c in tc[:-1]:
        kcs.append(kcs[-1] + c)
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return Seqs(torch.tensor(qs, **i64), torch.tensor(ks, **i64), torch.tensor(kcs, **i64),
                torch.tensor(tq, **i32), torch.tensor(tk, **i32), torch.tensor(tc, **i32), tq, tk, tc)


def with_windows(seqs: Seqs, kernel_size: int, stride: int) -> Seqs:
    """The same sequences with the compressed-key rows of another window (the coarse normaliser's)."""
    tc = [n_compressed(t, kernel_size, stride) for t in seqs.Tk_list]
    kcs = [0]
    for c in tc[:-1]:
        kcs.append(kcs[-1] + c)
    dev = seqs.Tc.device
    return Seqs(seqs.q_start, seqs.k_start, torch.tensor(kcs, dtype=torch.int64, device=dev), seqs.Tq, seqs.Tk,
                torch.tensor(tc, dtype=torch.int32, device=dev), seqs.Tq_list, seqs.Tk_list, tc)


def make_tiles(seqs: Seqs, BT: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tiles of BT tokens that never cross a sequence: (seq id int32 [M], first local query int32 [M])."""
    ns, i0s = [], []
    for n, t in enumerate(seqs.Tq_list):
        cnt = (t + BT - 1) // BT
        ns.append(torch.full((cnt,), n, dtype=torch.int32))
        i0s.append(torch.arange(cnt, dtype=torch.int32) * BT)
    return torch.cat(ns).to(device), torch.cat(i0s).to(device)


def compress_k_flat(k: torch.Tensor, seqs: Seqs, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean-pooled compressed keys of every sequence, flattened: [sum Tc, Hkv, d] in k's dtype.

    k is [Nk, Hkv, d] (flattened rows). The mean is taken in fp32 and rounded once.
    """
    out = []
    for ks, tk, tc in zip(seqs.k_start.tolist(), seqs.Tk_list, seqs.Tc_list):
        if tc == 0:
            continue
        seg = k[ks:ks + tk]
        out.append(seg.unfold(0, kernel_size, stride)[:tc].float().mean(-1).to(k.dtype))
    if not out:
        return k.new_zeros(0, k.shape[1], k.shape[2])
    return torch.cat(out, 0).contiguous()


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here, so tests can NaN-poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
