"""InfLLM-V2 kernels vs dense SDPA vs fla's NSA, in one run on one GPU (issue 4).

    python benchmarks/infllmv2.py --out DIR [--quick]

Shapes: B = 1, Hq = 32, Hkv = 2 (plus a Hkv = 8 row), d = 128, bf16, causal, block 64.
Ours at the SPEC budget (96 blocks: init 1 + local 32 + 63 chosen) and at NSA's budget
(16 blocks: init 1 + local 4 + 11 chosen). fla `parallel_nsa` computes its own compression and
top-16 selection (gates on, no sliding window), as in ../shared/anchors. SDPA is the flash
backend over K/V expanded to 32 heads, as in the anchors. Times are medians of CUDA-event timed
calls after a warm-up call. Writes DIR/infllmv2-<card>.json and prints one JSON line per number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys

import torch
import torch.nn.functional as F

H, HKV, D = 32, 2, 128
DT = torch.bfloat16
OURS96 = dict(topk=96, init_blocks=1, local_blocks=32)
OURS16 = dict(topk=16, init_blocks=1, local_blocks=4)
RESULTS: list[dict] = []


def rec(**kw):
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def bench(fn, budget_s: float = 1.5, max_reps: int = 30) -> float:
    """Median ms of fn() over as many calls as fit in budget_s (at least 3), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    first = s.elapsed_time(e)
    reps = 1 if first > 2000 else int(min(max_reps, max(3, budget_s * 1e3 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def safe(what, fn, **meta):
    try:
        ms = bench(fn)
        rec(what=what, ms=round(ms, 4), **meta)
        return ms
    except Exception as ex:  # keep the run going: one failing row must not lose the others
        rec(what=what, error=repr(ex)[:300], **meta)
        torch.cuda.empty_cache()
        return None


def inputs(T, hkv=HKV, grad=False):
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(1, T, H, D, device="cuda", dtype=DT, generator=g)
    k = torch.randn(1, T, hkv, D, device="cuda", dtype=DT, generator=g)
    v = torch.randn(1, T, hkv, D, device="cuda", dtype=DT, generator=g)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def sdpa_fn(q, k, v, backward=False):
    G = q.shape[2] // k.shape[2]
    # contiguous [B, H, T, d] with K/V expanded to every query head: SDPA's fastest layout (anchors)
    qh = q.detach().transpose(1, 2).contiguous().requires_grad_(backward)
    kh = k.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_(backward)
    vh = v.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_(backward)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
            if backward:
                o.backward(torch.ones_like(o))
    return run


def nsa_fn(q, k, v, backward=False):
    from fla.ops.nsa import parallel_nsa
    gate = torch.rand(1, q.shape[1], H, device="cuda", dtype=DT)
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))

    def run():
        o = parallel_nsa(qq, kk, vv, g_cmp=gate, g_slc=gate, block_counts=16, block_size=64)
        if backward:
            o.backward(torch.ones_like(o))
    return run


def ours_fn(q, k, v, cfg, backward=False, block_indices=None):
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_attn
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))

    def run():
        o = parallel_infllmv2_attn(qq, kk, vv, block_indices=block_indices, **cfg)
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
            if T <= 131072 and hkv == HKV:
                from salaconvert.kernels.infllmv2 import parallel as par
                from salaconvert.kernels.infllmv2.select import keys_to_blocks
                tokens = par.ATTN_TOKENS
                for t in (1, 4):
                    par.ATTN_TOKENS = t
                    safe(f"ours_96_attend_rows{t * 16}", ours_fn(q, k, v, OURS96, block_indices=idx), **meta)
                par.ATTN_TOKENS = tokens
                keys = torch.randint(-2 ** 62, 2 ** 62, (T, hkv, T // 64), device="cuda")
                safe("ours_96_select_topk_part", lambda: keys_to_blocks(keys, 96), **meta)
                del keys
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
        torch.cuda.empty_cache()


def variant_rows(T=131072):
    """Launch/tile variants of the same work, for choosing defaults (attend-only on fixed blocks)."""
    from salaconvert.kernels.infllmv2 import parallel as par
    from salaconvert.kernels.infllmv2 import select as sel
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
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
    meta = dict(T=32768, Hkv=HKV, mode="fwd+bwd")
    q, k, v = inputs(32768)
    for tokens in (1, 4):
        par.ATTN_TOKENS = tokens
        safe(f"variant_fwdbwd_tokens{tokens}", ours_fn(q, k, v, OURS96, backward=True), **meta)
    par.ATTN_TOKENS = saved[0]
    del q, k, v, idx
    torch.cuda.empty_cache()


def fwd_bwd_rows(lengths):
    for T in lengths:
        q, k, v = inputs(T)
        meta = dict(T=T, Hkv=HKV, mode="fwd+bwd")
        sd = safe("sdpa_dense", sdpa_fn(q, k, v, backward=True), **meta)
        ours = safe("ours_96", ours_fn(q, k, v, OURS96, backward=True), **meta)
        safe("ours_16", ours_fn(q, k, v, OURS16, backward=True), **meta)
        safe("fla_nsa_16", nsa_fn(q, k, v, backward=True), **meta)
        if sd and ours:
            rec(what="speedup_vs_sdpa", ratio=round(sd / ours, 3), **meta)
        del q, k, v
        torch.cuda.empty_cache()


def decode_rows(lengths):
    from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode
    from salaconvert.kernels.infllmv2.naive import compress_k
    for T in lengths:
        meta = dict(T=T, Hkv=HKV, mode="decode")
        q = torch.randn(1, 1, H, D, device="cuda", dtype=DT)
        kc_ = torch.randn(1, T, HKV, D, device="cuda", dtype=DT)
        vc_ = torch.randn_like(kc_)
        kcmp = compress_k(kc_, 32, 16).to(DT).contiguous()
        lens = torch.tensor([T], dtype=torch.int32, device="cuda")
        step = lambda: triton_infllmv2_decode(q, kc_, vc_, lens, kcmp, **OURS96)  # noqa: E731
        safe("ours_96_decode_eager", step, **meta)
        try:
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            safe("ours_96_decode_graph", graph.replay, **meta)
        except Exception as ex:
            rec(what="ours_96_decode_graph", error=repr(ex)[:300], **meta)
        if T == 1048576:  # the split sizes of run 2, for the before/after
            from salaconvert.kernels.infllmv2 import decode as dec
            saved = (dec.DECODE_CH, dec.DECODE_SPP)
            dec.DECODE_CH, dec.DECODE_SPP = 1024, 8
            try:
                step()
                g2 = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g2):
                    step()
                safe("ours_96_decode_graph_ch1024_spp8", g2.replay, **meta)
            except Exception as ex:
                rec(what="ours_96_decode_graph_ch1024_spp8", error=repr(ex)[:300], **meta)
            dec.DECODE_CH, dec.DECODE_SPP = saved
        qh = q.transpose(1, 2)
        kh, vh = kc_.transpose(1, 2), vc_.transpose(1, 2)
        safe("sdpa_dense_decode", lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True), **meta)
        del kc_, vc_, kcmp
        torch.cuda.empty_cache()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_fused_select():
    """The fused top-k selection against the key + torch.topk path; fall back to the latter if it fails."""
    from salaconvert.kernels.infllmv2 import select as sel
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_select
    q, k, _ = inputs(20000)
    try:
        sel.FUSED_TOPK = True
        a = parallel_infllmv2_select(q, k, **OURS96)
        sel.FUSED_TOPK = False
        b = parallel_infllmv2_select(q, k, **OURS96)
        rec(what="check_fused_select", rows_equal=(a == b).all(-1).float().mean().item())
        sel.FUSED_TOPK = True
    except Exception as ex:
        sel.FUSED_TOPK = False
        rec(what="check_fused_select", error=repr(ex)[:400], fallback="keys+torch.topk")


