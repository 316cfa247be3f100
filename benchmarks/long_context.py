"""Long context at scale (issue 7): a Llama-3-8B-shaped teacher against its 1:3 hybrid, same run, same card.

Speed and memory do not depend on trained weights, so both models are built from a config in
code with random weights (bf16, on the GPU) and the hybrid shares the teacher's tensors.
For each context length: time to first token (prefill), decode ms/token over --decode tokens,
peak GPU memory and cache bytes, through `salaconvert.bench.run.measure`. The teacher runs with
SDPA (cuDNN on an H100) both in one pass, where that may fit, and in chunks (each chunk causal
against the cache, aligned to the last key, with no mask tensor:
salaconvert.models.prefill_attention); the faster counts, and an out-of-memory is recorded, not
fatal. The hybrid prefills in chunks of
--chunk tokens that share one cache. Both decode by replaying a CUDA graph of the whole model's
one-token step (salaconvert.models.graph_decode) on a cache reserved for the whole run, so decode
ms/token is GPU time, not Python and launch overhead.

    python benchmarks/long_context.py --out $OUT [--lengths 32768,131072,262144,524288,1048576]
        [--profile N] [--kernel-profile N]   # where one prefill's time goes: by module kind / by GPU kernel
    python benchmarks/long_context.py --replot results/long_context-h100-run62.json   # its PNG and table again
Writes long_context-<card>.json and long_context-<card>.png under --out; prints a table last.

Both models run under PyTorch's expandable-segments allocator unless PYTORCH_CUDA_ALLOC_CONF says
otherwise: a chunked prefill's buffers grow with the cache every chunk, and the default allocator
pays for fresh segments each time (run 11 of notes-long-context.md: hybrid TTFT at 256K 21.6 →
17.7 s, teacher 40.3 → 39.6 s).
"""
import argparse
import datetime
import gc
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch touches CUDA
import torch  # noqa: E402
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from salaconvert.bench.run import BenchSettings, measure, warm_sparse_path
from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.models.cache import KV_DTYPES
from salaconvert.surgery.convert import convert

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=1 << 20, rope_theta=500000.0,
                 tie_word_embeddings=False)
# A small shape on the CPU, to check the script end to end before spending device time.
SMOKE = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024)
ONE_PASS_TEACHER_MAX = 262144  # beyond this the teacher's one-pass activations + K/V cannot fit in 80 GB


def build_models(shape: dict, device: str, lightning: dict | None = None, sparse: dict | None = None):
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        teacher = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(shape["num_hidden_layers"], "1:3")), lightning=lightning,
                     sparse=sparse)
    return teacher, hybrid


def empty_cache():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_prefill(model, length: int, chunk: int, kv_cache: str = "auto") -> dict:
    """Seconds of one chunked prefill spent in each kind of module (CUDA events around each call)."""
    from salaconvert.bench.run import _reserved_cache
    from salaconvert.eval.forward import prefill
    from salaconvert.layers import LightningAttention, SparseAttention

    layers = getattr(model.model, "layers")
    kinds = {}
    for layer in layers:
        attn = layer.self_attn
        kinds[attn] = {LightningAttention: "lightning", SparseAttention: "sparse"}.get(type(attn), "softmax attention")
        kinds[layer.mlp] = "mlp"
    cuda = next(model.parameters()).is_cuda
    events = {k: [] for k in set(kinds.values())}
    handles = []

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(a, b):
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    for module, kind in kinds.items():
        def pre(mod, args, kind=kind):
            events[kind].append([mark(), None])

        def post(mod, args, out, kind=kind):
            events[kind][-1][1] = mark()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    ids = torch.randint(0, model.config.vocab_size, (length,))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    try:
        prefill(model, ids, chunk, cache=_reserved_cache(model, length, kv_dtype=KV_DTYPES[kv_cache]))
        sync()
    finally:
        for h in handles:
            h.remove()
    total = time.perf_counter() - t0
    split = {k: sum(seconds(a, b) for a, b in v) for k, v in events.items()}
    split["other (embeddings, norms, lm_head, Python)"] = total - sum(split.values())
    empty_cache()
    return {"length": length, "chunk": chunk, "total_s": total, "seconds": split}


