"""Stage 2's forward without autograd: the union tiles (parallel.py) against block-major (by_block.py).

    python benchmarks/by_block_ab.py --out DIR [--rounds 2] [--variants union,by_block] [--lengths 65536] [--smoke]
                                     [--hkv 8] [--lists random,real] [--old OTHER_BY_BLOCK.py ...]
                                     [--old-parallel OTHER_PARALLEL.py ...]

On the benchmark's random inputs (benchmarks/infllmv2.py: Hq = 32, d = 128, bf16, 96 blocks) with
the lists of one selection (parallel.attend_selected), so every variant walks the same lists,
alternating round after round in one process: the union path alone (BY_BLOCK_MAX_GROUP = 0), the
committed routing (`auto`: block-major only where the lists spread, parallel.lists_spread) and the
forced/chosen split of parallel._inference_forward at every case (by_block.py's defaults, and
other stages, rows per program, partial-output budgets, merge tiles, forced-block tiles and steps,
the partials' register cap; with --old, other by_block.py files' add_chosen; with --old-parallel,
other parallel.py files' forced walk). --lists real adds, at every case, the lists SmolLM2-135M
chooses on real text (benchmarks/infllmv2.py section `real`: its q/k, the first Hkv of 9 KV heads;
--real-model, --real-data), whose neighbouring tokens choose alike. Records each case's list
spread, each output's largest difference from the union path's (relative to max |o|) and, for
every block-major variant, the GPU time per kernel. Writes DIR/by_block_ab.json. --smoke: tiny
shapes on the CPU under TRITON_INTERPRET=1, a check of the script (its times mean nothing).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import infllmv2 as bench  # noqa: E402
from salaconvert.kernels.infllmv2 import by_block, layout, parallel  # noqa: E402
from salaconvert.kernels.infllmv2.route import Router  # noqa: E402

CASES = [(16384, 8), (32768, 2), (32768, 8), (65536, 2), (65536, 4), (65536, 8), (131072, 2), (131072, 4),
         (131072, 8), (262144, 8)]  # (T, Hkv)
EVERYWHERE = {"BY_BLOCK_MAX_GROUP": 64, "BY_BLOCK_MIN_KEYS": 0, "BY_BLOCK_MIN_SPREAD": 0}  # block-major at every case
VARIANTS = {  # name -> (parallel knobs, by_block knobs)
    "union": ({"BY_BLOCK_MAX_GROUP": 0}, {}),
    "auto": ({}, {}),
    "by_block": (EVERYWHERE, {}),
    "stages3": (EVERYWHERE, {"STAGES": 3}),
    "seg64": (EVERYWHERE, {"SEG": 64}),
    "partial4g": (EVERYWHERE, {"PARTIAL_BYTES": 4 << 30}),
    "partial1g": (EVERYWHERE, {"PARTIAL_BYTES": 1 << 30}),
    "merge128_w8": (EVERYWHERE, {"MERGE_ROWS": 128, "MERGE_WARPS": 8}),
    "merge32_w2": (EVERYWHERE, {"MERGE_ROWS": 32, "MERGE_WARPS": 2}),
    "merge_stages1": (EVERYWHERE, {"MERGE_STAGES": 1}),
    "merge_stages4": (EVERYWHERE, {"MERGE_STAGES": 4}),
    "forced64_w4": ({**EVERYWHERE, "FORCED_ROWS": 64, "FORCED_WARPS": 4}, {}),
    "forced_keys64": ({**EVERYWHERE, "FORCED_KEYS": 64}, {}),
    "forced_keys256": ({**EVERYWHERE, "FORCED_KEYS": 256}, {}),
    "maxnreg_free": (EVERYWHERE, {"PARTIAL_MAXNREG": None}),
}


def chunk_profile(out: Path, Tq: int = 16384, Tk: int = 262144, hkv: int = 8) -> dict:
    """One call as a chunked prefill makes it (the last Tq queries against Tk keys): wall time, GPU
    time and the host-side ops that cost most (torch.profiler, CPU and CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = bench.inputs(Tk, hkv)
    q = q[:, -Tq:].contiguous()
    with torch.no_grad():
        idx = parallel.parallel_infllmv2_select(q, k, **bench.OURS96)
        run = lambda: parallel.attend_selected(q, k, v, idx, **bench.OURS96)  # noqa: E731
        row = dict(Tq=Tq, Tk=Tk, Hkv=hkv, wall_ms=round(bench.median_ms(run, 5), 3))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            bench.sync()
    ev = prof.key_averages()
    row["gpu_ms"] = round(sum(e.self_device_time_total for e in ev) / 1e3, 3)
    row["cpu_top_ms"] = {e.key[:60]: round(e.self_cpu_time_total / 1e3, 3)
                         for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:15]}
    prof.export_chrome_trace(str(out / "by_block_chunk_trace.json"))
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (union first)")
    ap.add_argument("--lengths", default=None, help="comma-separated T: only those cases")
    ap.add_argument("--hkv", default=None, help="comma-separated Hkv: only those cases")
    ap.add_argument("--lists", default="random", help="comma-separated: random (the inputs' own), real (SmolLM2's)")
    bench.add_real_args(ap, "--lists real")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--chunk-profile", action="store_true", help="only profile one chunked-prefill call")
    ap.add_argument("--old", type=Path, nargs="*", default=[],
                    help="other by_block.py files: adds a variant 'old:NAME' for each, block-major with its add_chosen")
    ap.add_argument("--old-parallel", type=Path, nargs="*", default=[],
                    help="other parallel.py files: adds a variant 'old_forced:NAME' for each, with its _forced_forward")
    args = ap.parse_args()
    if args.smoke:
        bench.smoke_mode()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.chunk_profile:
        (args.out / "by_block_chunk_profile.json").write_text(json.dumps(chunk_profile(args.out), indent=1))
        return
    rows = []
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    for path in args.old:
        module = bench.load_file(path, f"by_block_{path.stem}")
        variants[f"old:{path.stem}"] = (EVERYWHERE, {"add_chosen": module.add_chosen})
    for path in args.old_parallel:
        module = bench.load_file(path, f"parallel_{path.stem}")
        variants[f"old_forced:{path.stem}"] = ({**EVERYWHERE, "_forced_forward": module._forced_forward}, {})
    lengths = None if args.lengths is None else {int(x) for x in args.lengths.split(",")}
    hkvs = None if args.hkv is None else {int(x) for x in args.hkv.split(",")}
    cases = [(T, hkv) for T, hkv in CASES if (lengths is None or T in lengths) and (hkvs is None or hkv in hkvs)]
    real = None
    if "real" in args.lists.split(","):
        real = bench.real_lists(max(bench.LEN(T) for T, _ in cases), args.real_model, args.real_data)
    for T, hkv in cases:
        T, hkv = bench.LEN(T), min(hkv, bench.H)
        q, k, v = bench.inputs(T, hkv)
        seqs = layout.make_seqs(1, T, T, None, 32, 16, q.device)
        with torch.no_grad():
            lists = {"random": parallel.parallel_infllmv2_select(q, k, **bench.OURS96)}
            if real is not None:
                lists["real"] = real(T)[:, :, :hkv].contiguous()
            for kind, idx in lists.items():
                router = Router()  # as a sparse layer routes its calls (auto)
                run = lambda: parallel.attend_selected(q, k, v, idx, router=router, **bench.OURS96)  # noqa: E731
                spread = round(float(parallel.lists_spread(idx.view(T, hkv, -1), seqs, bench.H // hkv, 1 << 30)), 3)
                with bench.knobs(parallel, **VARIANTS["union"][0]):
                    ref = run().float()
                for rnd in range(args.rounds):
                    for name, (pk, bk) in variants.items():
                        with bench.knobs(parallel, **pk), bench.knobs(by_block, **bk):
                            o = run().float()
                            row = dict(T=T, Hkv=hkv, lists=kind, spread=spread, variant=name, round=rnd,
                                       rel_diff_vs_union=round(((o - ref).abs().max() / ref.abs().max()).item(), 5),
                                       fwd_ms=round(bench.median_ms(run, 5 if T < 200000 else 3), 3))
                            if rnd == 0 and name not in ("union", "auto") and bench.DEV == "cuda":
                                row["kernels_us"] = bench.kernel_split(run, calls=3, top=8)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        bench.empty_cache()
    (args.out / "by_block_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
