"""InfLLM-V2 kernels vs dense SDPA vs fla's NSA, in one run on one GPU (issue 4).

    python benchmarks/infllmv2.py --out DIR [--quick] [--sweep] [--budget S] [--deadline S]
    TRITON_INTERPRET=1 python benchmarks/infllmv2.py --out DIR --smoke --sweep   # CPU: every row, tiny

Shapes: B = 1, Hq = 32, Hkv = 2 (plus a Hkv = 8 row), d = 128, bf16, causal, block 64.
Ours at the SPEC budget (96 blocks: init 1 + local 32 + 63 chosen) and at NSA's budget
(16 blocks: init 1 + local 4 + 11 chosen). fla `parallel_nsa` computes its own compression and
top-16 selection (gates on, no sliding window), as in ../shared/anchors. SDPA is torch's own
backend choice (cuDNN on an H100: 1.8x faster than its flash backend there, results/sdpa_backends-*)
over K/V expanded to 32 heads, the anchors' call; the meta row names the backend taken. Times are
medians of CUDA-event timed calls after a warm-up call. Writes DIR/infllmv2-<card>.json and prints
one JSON line per number.

--sweep adds, at 128K for group 16 (Hkv = 2) and group 4 (Hkv = 8), every knob variant of
kernels/infllmv2 (selection top-k / BC / warps / coarse normaliser, attention tile tokens × warps,
decode splits), the selection agreement of the coarse normaliser with the exact one, and the
time split between stages. Past --deadline seconds every further row is recorded as skipped, so
the JSON is always written. --smoke shrinks every shape (CPU interpreter check of the script).
Section 'real' (--only real) times stage 2 on block lists chosen by SmolLM2-135M on real text
next to the random inputs' lists (real_rows; --real-model, --real-data); 'select_tiles' and
'attn_tiles' sweep the scoring and attention tiles (rows × warps × stages, keys per step) at 128K;
'floor' times stage 2's forward kernel next to the same walk with loads only (floor_rows).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

H, HKV, D = 32, 2, 128
DT = torch.bfloat16
DEV = "cuda"
OURS96 = dict(topk=96, init_blocks=1, local_blocks=32)
OURS16 = dict(topk=16, init_blocks=1, local_blocks=4)
RESULTS: list[dict] = []
BUDGET_S = 1.5  # timing budget per row (--budget)
DEADLINE = float("inf")  # time.time() after which rows are skipped (--deadline)
LEN = lambda T: T  # noqa: E731  (--smoke maps every length to a tiny one)


def smoke_mode():
    """Tiny shapes for a CPU run under TRITON_INTERPRET=1: every code path of the script, no timing value."""
    global H, HKV, D, DT, DEV, LEN
    H, HKV, D, DT, DEV = 4, 2, 16, torch.float32, "cpu"
    small = dict(block_size=16, kernel_size=8, stride=4, dense_len=0)
    OURS96.update(small, topk=6, local_blocks=3)
    OURS16.update(small, topk=4, local_blocks=2)
    LEN = lambda T: max(96, T // 1024)  # noqa: E731


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rec(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def timed(fn) -> float:
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def median_ms(fn, reps: int) -> float:
    """Median of `reps` timed calls after one untimed one (the A/B scripts' measure)."""
    fn()
    sync()
    return statistics.median(timed(fn) for _ in range(reps))


def load_file(path, name: str):
    """A module from a file (an older version of one of ours, for the A/B scripts)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ab_args(doc: str, what: str) -> argparse.Namespace:
    """The arguments of an A/B script that times an older `what` (a file) against the installed one;
    --smoke switches this module to its CPU shapes."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--old", required=True, help=f"the other {what}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.smoke:
        smoke_mode()
    return args


def bench(fn, budget_s: float | None = None, max_reps: int = 30) -> float:
    """Median ms of fn() over as many calls as fit in budget_s (at least 3), after one warm-up."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    fn()
    sync()
    first = timed(fn)
    reps = 1 if first > 2000 or DEV != "cuda" else int(min(max_reps, max(3, budget_s * 1e3 / max(first, 1e-3))))
    return statistics.median([timed(fn) for _ in range(reps)])


def late(what, **meta) -> bool:
    """Past the deadline: record the row as skipped."""
    if time.time() > DEADLINE:
        rec(what=what, skipped="deadline", **meta)
        return True
    return False


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def safe(what, fn, **meta):
    if late(what, **meta):
        return None
    try:
        ms = bench(fn)
        rec(what=what, ms=round(ms, 4), **meta)
        return ms
    except Exception as ex:  # keep the run going: one failing row must not lose the others
        rec(what=what, error=repr(ex)[:300], **meta)
        empty_cache()
        return None


def safe_graph(what, step, **meta):
    """`safe` for one decode step captured in a CUDA graph: the replay is timed."""
    try:
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as ex:
        rec(what=what, error=repr(ex)[:300], **meta)
        return None
    return safe(what, graph.replay, **meta)


def inputs(T, hkv=None, grad=False):
    hkv = HKV if hkv is None else hkv
    g = torch.Generator(device=DEV).manual_seed(T)
    q = torch.randn(1, T, H, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, T, hkv, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, T, hkv, D, device=DEV, dtype=DT, generator=g)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def sdpa_fn(q, k, v, backward=False):
    G = q.shape[2] // k.shape[2]
    # contiguous [B, H, T, d] with K/V expanded to every query head: SDPA's fastest layout (anchors)
    qh = q.detach().transpose(1, 2).contiguous().requires_grad_(backward)
    kh = k.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_(backward)
    vh = v.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_(backward)

    def run():
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        if backward:
            o.backward(torch.ones_like(o))
    return run


def sdpa_choice() -> str | None:
    """The backend SDPA's own dispatch takes for the benchmark's causal forward."""
    if DEV != "cuda":
        return None
    from torch.nn.attention import SDPBackend
    q = torch.randn(1, H, 4096, D, device=DEV, dtype=DT)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, True)).name


def nsa_fn(q, k, v, backward=False):
    gate = torch.rand(1, q.shape[1], H, device=DEV, dtype=DT)
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))

    def run():
        from fla.ops.nsa import parallel_nsa  # here, so that a missing fla is one failing row
        o = parallel_nsa(qq, kk, vv, g_cmp=gate, g_slc=gate, block_counts=16, block_size=64)
        if backward:
            o.backward(torch.ones_like(o))
    return run


def ours_fn(q, k, v, cfg, backward=False, block_indices=None):
    """Selection and attention, or with block_indices (this selection's lists) stage 2 alone."""
    from salaconvert.kernels.infllmv2.parallel import attend_selected, parallel_infllmv2_attn
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))

    def run():
        if block_indices is None:
            o = parallel_infllmv2_attn(qq, kk, vv, **cfg)
        else:
            o = attend_selected(qq, kk, vv, block_indices, **cfg)
        if backward:
            o.backward(torch.ones_like(o))
    return run