def kernel_profile(model, length: int, chunk: int, kv_cache: str = "auto", top: int = 30) -> dict:
    """Where one chunked prefill's time goes (torch.profiler, host and GPU): GPU milliseconds of the
    `top` costliest kernels; the GPU's busy time (union of kernel intervals) against the span from
    the first kernel to the last, the difference being time the GPU waited on the host; and the
    host's CUDA runtime calls that wait (synchronize, copies to the host, allocation) by the code
    that made them."""
    from torch.profiler import ProfilerActivity, profile

    from salaconvert.bench.run import _reserved_cache
    from salaconvert.eval.forward import prefill

    ids = torch.randint(0, model.config.vocab_size, (length,))
    cache = _reserved_cache(model, length, kv_dtype=KV_DTYPES[kv_cache])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        prefill(model, ids, chunk, cache=cache)
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0)
    busy, reach = 0.0, float("-inf")
    for start, end in kernels:  # union of the kernel intervals (µs)
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    waits = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and any(
                w in e.name for w in ("Synchronize", "MemcpyDtoH", "cudaMemcpy", "cudaMalloc", "cuMemMap", "cuMemCreate")):
            ours = [f for f in (e.stack or []) if "salaconvert" in f or "kernels/" in f]
            key = f"{e.name} @ {ours[0] if ours else '?'}"
            n, us = waits.get(key, (0, 0.0))
            waits[key] = (n + 1, us + e.cpu_time_total)
    costly = sorted((e for e in prof.key_averages()  # kernels and copies only: host ops would count their kernels again
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0),
                    key=lambda e: -e.device_time_total)
    empty_cache()
    return {"length": length, "chunk": chunk, "total_gpu_ms": round(sum(e.device_time_total for e in costly) / 1e3, 1),
            "gpu_busy_ms": round(busy / 1e3, 1), "gpu_span_ms": round((reach - kernels[0][0]) / 1e3, 1) if kernels else 0.0,
            "host_waits_ms": {k: [round(us / 1e3, 1), n] for k, (n, us) in
                              sorted(waits.items(), key=lambda kv: -kv[1][1])[:top]},
            "top_ms": {e.key[:90]: [round(e.device_time_total / 1e3, 1), e.count] for e in costly[:top]}}


def run(model, length: int, chunk: int, decode: int, kv_cache: str = "auto") -> dict:
    try:
        row = measure(model, length, BenchSettings([length], decode, chunk, kv_cache=kv_cache))
        row["chunk"] = chunk
    except torch.OutOfMemoryError:
        row = {"length": length, "error": "out of memory", "chunk": chunk}
    empty_cache()
    return row


def run_teacher(teacher, length: int, chunk: int, decode: int) -> dict:
    """The teacher at its best: one pass where it may fit and chunks of `chunk` tokens, the faster
    row kept (both prefill times under "modes"). One pass at 256K fits 80 GB only just, and is
    slower there than chunks (41.0 against 38.1 s in runs 36 and 33; 41.1 against 37.3 s in run 37)."""
    chunks = ([length] if length <= ONE_PASS_TEACHER_MAX else []) + ([chunk] if chunk < length else [])
    rows = [run(teacher, length, c, decode) for c in chunks]
    done = [r for r in rows if "prefill_s" in r]
    best = min(done, key=lambda r: r["prefill_s"]) if done else rows[-1]
    return {**best, "modes": {str(r["chunk"]): r.get("prefill_s", r.get("error")) for r in rows}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--replot", type=Path, help="redraw a report's PNG beside it and print its table; nothing runs")
    ap.add_argument("--lengths", default="32768,131072,262144,524288,1048576")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=16384, help="hybrid prefill chunk")
    ap.add_argument("--teacher-chunk", type=int, default=16384,
                    help="teacher prefill chunk (the teacher also runs in one pass where that may fit; the faster counts)")
    ap.add_argument("--teacher-max", type=int, default=None,
                    help="record longer lengths as not run for the teacher (an earlier run's out-of-memory)")
    ap.add_argument("--profile", type=int, default=None,
                    help="also split one chunked prefill of this many tokens by module kind, teacher and hybrid")
    ap.add_argument("--kernel-profile", type=int, default=None,
                    help="also list the costliest GPU kernels of one hybrid prefill of this many tokens")
    ap.add_argument("--unfused-glue", action="store_true",
                    help="both models' norms, RoPE, gates and MLP products on the PyTorch path (what salaconvert.kernels.norm replaced)")
    ap.add_argument("--kv-cache", choices=tuple(KV_DTYPES), default="auto",
                    help="the hybrid's sparse K/V storage (fp8: half the bytes; results get a -kvfp8 suffix)")
    ap.add_argument("--lightning-gqa", action="store_true",
                    help="the Lightning layers keep the teacher's 8 K/V heads (lightning.gqa; results get a -gqa suffix)")
    ap.add_argument("--coarse-norm", action="store_true",
                    help="the sparse selection's normaliser from the coarse pool (sparse.coarse_norm; a -coarse suffix)")
    ap.add_argument("--smoke", action="store_true", help="a small model on the CPU at the given (short) lengths")
    args = ap.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report, args.replot.with_suffix(".png"))
        print_table(report)
        return
    if args.out is None:
        ap.error("--out is required (or --replot)")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.unfused_glue:
        import salaconvert.layers.common as common
        common.fuse_glue = lambda *a: False
    device = "cpu" if args.smoke else "cuda"
    teacher, hybrid = build_models(SMOKE if args.smoke else LLAMA3_8B, device, {"gqa": args.lightning_gqa},
                                   {"coarse_norm": args.coarse_norm})
    warm = min([4096, *lengths])
    run(teacher, warm, warm, 4)  # warm-up: kernels compiled, allocator primed
    run(hybrid, warm, warm, 4, args.kv_cache)
    warm_sparse_path(hybrid, max(lengths), args.chunk, args.kv_cache)  # the sparse path's kernels, every width
    rows = []
    teacher_failed = False
    for n in lengths:
        if args.teacher_max is not None and n > args.teacher_max:
            t = {"length": n, "skipped": f"not run above {args.teacher_max} (out of memory there in an earlier run)"}
        elif teacher_failed:
            t = {"length": n, "skipped": "after out of memory"}
        else:
            t = run_teacher(teacher, n, args.teacher_chunk, args.decode)
        teacher_failed = teacher_failed or "error" in t
        h = run(hybrid, n, min(args.chunk, n), args.decode, args.kv_cache)
        rows.append({"length": n, "teacher": t, "hybrid": h})
        print(json.dumps(rows[-1]), flush=True)
    profile = None
    if args.profile:
        profile = {"teacher": profile_prefill(teacher, args.profile, args.teacher_chunk),
                   "hybrid": profile_prefill(hybrid, args.profile, args.chunk, args.kv_cache)}
        print(json.dumps(profile), flush=True)
    kernels = None
    if args.kernel_profile and not args.smoke:
        kernels = kernel_profile(hybrid, args.kernel_profile, args.chunk, args.kv_cache)
        print(json.dumps(kernels), flush=True)
    card_name = "cpu-smoke" if args.smoke else torch.cuda.get_device_name()
    card = (card_name.replace(" ", "-") + ("-kvfp8" if args.kv_cache == "fp8" else "")
            + ("-gqa" if args.lightning_gqa else "") + ("-coarse" if args.coarse_norm else ""))
    report = {
        "what": "Llama-3-8B-shaped teacher (random weights, bf16, SDPA) vs its 1:3 salaconvert hybrid",
        "card": card_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "layer_types": hybrid.config.layer_types, "lightning": hybrid.config.lightning, "sparse": hybrid.config.sparse,
        "decode_tokens": args.decode, "kv_cache": args.kv_cache,
        "fused_glue": not args.unfused_glue,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "cache_bytes_per_token": hybrid.config.cache_bytes_per_token(2), "rows": rows, "profile": profile,
        "hybrid_kernels": kernels,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"long_context-{card}.json").write_text(json.dumps(report, indent=2) + "\n")
    if rows:
        plot(report, args.out / f"long_context-{card}.png")
        print_table(report)