def check_rows():
    """Correctness on the device at bench shapes (bf16 vs the fp32 reference on the same blocks)."""
    from salaconvert.kernels.infllmv2.decode import triton_infllmv2_decode
    from salaconvert.kernels.infllmv2.naive import compress_k, naive_infllmv2_attn, naive_infllmv2_select
    from salaconvert.kernels.infllmv2.parallel import parallel_infllmv2_attn, parallel_infllmv2_select
    T = 16384
    cfg = dict(OURS96, dense_len=8192)
    q, k, v = inputs(T)
    with torch.no_grad():
        idx = parallel_infllmv2_select(q, k, **cfg)
        ref_idx = naive_infllmv2_select(q[:, -1024:].float(), k.float(), **cfg)
    same = (idx[:, -1024:] == ref_idx).all(-1).float().mean().item()
    small = dict(topk=16, init_blocks=1, local_blocks=4, dense_len=1024)
    qs, ks, vs = (x[:, :4096].detach().clone().requires_grad_() for x in (q, k, v))
    sidx = parallel_infllmv2_select(qs, ks, **small)
    o = parallel_infllmv2_attn(qs, ks, vs, **small)
    do = torch.randn_like(o)
    o.backward(do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, ks, vs))
    of = naive_infllmv2_attn(qf, kf, vf, block_indices=sidx, **small)
    of.backward(do.float())
    rec(what="check", T=T, select_rows_equal_fp32_last1024=round(same, 4), T_grad=4096, o_rel=rel(o, of),
        dq_rel=rel(qs.grad, qf.grad), dk_rel=rel(ks.grad, kf.grad), dv_rel=rel(vs.grad, vf.grad),
        o_nan=bool(torch.isnan(o).any()))
    with torch.no_grad():
        L = 12345
        kc = compress_k(k[:, :L], 32, 16)  # fp32, as the model's cache keeps them
        od = triton_infllmv2_decode(q[:, L - 1:L], k, v, torch.tensor([L], dtype=torch.int32, device="cuda"), kc, **cfg)
        last = parallel_infllmv2_attn(q[:, :L], k[:, :L], v[:, :L], **cfg)[:, -1:]
        rec(what="check_decode", T=L, rel_vs_prefill_last_row=rel(od, last))
    del q, k, v, of, qf, kf, vf, qs, ks, vs
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="short lengths only (a smoke run)")
    ap.add_argument("--only", default="check,fwd,fwdbwd,decode,hkv8,fwd512", help="comma list of sections")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a timeout still writes the JSON (finally)
    name = torch.cuda.get_device_name()
    card = "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()
    import triton
    try:
        import fla
        fla_v = fla.__version__
    except Exception:
        fla_v = None
    meta = dict(card=name, torch=torch.__version__, triton=triton.__version__, fla=fla_v,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                shapes=dict(B=1, Hq=H, Hkv=HKV, d=D, dtype="bf16", block=64, ours96=OURS96, ours16=OURS16))
    print(json.dumps(meta), flush=True)
    sections = args.only.split(",")
    fwd_T = [32768, 65536] if args.quick else [32768, 131072, 262144]
    try:
        if "variants" in sections:
            variant_rows()
        if "fused" in sections:
            check_fused_select()
        if "check" in sections:
            check_rows()
        if "fwd" in sections:
            forward_rows(fwd_T)
        if "fwdbwd" in sections:
            fwd_bwd_rows([16384] if args.quick else [32768, 65536])
        if "decode" in sections:
            decode_rows([131072] if args.quick else [131072, 1048576])
        if "hkv8" in sections:
            forward_rows([32768] if args.quick else [131072], hkv=8, with_nsa=False, with_16=False)
        if "fwd512" in sections and not args.quick:
            forward_rows([524288], with_16=False)
    finally:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"infllmv2-{card}.json")
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=RESULTS), f, indent=1)
        print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
