"""Lightning attention: our Triton kernels against flash-linear-attention's chunk_simple_gla, same run, same card.

Run on the device (issue 3):
    python benchmarks/lightning.py --out $OUT [--sweep] [--skip-1m]
Writes lightning-<card>.json under --out and prints a table last. Times are
`triton.testing.do_bench` medians (ms); "TB/s" is the minimum I/O (q, k, v read once, o written
once, bf16) over the time, next to the copy bandwidth measured in the same run.
Shapes (issue 3): B=1, H=32, d=128, bf16 forward at 8K..1M; forward+backward at B=4, 4K and 16K;
one graph-captured decode step. fla gets SALA's decay as g_gamma = -slopes, slopes_h = 2^(-8h/H).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from triton.testing import do_bench

from salaconvert.kernels.lightning import chunk as chunk_mod
from salaconvert.kernels.lightning.chunk import chunk_lightning_attn
from salaconvert.kernels.lightning.naive import chunk_lightning_attn_torch
from salaconvert.kernels.lightning.step import lightning_step

H, D = 32, 128
DEV = "cuda"
results: list[dict] = []


def rec(**kw):
    results.append(kw)
    print(json.dumps(kw), flush=True)


def sala_decay(H):
    h = torch.arange(1, H + 1, dtype=torch.float32, device=DEV)
    return -(2.0 ** (-8.0 * h / H))


def bench(fn, rep_ms=200):
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def min_io_bytes(B, T):
    return 4 * B * T * H * D * 2


def copy_bandwidth():
    x = torch.randn(2**30, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * 2**30 * 2 / ms / 1e9


def rand(*shape, dtype=torch.bfloat16, requires_grad=False):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(requires_grad)


def sweep_configs(label):
    """A small grid around the shipped defaults (the wide grid's results: results/lightning-h100-run2-sweep.json)."""
    base = dict(BV=128, num_warps=8, num_stages=3)
    grid = [dict(base, CPS=c) for c in (32, 64, 128)]
    if label == "fwd_32K":
        grid += [dict(base, CPS=32, BV1=64), dict(base, CPS=32, num_warps1=8), dict(base, CPS=32, num_stages1=3),
                 dict(base, CPS=32, BV=64)]
    return grid


def sweep(fla_fn):
    """Launch-parameter sweep of our kernels; returns the best configuration of each case."""
    best = {}
    decay = sala_decay(H)
    for label, B, T, bwd in (("fwd_32K", 1, 32768, False), ("fwd_256K", 1, 262144, False)):
        q, k, v = (rand(B, T, H, D, requires_grad=bwd) for _ in range(3))
        do = rand(B, T, H, D)
        for cfg in sweep_configs(label):
            chunk_mod.TUNE.clear()
            chunk_mod.TUNE.update(cfg)
            if bwd:
                def f():
                    o, _ = chunk_lightning_attn(q, k, v, decay)
                    o.backward(do)
            else:
                def f():
                    chunk_lightning_attn(q, k, v, decay)
            try:
                ms = bench(f, 100)
            except Exception as e:  # a config the compiler rejects (shared memory, registers)
                rec(what="sweep", case=label, **cfg, error=repr(e)[:200])
                continue
            rec(what="sweep", case=label, **cfg, ms=ms)
            if label not in best or ms < best[label][0]:
                best[label] = (ms, dict(cfg))
        del q, k, v, do
        torch.cuda.empty_cache()
    chunk_mod.TUNE.clear()
    return {k: {"ms": v[0], **v[1]} for k, v in best.items()}


def forward(fla_fn, lengths, copy_tbps, check_from=2**20):
    decay = sala_decay(H)
    for T in lengths:
        q, k, v = (rand(1, T, H, D) for _ in range(3))
        rep = 300 if T <= 32768 else 1000
        ms_ours = bench(lambda: chunk_lightning_attn(q, k, v, decay), rep)
        row = dict(what="fwd", B=1, T=T, H=H, d=D, ours_ms=ms_ours, ours_TBps=min_io_bytes(1, T) / ms_ours / 1e9)
        if T >= check_from:
            # correctness at 1M: fp32 reference on a slice of heads (fastest, middle, slowest decay), all tokens
            o, S = chunk_lightning_attn(q, k, v, decay, output_final_state=True)
            heads = [0, H // 2, H - 1]
            o_ref, S_ref = chunk_lightning_attn_torch(
                q[:, :, heads].float(), k[:, :, heads].float(), v[:, :, heads].float(), decay[heads], scale=D**-0.5, output_final_state=True
            )
            row["check_1m_heads"] = heads
            row["check_1m_rel_err_o"] = ((o[:, :, heads].float() - o_ref).norm() / o_ref.norm()).item()
            row["check_1m_rel_err_state"] = ((S[:, heads] - S_ref).norm() / S_ref.norm()).item()
            row["check_1m_finite"] = bool(torch.isfinite(o).all().item())
            row["check_1m_last_token_rel_err"] = ((o[:, -1, heads].float() - o_ref[:, -1]).norm() / o_ref[:, -1].norm()).item()
            del o, S, o_ref, S_ref
            torch.cuda.empty_cache()
        if fla_fn is not None:
            try:
                ms_fla = bench(lambda: fla_fn(q, k, v, g_gamma=decay), rep)
                row.update(fla_ms=ms_fla, fla_TBps=min_io_bytes(1, T) / ms_fla / 1e9, speedup=ms_fla / ms_ours)
            except torch.OutOfMemoryError as e:
                row.update(fla_error=repr(e)[:200])
            torch.cuda.empty_cache()
        row["copy_TBps"] = copy_tbps
        rec(**row)
        del q, k, v
        torch.cuda.empty_cache()


def forward_backward(fla_fn, shapes):
    decay = sala_decay(H)
    for B, T in shapes:
        q, k, v = (rand(B, T, H, D, requires_grad=True) for _ in range(3))
        do = rand(B, T, H, D)

        def ours():
            o, _ = chunk_lightning_attn(q, k, v, decay)
            o.backward(do)

        row = dict(what="fwdbwd", B=B, T=T, H=H, d=D, ours_ms=bench(ours, 300))
        if fla_fn is not None:
            def fla():
                o, _ = fla_fn(q, k, v, g_gamma=decay)
                o.backward(do)

            row["fla_ms"] = bench(fla, 300)
            row["speedup"] = row["fla_ms"] / row["ours_ms"]
        rec(**row)
        del q, k, v, do
        torch.cuda.empty_cache()


def profile(fla_fn, T=32768):
    """GPU time per kernel (torch.profiler) of one forward at B=1, T=32K: where the time goes."""
    from torch.profiler import ProfilerActivity, profile as prof

    decay = sala_decay(H)
    q, k, v = (rand(1, T, H, D) for _ in range(3))
    for label, fn in (("ours", lambda: chunk_lightning_attn(q, k, v, decay)), ("fla", lambda: fla_fn(q, k, v, g_gamma=decay))):
        if label == "fla" and fla_fn is None:
            continue
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        kernels = {}
        for e in p.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0 and e.count >= 10:
                kernels[e.key[:80]] = round(t / 10, 1)
        rec(what="profile_fwd_us_per_call", impl=label, T=T, kernels=kernels)
    del q, k, v
    torch.cuda.empty_cache()


def decode(fla_step):
    decay = sala_decay(H)
    q, k, v = (rand(1, 1, H, D) for _ in range(3))
    state = torch.randn(1, H, D, D, device=DEV)
    lightning_step(q, k, v, decay, state)
    steps = 100
    for label, fn in (("ours", lambda: lightning_step(q, k, v, decay, state)), ("fla", fla_step)):
        if fn is None:
            continue
        fn()
        torch.cuda.synchronize()
        g1 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g1):
            fn()
        g100 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g100):
            for _ in range(steps):
                fn()
        ms1 = bench(g1.replay, 200)
        ms100 = bench(g100.replay, 200)
        rec(what="decode_step", impl=label, B=1, H=H, d=D, graph_replay_one_step_ms=ms1, per_step_in_100_step_graph_us=ms100 / steps * 1e3,
            state_TBps=2 * H * D * D * 4 / (ms100 / steps) / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="after the measurements, time a few launch parameters around the defaults")
    ap.add_argument("--skip-1m", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    fla_fn = fla_step = None
    fla_version = None
    if not args.no_fla:
        try:
            import fla
            from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

            fla_version = getattr(fla, "__version__", "?")
            fla_fn = chunk_simple_gla
            decay = sala_decay(H)
            q1, k1, v1 = (rand(1, 1, H, D) for _ in range(3))
            st = torch.randn(1, H, D, D, device=DEV)
            fla_step = lambda: fused_recurrent_simple_gla(q1, k1, v1, g_gamma=decay, initial_state=st, output_final_state=True)
        except ImportError as e:
            print("fla not available:", e, file=sys.stderr)
    meta = dict(card=card, torch=torch.__version__, triton=triton.__version__, fla=fla_version, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(meta), flush=True)
    copy_tbps = copy_bandwidth()
    rec(what="copy_bandwidth", TBps=copy_tbps)

    slug = card.replace("NVIDIA ", "").split()[0].lower()
    path = os.path.join(args.out, f"lightning-{slug}.json")
    lengths = [8192, 32768, 131072, 262144] + ([] if args.skip_1m else [1048576])
    sections = (
        ("fwd", lambda: forward(fla_fn, lengths, copy_tbps)),
        ("fwdbwd", lambda: forward_backward(fla_fn, [(4, 4096), (4, 16384), (1, 32768)])),
        ("profile", lambda: profile(fla_fn)),
        ("decode", lambda: decode(fla_step)),
    ) + ((("sweep", lambda: rec(what="sweep_best", **sweep(fla_fn))),) if args.sweep else ())
    for name, run in sections:
        try:
            run()
        except Exception as e:  # keep what the other sections measure
            rec(what="error", section=name, error=repr(e)[:500])
            torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print("\nwrote", path)
    print(f"\n{'case':<16}{'T':>9}{'ours ms':>10}{'fla ms':>10}{'speedup':>9}{'ours TB/s':>11}")
    for r in results:
        if r["what"] in ("fwd", "fwdbwd"):
            print(f"{r['what'] + ' B=' + str(r['B']):<16}{r['T']:>9}{r['ours_ms']:>10.3f}{r.get('fla_ms', float('nan')):>10.3f}"
                  f"{r.get('speedup', float('nan')):>9.2f}{r.get('ours_TBps', float('nan')):>11.2f}")
        elif r["what"] == "decode_step":
            print(f"decode {r['impl']:<9}{'':>9}{r['graph_replay_one_step_ms']:>10.4f}  per step in graph {r['per_step_in_100_step_graph_us']:.2f} us")
    print(f"copy bandwidth {copy_tbps:.2f} TB/s")
    for r in results:
        if r["what"] in ("profile_fwd_us_per_call", "sweep_best"):
            print(r)
        if r["what"] == "error":
            print("ERROR", r)
        if "check_1m_rel_err_o" in r:
            print(f"1M check: rel err o {r['check_1m_rel_err_o']:.2e}, state {r['check_1m_rel_err_state']:.2e}, finite {r['check_1m_finite']}")


if __name__ == "__main__":
    main()
