"""Issue 8 on the device: stage 1 then stage 2 of smollm2-135m's converted hybrid on the shared
corpus, then held-out perplexity of teacher, hybrid before and after, with tokens/s and peak memory.

Run on the device after the two bundle calls of /work/shared/tools/device-bundle.sh:
    source /tmp/device-env.sh && pip install -q --no-deps --no-build-isolation . &&
    PYTHONUNBUFFERED=1 python3 benchmarks/distill_device.py --out $OUT
Several GPUs: `--prepare-only` once, then `accelerate launch --num_processes N benchmarks/distill_device.py ...`.
The GGUF teacher is de-quantised once into an HF directory (fp32), converted (1:3, first/last
sparse), then distilled with recipes/debug/smollm2-h100.yaml. Writes distill_device.json,
metrics.jsonl and the log to --out.
"""
import argparse
import json
import time
from pathlib import Path

T0 = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def prepare(gguf: str, work: Path, lightning: dict | None = None) -> tuple[Path, Path]:
    from salaconvert.cli.common import quiet_transformers
    from salaconvert.convert import convert_model
    from salaconvert.io.load import resolve_source, save_as_hf_directory

    quiet_transformers()
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        save_as_hf_directory(resolve_source(gguf), teacher, "float32")
        log(f"teacher saved to {teacher}")
    if not (work / "hybrid" / "config.json").exists():
        report = convert_model(str(teacher), work / "hybrid", ratio="1:3", lightning=lightning, step=log)
        log(f"converted: {report['counts']}")
    return teacher, work / "hybrid"


def steady_rate(metrics: list[dict], stage: int, skip: int = 20) -> float | None:
    """Tokens/s of a stage between its `skip`-th logged step and its last (compile/warm-up excluded)."""
    rows = [r for r in metrics if r["stage"] == stage]
    rows = [r for r in rows if r["step"] >= skip] or rows
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    return (b["tokens"] - a["tokens"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data", nargs="+", default=[f"/tmp/corpus/{n}.jsonl" for n in ("austen", "python-docs", "linux-docs")])
    p.add_argument("--work", default="/tmp/distillwork")
    p.add_argument("--recipe", default="debug/smollm2-h100")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--lightning-gqa", action="store_true",
                   help="convert with lightning.gqa (the Lightning layers keep the teacher's K/V heads); use its own --work")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the teacher and hybrid checkpoints (before an `accelerate launch` of this script)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from salaconvert.distill.run import distill

    teacher, hybrid = prepare(args.gguf, Path(args.work), {"gqa": args.lightning_gqa})
    if args.prepare_only:
        return
    log(f"distilling on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    report = distill(hybrid, str(teacher), args.data, Path(args.work) / "distilled", recipe=args.recipe,
                     overrides=args.set, overwrite=True, step=log)
    if not report["main_process"]:  # under accelerate launch the main process reports
        return
    metrics = [json.loads(line) for line in (Path(args.work) / "distilled" / "metrics.jsonl").read_text().splitlines()]
    report["steady_tokens_per_s"] = {str(n): steady_rate(metrics, n) for n in (1, 2)}
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report["torch"] = torch.__version__
    report["lightning_gqa"] = args.lightning_gqa
    ppl = report["perplexity"]
    report["student_after_over_teacher"] = ppl["student_after"] / ppl["teacher"]
    (out / "distill_device.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    log(f"perplexity: teacher {ppl['teacher']:.2f}, before {ppl['student_before']:.1f}, after {ppl['student_after']:.2f} "
        f"({report['student_after_over_teacher']:.3f}× teacher)")
    log(f"tokens/s steady: {report['steady_tokens_per_s']}; peak memory "
        f"{report.get('peak_memory_bytes', 0) / 2**30:.1f} GiB; tokens {report['tokens']}")


if __name__ == "__main__":
    main()