def _get(row, key, scale=1.0):
    if key in row:
        return f"{row[key] * scale:.1f}"
    return "OOM" if "memory" in row.get("error", "") else "–"


def print_table(report):
    print(f"{'length':>8} | {'TTFT teacher s':>14} {'TTFT hybrid s':>13} {'speedup':>7} | "
          f"{'dec ms T':>8} {'dec ms H':>8} | {'peak GB T':>9} {'peak GB H':>9}")
    for r in report["rows"]:
        t, h = r["teacher"], r["hybrid"]
        speed = f"{t['prefill_s'] / h['prefill_s']:.2f}x" if "prefill_s" in t and "prefill_s" in h else "–"
        print(f"{r['length']:>8} | {_get(t, 'prefill_s'):>14} {_get(h, 'prefill_s'):>13} {speed:>7} | "
              f"{_get(t, 'decode_ms_per_token'):>8} {_get(h, 'decode_ms_per_token'):>8} | "
              f"{_get(t, 'peak_memory_bytes', 1e-9):>9} {_get(h, 'peak_memory_bytes', 1e-9):>9}")


def plot(report, path):
    """Time to first token, the teacher / hybrid ratio against issue 7's 5× target, decode ms/token and
    peak memory against context length; lengths the teacher could not run are marked in each panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = report["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    panels = (("prefill_s", 1, "time to first token (s)"), None, ("decode_ms_per_token", 1, "decode ms/token"),
              ("peak_memory_bytes", 1e-9, "peak GPU memory (GB)"))
    for ax, panel in zip(axes, panels):
        if panel is None:
            pts = [(r["length"], r["teacher"]["prefill_s"] / r["hybrid"]["prefill_s"]) for r in rows
                   if "prefill_s" in r["teacher"] and "prefill_s" in r["hybrid"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", color="C2", label="teacher / hybrid")
                for n, ratio in pts:
                    ax.annotate(f"{ratio:.2f}×", (n, ratio), textcoords="offset points", xytext=(0, 6), ha="center")
            ax.axhline(5, color="C3", ls="--", label="target at 256K (5×)")
            ax.set_ylim(0, max([5.5] + [1.15 * ratio for _, ratio in pts]))
            ax.set_title("time to first token: speedup")
            ax.legend(loc="lower right")
        else:
            key, scale, title = panel
            for label in ("teacher", "hybrid"):
                pts = [(r["length"], r[label][key] * scale) for r in rows if key in r[label]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.set_title(title)
        for r in rows:
            if "prefill_s" not in r["teacher"]:
                ax.axvline(r["length"], color="0.8", ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
    missing = [r["length"] for r in rows if "prefill_s" not in r["teacher"]]
    if missing:
        axes[0].text(missing[0], axes[0].get_ylim()[1] * 0.95, "teacher: out of memory ", color="0.4", ha="right",
                     va="top")
    axes[0].legend(loc="center left")
    fig.suptitle(report["what"] + f" — {report['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