def forward_rows(lengths, hkv=HKV, with_nsa=True, with_16=True):
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    for T in lengths:
        q, k, v = inputs(T, hkv)
        meta = dict(T=T, Hkv=hkv, mode="fwd")
        with torch.no_grad():
            sd = safe("sdpa_dense", sdpa_fn(q, k, v), **meta)
            ours = safe("ours_96", ours_fn(q, k, v, OURS96), **meta)
            sel = safe("ours_96_select", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
            idx = parallel_infllmv2_select(q, k, **OURS96)
            att = safe("ours_96_attend", ours_fn(q, k, v, OURS96, block_indices=idx), **meta)
            if T <= LEN(131072) and hkv == HKV:
                from salaconvert.kernels.infllmv2 import parallel as par
                tokens = par.ATTN_TOKENS
                for t in (1, 4):
                    par.ATTN_TOKENS = t
                    safe(f"ours_96_attend_rows{t * 16}", ours_fn(q, k, v, OURS96, block_indices=idx), **meta)
                par.ATTN_TOKENS = tokens
            # the top-k part of the selection alone (fp32 scores): the radix kernel vs torch.topk + tie fix-up
            from salaconvert.kernels.infllmv2 import select as selmod
            NB, K = T // 64, min(OURS96["topk"], T // 64)
            scores = torch.rand(T, hkv, NB, device=DEV)
            out = torch.full((T, hkv, OURS96["topk"]), -1, dtype=torch.int32, device=DEV)
            safe("ours_96_select_topk_part_radix",
                 lambda: selmod.radix_topk(scores.view(-1, NB), out.view(-1, out.shape[-1]), K), **meta)
            safe("ours_96_select_topk_part_torch", lambda: selmod.scores_to_blocks(scores, K), **meta)
            del scores, out
            with knobs(selmod, FP32_TOPK="torch"):
                safe("ours_96_select_torch_topk", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
            del idx
            if sd and ours:
                rec(what="speedup_vs_sdpa", ratio=round(sd / ours, 3), select_share=round((sel or 0) / ours, 3),
                    attend_share=round((att or 0) / ours, 3), **meta)
            if with_16:
                o16 = safe("ours_16", ours_fn(q, k, v, OURS16), **meta)
                if with_nsa:
                    nsa = safe("fla_nsa_16", nsa_fn(q, k, v), **meta)
                    if o16 and nsa:
                        rec(what="speedup_16_vs_nsa", ratio=round(nsa / o16, 3), **meta)
        del q, k, v
        empty_cache()


def variant_rows(T=None):
    """Launch/tile variants of the same work, for choosing defaults (attend-only on fixed blocks)."""
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2 import select as sel
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    T = LEN(131072) if T is None else T
    q, k, v = inputs(T)
    meta = dict(T=T, Hkv=HKV, mode="fwd")
    with torch.no_grad():
        idx = parallel_infllmv2_select(q, k, **OURS96)
        saved = (par.ATTN_TOKENS, par.ATTN_WARPS, sel.SELECT_BC)
        for tokens in (1, 4):
            for warps in (4, 8):
                par.ATTN_TOKENS, par.ATTN_WARPS = tokens, warps
                safe(f"variant_attend_tokens{tokens}_warps{warps}", ours_fn(q, k, v, OURS96, block_indices=idx), **meta)
        par.ATTN_TOKENS, par.ATTN_WARPS, _ = saved
        for bc in (64, 128):
            sel.SELECT_BC = bc
            safe(f"variant_select_bc{bc}", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
        sel.SELECT_BC = saved[2]
    meta = dict(T=LEN(32768), Hkv=HKV, mode="fwd+bwd")
    q, k, v = inputs(LEN(32768))
    for tokens in (1, 4):
        par.ATTN_TOKENS = tokens
        safe(f"variant_fwdbwd_tokens{tokens}", ours_fn(q, k, v, OURS96, backward=True), **meta)
    par.ATTN_TOKENS = saved[0]
    del q, k, v, idx
    empty_cache()


class knobs:
    """Set module knobs for a block, restore them after (even on error)."""

    def __init__(self, mod, **values):
        self.mod, self.values = mod, values

    def __enter__(self):
        self.saved = {n: getattr(self.mod, n) for n in self.values}
        for n, x in self.values.items():
            setattr(self.mod, n, x)

    def __exit__(self, *exc):
        for n, x in self.saved.items():
            setattr(self.mod, n, x)


class count_ties:
    """Count, during a block, the rows that select.fix_ties finds ambiguous (K-th score tied with a
    block left out): the share of rows that the fp32-keys path re-ranks with a sort."""

    def __init__(self, sel):
        self.sel, self.rows = sel, []

    def __enter__(self):
        self.real = self.sel.fix_ties

        def spy(scores, vals, ids):
            thr = vals.min(-1, keepdim=True).values
            amb = ((scores == thr).sum(-1) > (vals == thr).sum(-1)) & (thr[..., 0] > float("-inf"))
            self.rows.append(int(amb.sum()))
            return self.real(scores, vals, ids)
        self.sel.fix_ties = spy
        return self.rows

    def __exit__(self, *exc):
        self.sel.fix_ties = self.real


def agreement(a, b, cfg):
    """Selections a, b [1, T, H, K] (ascending, −1 padded) -> identical-row fraction, mean Jaccard of the
    sets, and mean overlap of the chosen (non-forced) blocks."""
    bs, init, local = cfg.get("block_size", 64), cfg["init_blocks"], cfg["local_blocks"]
    a, b = a[0], b[0]
    T, Hh, K = a.shape
    NB = (T + bs - 1) // bs
    same = (a == b).all(-1).double().sum().item()
    jac = chosen = 0.0
    n_chosen = 0
    for t0 in range(0, T, 8192):
        aa, bb = a[t0:t0 + 8192].long(), b[t0:t0 + 8192].long()
        ma = torch.zeros(aa.shape[0], Hh, NB + 1, dtype=torch.bool, device=a.device)
        mb = torch.zeros_like(ma)
        ma.scatter_(-1, torch.where(aa < 0, NB, aa), True)
        mb.scatter_(-1, torch.where(bb < 0, NB, bb), True)
        ma, mb = ma[..., :NB], mb[..., :NB]
        inter = (ma & mb).sum(-1).double()
        jac += (inter / (ma | mb).sum(-1).clamp(min=1)).sum().item()
        qb = (torch.arange(t0, t0 + aa.shape[0], device=a.device) // bs)[:, None, None]
        forced = ((aa >= 0) & ((aa < init) | (aa > qb - local))).sum(-1).double()
        size = (aa >= 0).sum(-1).double()
        has = size > forced
        chosen += ((inter - forced) / (size - forced).clamp(min=1))[has].sum().item()
        n_chosen += int(has.sum())
    rows = T * Hh
    return dict(rows_identical=round(same / rows, 4), jaccard=round(jac / rows, 4),
                chosen_overlap=round(chosen / max(1, n_chosen), 4))


def sweep_rows(T=None):
    """Every knob variant at 128K for group 16 and group 4, the coarse normaliser's agreement, the
    stage split (select = scores kernel + top-k; attend = stage 2 alone on fixed blocks)."""
    from salaconvert.kernels.infllmv2 import decode as dec
    from salaconvert.kernels.infllmv2 import select as sel
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    T = LEN(131072) if T is None else T
    for hkv in (HKV, H // 4):
        G = H // hkv
        q, k, v = inputs(T, hkv)
        meta = dict(T=T, Hkv=hkv, G=G, mode="fwd", sweep=True)
        with torch.no_grad():
            for name, cfg in (("96", OURS96), ("16", OURS16)):
                if name == "16" and hkv != HKV:
                    continue
                # selection variants: (label, select knobs, coarse_norm)
                variants = [("base", {}, False), ("torch_topk", dict(FP32_TOPK="torch"), False), ("coarse", {}, True)]
                if name == "96" and hkv == HKV:
                    variants += [("bc128", dict(SELECT_BC=128), False), ("warps8", dict(SELECT_WARPS=8), False),
                                 ("stages2", dict(SELECT_STAGES=2), False), ("coarse_bc128", dict(SELECT_BC=128), True)]
                for label, kn, coarse in variants:
                    with knobs(sel, **kn):
                        safe(f"sweep_select_{name}_{label}",
                             lambda: parallel_infllmv2_select(q, k, coarse_norm=coarse, **cfg), **meta)
                if late(f"sweep_agreement_{name}", **meta):
                    continue
                try:
                    exact = parallel_infllmv2_select(q, k, **cfg)
                    with knobs(sel, FP32_TOPK="torch"), count_ties(sel) as tied:
                        torch_topk = parallel_infllmv2_select(q, k, **cfg)
                    rec(what=f"sweep_torch_topk_vs_radix_{name}",
                        rows_equal=(torch_topk == exact).all(-1).float().mean().item(),
                        rows_tied_at_kth=round(sum(tied) / (T * hkv), 4), **meta)
                    coarse = parallel_infllmv2_select(q, k, coarse_norm=True, **cfg)
                    rec(what=f"sweep_agreement_coarse_vs_exact_{name}", **agreement(coarse, exact, cfg), **meta)
                    del exact, torch_topk, coarse
                except Exception as ex:
                    rec(what=f"sweep_agreement_{name}", error=repr(ex)[:300], **meta)
                empty_cache()
            attend_tiles(q, k, v, meta)
        del q, k, v
        empty_cache()
    # decode at 1M: the coarse normaliser and the split sizes, graph-captured
    from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode
    from salaconvert.kernels.infllmv2.naive import compress_k
    T = LEN(1048576)
    meta = dict(T=T, Hkv=HKV, mode="decode", sweep=True)
    q = torch.randn(1, 1, H, D, device=DEV, dtype=DT)
    kc_ = torch.randn(1, T, HKV, D, device=DEV, dtype=DT)
    vc_ = torch.randn_like(kc_)
    kcmp = compress_k(kc_, OURS96.get("kernel_size", 32), OURS96.get("stride", 16)).to(DT).contiguous()
    lens = torch.tensor([T], dtype=torch.int32, device=DEV)
    for label, kn, coarse in (("coarse", {}, True), ("ch1024_spp4", dict(DECODE_CH=1024, DECODE_SPP=4), False),
                              ("ch512_spp1", dict(DECODE_CH=512, DECODE_SPP=1), False)):
        step = lambda: triton_infllmv2_decode(q, kc_, vc_, lens, kcmp, coarse_norm=coarse, **OURS96)  # noqa: E731
        with knobs(dec, **kn):
            if DEV != "cuda":
                safe(f"sweep_decode_eager_{label}", step, **meta)
                continue
            safe_graph(f"sweep_decode_graph_{label}", step, **meta)
    del kc_, vc_, kcmp
    empty_cache()


def attend_tiles(q, k, v, meta):
    """Stage 2 alone on fixed blocks: tile tokens × warps × pipeline stages."""
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    idx = parallel_infllmv2_select(q, k, **OURS96)
    tiles = [(1, 4, 3), (2, 4, 3), (4, 4, 2), (4, 4, 3), (4, 4, 4), (4, 8, 3), (8, 8, 3), (8, 8, 4)] \
        if k.shape[2] == HKV else [(4, 4, 3), (8, 4, 3), (16, 4, 2), (16, 4, 3), (16, 4, 4), (16, 8, 3), (32, 8, 3)]
    for tokens, warps, stages in tiles:
        with knobs(par, ATTN_TOKENS=tokens, ATTN_WARPS=warps, ATTN_STAGES=stages):
            safe(f"sweep_attend_96_tokens{tokens}_warps{warps}_stages{stages}",
                 ours_fn(q, k, v, OURS96, block_indices=idx), **meta)
    del idx


def select_tile_rows(lengths):
    """Stage 1 alone for scoring tiles of 64 / 128 / 256 query rows × 4 / 8 warps, 64 / 128
    compressed keys per step and 2 / 3 / 4 pipeline stages (the first variant is the default),
    group 16 and 4."""
    from salaconvert.kernels.infllmv2 import select as selmod
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    variants = [dict(SELECT_ROWS=r, SELECT_WARPS=w) for r, w in ((64, 4), (128, 4), (128, 8), (256, 8))]
    variants += [dict(SELECT_BC=128), dict(SELECT_BC=128, SELECT_ROWS=128, SELECT_WARPS=8),
                 dict(SELECT_STAGES=3), dict(SELECT_STAGES=4), dict(SELECT_ROWS=128, SELECT_WARPS=8, SELECT_STAGES=3)]
    for T in lengths:
        for hkv in (HKV, H // 4):
            meta = dict(T=T, Hkv=hkv, mode="fwd")
            q, k, _ = inputs(T, hkv)
            with torch.no_grad():
                base = parallel_infllmv2_select(q, k, **OURS96)
                for kn in variants:
                    label = "_".join(f"{n.split('_')[1].lower()}{v}" for n, v in kn.items())
                    with knobs(selmod, **kn):
                        t = safe(f"ours_96_select_{label}", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
                        if t:
                            same = (parallel_infllmv2_select(q, k, **OURS96) == base).all(-1).float().mean().item()
                            rec(what=f"select_{label}_rows_equal", share=round(same, 4), **meta)
            del q, k, base
            empty_cache()


def tile_union(idx, n: int) -> float:
    """Mean number of distinct blocks a tile of n consecutive tokens walks, over 96 (idx [1, T, H, K])."""
    _, T, Hh, K = idx.shape
    T = T // n * n
    x = idx[0, :T].view(T // n, n, Hh, K).transpose(1, 2).reshape(T // n, Hh, n * K)
    x = torch.sort(x, -1).values
    distinct = ((x[..., 1:] != x[..., :-1]) & (x[..., 1:] >= 0)).sum(-1) + (x[..., 0] >= 0)
    return round(distinct.float().mean().item() / K, 3)


def add_real_args(ap: argparse.ArgumentParser, what: str) -> None:
    """--real-model, --real-data: the model and the text whose block lists stand for a real model's."""
    ap.add_argument("--real-model", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help=f"{what}: the model whose selections stage 2 walks (name, directory or GGUF)")
    ap.add_argument("--real-data", nargs="+",
                    default=[f"/tmp/corpus/{n}.jsonl" for n in ("austen", "python-docs", "linux-docs")],
                    help=f"{what}: text files read in order until the longest length is reached")


def real_lists(tokens: int, model: str, data: list[str]):
    """T -> the [1, T, 9, 96] lists (OURS96) that `model` (SmolLM2-135M) chooses over the first T
    tokens of `data`, T ≤ tokens: its q/k projections at layers 0, 4, 9 of the 1:3 plan, 3 KV heads
    each, without RoPE as a converted sparse layer runs them."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from selection_overlap import real_qk

    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    qk = real_qk(tokens, data, [0, 4, 9], model=model, device=DEV, dtype="float32" if DEV == "cpu" else "bfloat16")

    def lists(T):
        with torch.no_grad():
            return torch.cat([parallel_infllmv2_select(q[:, :T].contiguous(), k[:, :T].contiguous(), **OURS96)
                              for q, k in qk.values()], 2)
    return lists


def real_rows(lengths, model: str, data: list[str]):
    """Stage 2 on block lists that a real model chose on real text, next to random inputs' lists.

    Stage 2's cost depends on its inputs only through the block lists (how much neighbouring
    tokens' lists overlap, notes "Why stage 2 stays near 127 ms"); stage 1's cost does not depend
    on the values at all. So at the benchmark shape (random q, k, v) the attention runs once on the
    lists selected from those random inputs and once on lists selected by SmolLM2-135M's own q/k
    (layers 0, 4, 9 of the 1:3 plan, no RoPE as a converted sparse layer runs them; 3 KV heads
    each, the first Hkv of the 9 taken) over the first T tokens of `data`. The forward "on real
    lists" is the selection at the bench shape plus the attention on the real lists.
    """
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    t0 = time.time()
    lists_of = real_lists(max(lengths), model, data)
    rec(what="real_qk_seconds", seconds=round(time.time() - t0, 1), model=os.path.basename(model))
    for T in lengths:
        real = lists_of(T)
        for hkv in (HKV, H // 4):
            meta = dict(T=T, Hkv=hkv, mode="fwd")
            q, k, v = inputs(T, hkv)
            with torch.no_grad():
                lists = {"random": parallel_infllmv2_select(q, k, **OURS96), "real": real[:, :, :hkv].contiguous()}
                rec(what="tile_union_over_96", **{f"{name}_tile{n}": tile_union(idx, n) for name, idx in lists.items()
                                                  for n in (1, 4, 16)}, **meta)
                sd = safe("sdpa_dense", sdpa_fn(q, k, v), **meta)
                sel = safe("ours_96_select", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
                best = {}
                for tokens in ((2, 4, 8) if hkv == HKV else (4, 8, 16)):
                    with knobs(par, ATTN_TOKENS=tokens):
                        for name, idx in lists.items():
                            t = safe(f"ours_96_attend_{name}_tiles{tokens}", ours_fn(q, k, v, OURS96, block_indices=idx),
                                     **meta)
                            if t and (name not in best or t < best[name][0]):
                                best[name] = (t, tokens)
                for name, (t, tokens) in best.items():
                    if sd and sel:
                        rec(what=f"speedup_vs_sdpa_{name}_lists", ratio=round(sd / (sel + t), 3), tiles=tokens,
                            select_ms=round(sel, 2), attend_ms=round(t, 2), **meta)
            del q, k, v, lists
            empty_cache()
        if T <= LEN(65536):  # training: fwd + bwd of the attention on each kind of list, plus the selection
            meta = dict(T=T, Hkv=HKV, mode="fwd+bwd")
            q, k, v = inputs(T, HKV)
            with torch.no_grad():
                lists = {"random": parallel_infllmv2_select(q, k, **OURS96), "real": real[:, :, :HKV].contiguous()}
            sd = safe("sdpa_dense", sdpa_fn(q, k, v, backward=True), **meta)
            sel = safe("ours_96_select", lambda: parallel_infllmv2_select(q, k, **OURS96), **meta)
            for name, idx in lists.items():
                t = safe(f"ours_96_attend_{name}", ours_fn(q, k, v, OURS96, backward=True, block_indices=idx), **meta)
                if t and sd and sel:
                    rec(what=f"speedup_vs_sdpa_{name}_lists", ratio=round(sd / (sel + t), 3), **meta)
            del q, k, v, lists
            empty_cache()
        del real
    del lists_of
    empty_cache()


@triton.jit
def _stream_kernel(k, v, out, u_blk, u_len, U, k_start, tile_n, Tk, stride_kt, D: tl.constexpr, BS: tl.constexpr):
    """Stage 2's walk without its math: every block of a (tile, KV head)'s union list, K and V
    loaded whole and summed, so the time is that of moving the bytes (section 'floor')."""
    i_tile, i_h = tl.program_id(0), tl.program_id(1)
    row = i_tile.to(tl.int64) * tl.num_programs(1) + i_h
    ks = tl.load(k_start + tl.load(tile_n + i_tile))
    o_d = tl.arange(0, D)
    acc = tl.zeros([BS, D], tl.float32)
    for u in range(0, tl.load(u_len + row)):
        o_k = tl.load(u_blk + row * U + u) * BS + tl.arange(0, BS)
        off = (ks + o_k).to(tl.int64)[:, None] * stride_kt + i_h * D + o_d[None, :]
        m_k = (o_k < Tk)[:, None]
        acc += tl.load(k + off, mask=m_k, other=0.).to(tl.float32) + tl.load(v + off, mask=m_k, other=0.).to(tl.float32)
    tl.store(out + row * D + o_d, tl.sum(acc, 0))


def floor_rows(lengths):
    """What stage 2 costs against the bytes it must move. On fixed random lists (as section 'fwd'),
    per (T, Hkv): the forward kernel alone, the listing of the tiles' unions, and the same walk with
    loads only (_stream_kernel) over the union lists ("stream") and over lists of as many blocks
    drawn from each tile's own 32 latest ("stream_hot": a working set the L2 holds), with the
    K/V bytes each walk reads and the rate it reached."""
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2.layout import make_tiles
    from salaconvert.kernels.infllmv2.naive import _cfg
    for T, hkv in lengths:
        meta = dict(T=T, Hkv=hkv, mode="fwd")
        if late("floor", **meta):
            continue
        q, k, v = inputs(T, hkv)
        cfg = _cfg(**{**dict(block_size=64, kernel_size=32, stride=16, dense_len=8192), **OURS96})
        with torch.no_grad():
            seqs = par._prepare(q, k, None, cfg)
            qf, kf, vf = q[0], k[0], v[0]
            idx = par.parallel_infllmv2_select(q, k, **OURS96)[0]
            G = H // hkv
            GP, BT = par._tile_tokens(G, T, par.ATTN_TOKENS)
            tile_n, tile_i = make_tiles(seqs, BT, q.device)
            safe("floor_unions", lambda: par.tile_unions(idx, seqs, tile_n, tile_i, BT), **meta)
            u_blk, u_bits, u_len = par.tile_unions(idx, seqs, tile_n, tile_i, BT)
            o = torch.empty_like(qf)
            lse = torch.empty(T, H, device=q.device, dtype=torch.float32)
            scale_log2 = D ** -0.5 * par.LOG2E
            grid = (tile_n.numel(), hkv)

            def fwd():
                par._fwd_kernel[grid](qf, kf, vf, o, lse, idx, tile_n, tile_i, seqs.q_start, seqs.k_start, seqs.Tq,
                                      seqs.Tk, u_blk, u_bits, u_len, u_blk.shape[1], scale_log2, cfg["dense_len"],
                                      qf.stride(0), kf.stride(0), idx.stride(0), H, G=G, GP=GP, BT=BT, D=D,
                                      BS=cfg["block_size"], K=idx.shape[2], num_warps=par.ATTN_WARPS,
                                      num_stages=par.ATTN_STAGES)
            ms = safe("floor_fwd_kernel", fwd, **meta)
            bs = cfg["block_size"]
            # the tile's own block and the 31 before it, over and over: as many steps, all L2-resident
            own = ((tile_i.long() + BT - 1).clamp(max=T - 1) // bs).repeat_interleave(hkv)[:, None]
            hot = (own - torch.arange(u_blk.shape[1], device=q.device) % cfg["local_blocks"]).clamp(min=0)
            out = torch.empty(u_len.numel(), D, device=q.device, dtype=torch.float32)
            gb = u_len.sum().item() * bs * D * 2 * kf.element_size() / 1e9
            rec(what="floor_bytes", gb=round(gb, 2), blocks_per_tile=round(u_len.float().mean().item(), 1),
                tile_tokens=BT, **meta)
            for what, blk in (("floor_stream", u_blk), ("floor_stream_hot", hot.int())):
                t = safe(what, lambda: _stream_kernel[grid](kf, vf, out, blk, u_len, blk.shape[1], seqs.k_start,
                                                            tile_n, T, kf.stride(0), D=D, BS=bs, num_warps=8), **meta)
                if t:
                    rec(what=f"{what}_rate", tb_per_s=round(gb / t, 3), **meta)
            if ms:
                rec(what="floor_fwd_kernel_rate", tb_per_s=round(gb / ms, 3), **meta)
        del q, k, v, idx, u_blk, u_bits, u_len
        empty_cache()


def fwd_bwd_rows(lengths):
    for T in lengths:
        q, k, v = inputs(T)
        meta = dict(T=T, Hkv=HKV, mode="fwd+bwd")
        sd = safe("sdpa_dense", sdpa_fn(q, k, v, backward=True), **meta)
        ours = safe("ours_96", ours_fn(q, k, v, OURS96, backward=True), **meta)
        if DEV == "cuda" and T == lengths[0] and not late("ours_96_fwdbwd_kernels", **meta):
            # where a training step's time goes: selection, forward, dq, the dk/dv CSR build, dk/dv
            rec(what="ours_96_fwdbwd_kernels", us_per_call=kernel_split(ours_fn(q, k, v, OURS96, backward=True), 3),
                **meta)
        if T == lengths[0]:  # the dq launch's warps × stages
            from salaconvert.kernels.infllmv2 import parallel as par
            for warps, stages in ((4, 3), (8, 2), (8, 3)):
                with knobs(par, DQ_WARPS=warps, DQ_STAGES=stages):
                    safe(f"ours_96_dq_warps{warps}_stages{stages}", ours_fn(q, k, v, OURS96, backward=True), **meta)
        safe("ours_16", ours_fn(q, k, v, OURS16, backward=True), **meta)
        safe("fla_nsa_16", nsa_fn(q, k, v, backward=True), **meta)
        if sd and ours:
            rec(what="speedup_vs_sdpa", ratio=round(sd / ours, 3), **meta)
        del q, k, v
        empty_cache()


def decode_rows(lengths):
    from salaconvert.kernels.infllmv2 import decode as dec
    from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode
    from salaconvert.kernels.infllmv2.naive import compress_k
    for T in lengths:
        meta = dict(T=T, Hkv=HKV, mode="decode")
        q = torch.randn(1, 1, H, D, device=DEV, dtype=DT)
        kc_ = torch.randn(1, T, HKV, D, device=DEV, dtype=DT)
        vc_ = torch.randn_like(kc_)
        kcmp = compress_k(kc_, OURS96.get("kernel_size", 32), OURS96.get("stride", 16)).to(DT).contiguous()
        lens = torch.tensor([T], dtype=torch.int32, device=DEV)
        step = lambda: triton_infllmv2_decode(q, kc_, vc_, lens, kcmp, **OURS96)  # noqa: E731
        safe("ours_96_decode_eager", step, **meta)
        if DEV == "cuda" and not late("ours_96_decode_kernels", **meta):
            rec(what="ours_96_decode_kernels", us_per_call=kernel_split(step), **meta)
        # at 1M also: torch.topk (before the top-k rounds), round sizes, and the coarse normaliser
        # (the paper's approximation) alone and with the top-k rounds
        variants = [("", {}, False)] + ([("_torch_topk", dict(DECODE_TOPK_CHUNK=0), False),
                                         ("_topk512", dict(DECODE_TOPK_CHUNK=512), False),
                                         ("_topk2048", dict(DECODE_TOPK_CHUNK=2048), False),
                                         ("_coarse", {}, True), ("_coarse_torch_topk", dict(DECODE_TOPK_CHUNK=0), True)]
                                        if T == LEN(1048576) else [])
        for label, kn, coarse in variants:
            step = lambda: triton_infllmv2_decode(q, kc_, vc_, lens, kcmp, coarse_norm=coarse, **OURS96)  # noqa: E731
            with knobs(dec, **kn):
                safe_graph(f"ours_96_decode_graph{label}", step, **meta)
        qh = q.transpose(1, 2)
        kh, vh = kc_.transpose(1, 2), vc_.transpose(1, 2)
        safe("sdpa_dense_decode", lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True), **meta)
        del kc_, vc_, kcmp
        empty_cache()


def kernel_split(fn, calls: int = 20, top: int = 20) -> dict:
    """Mean GPU microseconds per call of the `top` costliest kernels `fn` launches (torch.profiler, eager calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    costly = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return {e.key[:80]: round(e.device_time_total / calls, 2) for e in costly[:top]}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_rows():
    """Correctness on the device at bench shapes (bf16 vs the fp32 reference on the same blocks)."""
    from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode
    from salaconvert.kernels.infllmv2.naive import compress_k, naive_infllmv2_attn, naive_infllmv2_select
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_attn, parallel_infllmv2_select
    T, tail, Tg = LEN(16384), min(1024, LEN(16384)), LEN(4096)
    cfg = dict(OURS96, dense_len=8192 if DEV == "cuda" else 0)
    q, k, v = inputs(T)
    with torch.no_grad():
        idx = parallel_infllmv2_select(q, k, **cfg)
        ref_idx = naive_infllmv2_select(q[:, -tail:].float(), k.float(), **cfg)
    same = (idx[:, -tail:] == ref_idx).all(-1).float().mean().item()
    small = dict(OURS16, dense_len=1024 if DEV == "cuda" else 0)
    qs, ks, vs = (x[:, :Tg].detach().clone().requires_grad_() for x in (q, k, v))
    sidx = parallel_infllmv2_select(qs, ks, **small)
    o = parallel_infllmv2_attn(qs, ks, vs, **small)
    do = torch.randn_like(o)
    o.backward(do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, ks, vs))
    of = naive_infllmv2_attn(qf, kf, vf, block_indices=sidx, **small)
    of.backward(do.float())
    rec(what="check", T=T, select_rows_equal_fp32_last1024=round(same, 4), T_grad=Tg, o_rel=rel(o, of),
        dq_rel=rel(qs.grad, qf.grad), dk_rel=rel(ks.grad, kf.grad), dv_rel=rel(vs.grad, vf.grad),
        o_nan=bool(torch.isnan(o).any()))
    with torch.no_grad():
        L = LEN(12345)
        kc = compress_k(k[:, :L], cfg.get("kernel_size", 32), cfg.get("stride", 16))  # fp32, as the model's cache keeps them
        od = triton_infllmv2_decode(q[:, L - 1:L], k, v, torch.tensor([L], dtype=torch.int32, device=DEV), kc, **cfg)
        last = parallel_infllmv2_attn(q[:, :L], k[:, :L], v[:, :L], **cfg)[:, -1:]
        rec(what="check_decode", T=L, rel_vs_prefill_last_row=rel(od, last))
    del q, k, v, of, qf, kf, vf, qs, ks, vs
    empty_cache()


def knob_values() -> dict:
    from salaconvert.kernels.infllmv2 import decode as dec
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2 import select as sel
    return {f"{m.__name__.rsplit('.', 1)[1]}.{n}": getattr(m, n) for m, names in (
        (sel, ("SELECT_BC", "SELECT_ROWS", "SELECT_WARPS", "SELECT_STAGES", "FP32_TOPK")),
        (par, ("ATTN_ROWS", "ATTN_TOKENS", "ATTN_WARPS", "ATTN_STAGES", "DKV_ROWS", "DKV_WARPS", "DKV_STAGES", "DQ_WARPS",
              "DQ_STAGES")),
        (dec, ("DECODE_CH", "DECODE_SPP", "DECODE_TOPK_CHUNK"))) for n in names}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="short lengths only (a smoke run)")
    ap.add_argument("--only", default="check,fwd,fwdbwd,decode,hkv8,fwd512", help="comma list of sections")
    ap.add_argument("--sweep", action="store_true", help="add the knob sweep (section 'sweep', run after 'check')")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per row (at least 3 calls)")
    ap.add_argument("--deadline", type=float, default=450, help="seconds after which further rows are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): a script check")
    add_real_args(ap, "section 'real'")
    args = ap.parse_args()
    global BUDGET_S, DEADLINE
    BUDGET_S, DEADLINE = args.budget, time.time() + args.deadline
    if args.smoke:
        smoke_mode()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a timeout still writes the JSON (finally)
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    card = "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()
    import triton
    try:
        import fla
        fla_v = fla.__version__
    except Exception:
        fla_v = None
    meta = dict(card=name, torch=torch.__version__, triton=triton.__version__, fla=fla_v,
                sdpa_backend=sdpa_choice(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                shapes=dict(B=1, Hq=H, Hkv=HKV, d=D, dtype=str(DT), block=64, ours96=OURS96, ours16=OURS16),
                knobs=knob_values(), argv=sys.argv[1:])
    print(json.dumps(meta), flush=True)
    sections = args.only.split(",") + (["sweep"] if args.sweep else [])
    fwd_T = [LEN(t) for t in ([32768, 65536] if args.quick else [32768, 131072, 262144])]
    try:
        if "variants" in sections:
            variant_rows()
        if "check" in sections:
            check_rows()
        if "sweep" in sections:
            sweep_rows()
        if "fwd" in sections:
            forward_rows(fwd_T)
        if "fwdbwd" in sections:
            fwd_bwd_rows([LEN(t) for t in ([16384] if args.quick else [32768, 65536])])
        if "decode" in sections:
            decode_rows([LEN(t) for t in ([131072] if args.quick else [131072, 1048576])])
        if "hkv8" in sections:  # group 4
            forward_rows([LEN(32768 if args.quick else 131072)], hkv=H // 4, with_nsa=False, with_16=False)
        if "attn_tiles" in sections:
            for hkv in (HKV, H // 4):
                q, k, v = inputs(LEN(131072), hkv)
                with torch.no_grad():
                    attend_tiles(q, k, v, dict(T=LEN(131072), Hkv=hkv, mode="fwd"))
                del q, k, v
                empty_cache()
        if "floor" in sections:
            floor_rows([(LEN(t), h) for t, h in ((32768, HKV), (131072, HKV), (262144, HKV), (131072, H // 4),
                                                  (262144, H // 4))])
        if "select_tiles" in sections:
            select_tile_rows([LEN(131072)])
        if "real" in sections:
            real_rows([LEN(t) for t in ([32768] if args.quick else [32768, 65536, 131072, 262144])], args.real_model,
                      args.real_data)
        if "fwd512" in sections and not args.quick:
            forward_rows([LEN(524288)], with_16=False)
    finally:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"infllmv2-{card}.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=RESULTS), f, indent=1)
        print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
