"""Host-side bookkeeping shared by the InfLLM-V2 Triton kernels: the sequence table, query tiles and
the block-major CSRs (block_segments, chosen_segments).

Every call is reduced to N sequences over flattened rows: sequence n owns query rows
[q_start[n], q_start[n] + Tq[n]) and key rows [k_start[n], k_start[n] + Tk[n]); its queries are the
last Tq[n] key positions (query i sits at absolute position Tk[n] − Tq[n] + i). A batch [B, Tq]
against [B, Tk] is N = B sequences; `cu_seqlens` packs N sequences with Tq = Tk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from salaconvert.kernels.infllmv2.naive import compress_k


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
    q_start_list: list[int]
    k_start_list: list[int]

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
    i64 = [to_device(x, torch.int64, device) for x in (qs, ks, kcs)]
    i32 = [to_device(x, torch.int32, device) for x in (tq, tk, tc)]
    return Seqs(*i64, *i32, tq, tk, tc, qs, ks)


def to_device(row: list[int] | torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A host-built table of integers (a list, or a CPU tensor) on `device` without waiting for the
    GPU's queue.

    A plain copy from pageable host memory (torch.tensor(..., device="cuda"), .to("cuda")) makes the
    host wait until every queued kernel has run, and the GPU then idles while Python prepares the
    next launch: in a chunked prefill at 256K that was ~19 waits per sparse-layer call, about 1 s of
    idle GPU (benchmarks/notes-long-context.md). From pinned memory the copy is queued like a kernel.
    Each table is an allocation of its own, so the kernels see the same pointer alignment every call
    (one compiled variant).
    """
    host = torch.as_tensor(row, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def with_windows(seqs: Seqs, kernel_size: int, stride: int) -> Seqs:
    """The same sequences with the compressed-key rows of another window (the coarse normaliser's)."""
    tc = [n_compressed(t, kernel_size, stride) for t in seqs.Tk_list]
    kcs = [0]
    for c in tc[:-1]:
        kcs.append(kcs[-1] + c)
    dev = seqs.Tc.device
    return Seqs(seqs.q_start, seqs.k_start, to_device(kcs, torch.int64, dev), seqs.Tq, seqs.Tk,
                to_device(tc, torch.int32, dev), seqs.Tq_list, seqs.Tk_list, tc, seqs.q_start_list, seqs.k_start_list)


def make_tiles(seqs: Seqs, BT: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tiles of BT tokens that never cross a sequence: (seq id int32 [M], first local query int32 [M])."""
    ns, i0s = [], []
    for n, t in enumerate(seqs.Tq_list):
        cnt = (t + BT - 1) // BT
        ns.append(torch.full((cnt,), n, dtype=torch.int32))
        i0s.append(torch.arange(cnt, dtype=torch.int32) * BT)
    return to_device(torch.cat(ns), torch.int32, device), to_device(torch.cat(i0s), torch.int32, device)


def compress_k_flat(k: torch.Tensor, seqs: Seqs, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean-pooled compressed keys of every sequence, flattened: [sum Tc, Hkv, d] in k's dtype.

    k is [Nk, Hkv, d] (flattened rows). The mean is taken in fp32 and rounded once.
    """
    out = []
    for ks, tk, tc in zip(seqs.k_start_list, seqs.Tk_list, seqs.Tc_list):
        if tc == 0:
            continue
        out.append(compress_k(k[None, ks:ks + tk], kernel_size, stride)[0, :tc].to(k.dtype))
    if not out:
        return k.new_zeros(0, k.shape[1], k.shape[2])
    return torch.cat(out, 0).contiguous()


def empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fully write comes from here, so tests can NaN-poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def seq_of_rows(seqs: Seqs, device) -> torch.Tensor:
    """int64 [Nq]: the sequence each flattened query row belongs to."""
    return torch.repeat_interleave(torch.arange(seqs.n, device=device), seqs.Tq.long().to(device),
                                   output_size=sum(seqs.Tq_list))  # known here: no wait for the device


def block_segments(idx: torch.Tensor, seqs: Seqs, block_size: int, dense_len: int, seg: int):
    """CSR of (KV head, sequence, block) -> the query rows that attend to it, cut into segments of ≤ seg rows.

    idx int32 [Nq, Hkv, K]: each query row's selected blocks (−1 anywhere: none). Sequences at or
    under dense_len attend to every causal block instead (their rows of one block form one range).
    Returns tok_list int32 (query rows; positions no segment covers hold none) and the per-segment
    (h, n, b, lo, hi) tensors (lo/hi: positions in tok_list). The backward's dk/dv CSR; sizes depend
    on the data (the host waits for them once per backward).
    """
    dev = idx.device
    Nq, Hkv, K = idx.shape
    N = seqs.n
    NBMAX = max((t + block_size - 1) // block_size for t in seqs.Tk_list)
    seq_of_row = seq_of_rows(seqs, dev)
    dense_ids = [n for n, t in enumerate(seqs.Tk_list) if t <= dense_len]
    groups = []  # (group id, lo, hi): lo/hi into tok_list
    tok_parts = []
    base = 0
    if len(dense_ids) < N:  # sparse sequences: sort (h, n, b, row) keys of every valid selection entry
        dense_seq = seqs.Tk.to(dev) <= dense_len
        valid = (idx >= 0) & ~dense_seq[seq_of_row][:, None, None]
        r = torch.arange(Nq, device=dev, dtype=torch.int64)[:, None, None].expand(Nq, Hkv, K)
        h = torch.arange(Hkv, device=dev, dtype=torch.int64)[None, :, None].expand(Nq, Hkv, K)
        g = (h * N + seq_of_row[:, None, None]) * NBMAX + idx.long()
        none = torch.iinfo(torch.int64).max
        key = torch.sort(torch.where(valid, g * Nq + r, none).flatten()).values
        tok_parts.append((key % Nq).to(torch.int32))  # the invalid entries sort last: no segment holds them
        gid, counts = torch.unique_consecutive(key // Nq, return_counts=True)
        ends = torch.cumsum(counts, 0)
        groups.append((gid, ends - counts, torch.where(gid == none // Nq, ends - counts, ends)))
        base = key.numel()
    # dense sequences: every causal (row, block) pair; rows of one block are one range
    if dense_ids:
        tok_parts.append(torch.arange(Nq, device=dev, dtype=torch.int32))
    for n in dense_ids:
        qs, tq, tk = seqs.q_start_list[n], seqs.Tq_list[n], seqs.Tk_list[n]
        b = torch.arange((tk + block_size - 1) // block_size, device=dev, dtype=torch.int64)
        lo = base + qs + torch.clamp(b * block_size - (tk - tq), min=0)
        hi = torch.full_like(lo, base + qs + tq)
        keep = lo < hi
        b, lo, hi = b[keep], lo[keep], hi[keep]
        for hh in range(Hkv):
            groups.append(((hh * N + n) * NBMAX + b, lo, hi))
    if not groups:
        z = torch.zeros(0, dtype=torch.int64, device=dev)
        return torch.zeros(1, dtype=torch.int32, device=dev), z, z, z, z, z
    gid, glo, ghi = (torch.cat(x) for x in zip(*groups))
    nseg = (ghi - glo + seg - 1) // seg
    rep = torch.repeat_interleave(torch.arange(gid.numel(), device=dev), nseg)
    first = torch.cumsum(nseg, 0) - nseg
    lo = glo[rep] + (torch.arange(rep.numel(), device=dev) - first[rep]) * seg
    hi = torch.minimum(lo + seg, ghi[rep])
    gid = gid[rep]
    return (torch.cat(tok_parts), (gid // (N * NBMAX)).int(), ((gid // NBMAX) % N).int(), (gid % NBMAX).int(),
            lo, hi)


def chosen_segments(idx: torch.Tensor, seqs: Seqs, r0: int, block_size: int, seg: int, most: int):
    """The block-major CSR of query rows r0 … r0 + R − 1 (every sequence sparse), each size fixed by
    the shapes, so the host never waits for the device (by_block.py's inference forward).

    idx int32 [R, Hkv, K]: those rows' entries (−1 anywhere: none), at most `most` per (row, KV head).
    Returns tok_list int32 [R·Hkv·K] (the valid entries' query rows, ordered by (KV head, sequence,
    block) and by row within), slot int64 [R, Hkv, K] (each entry's position in tok_list, −1: none)
    and S segments' (h, n, b) int32 and (lo, hi) int64 (positions in tok_list): the rows of each
    (KV head, sequence, block) cut into runs of ≤ seg. S = ⌈E / seg⌉ + min(groups, E) with
    E = R·Hkv·most bounds the real count; the segments past the last are empty (lo = hi = 0).
    """
    dev = idx.device
    R, Hkv, K = idx.shape
    N = seqs.n
    NB = max((t + block_size - 1) // block_size for t in seqs.Tk_list)
    n_groups = Hkv * N * NB
    if n_groups >= 2 ** 31 - 1:
        raise ValueError(f"{Hkv} KV heads × {N} sequences × {NB} blocks: more block groups than int32 holds")
    seq = seq_of_rows(seqs, dev)[r0:r0 + R].int()
    h = torch.arange(Hkv, device=dev, dtype=torch.int32)[None, :, None]
    valid = idx >= 0
    group = torch.where(valid, (h * N + seq[:, None, None]) * NB + idx, n_groups)
    group, order = torch.sort(group.flatten(), stable=True)  # rows stay ascending within a group
    tok_list = (torch.div(order, Hkv * K, rounding_mode="floor") + r0).int()
    slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
    slot = torch.where(valid, slot.view(R, Hkv, K), -1)
    bounds = torch.searchsorted(group, torch.arange(n_groups + 1, device=dev, dtype=torch.int32))
    nseg = (bounds[1:] - bounds[:-1] + seg - 1) // seg
    upto = torch.cumsum(nseg, 0)  # segments of the groups up to each one
    E = R * Hkv * most
    s = torch.arange((E + seg - 1) // seg + min(n_groups, E), device=dev)
    g = torch.searchsorted(upto, s, right=True).clamp_(max=n_groups - 1)
    real = s < upto[-1]
    lo = torch.where(real, bounds[g] + (s - upto[g] + nseg[g]) * seg, 0)
    hi = torch.where(real, torch.minimum(lo + seg, bounds[g + 1]), 0)
    return tok_list, slot, (g // (N * NB)).int(), ((g // NB) % N).int(), (g % NB).int(), lo, hi
