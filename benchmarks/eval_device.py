"""Issue 6 on the device: `eval` (NIAH heatmaps 1K–32K, held-out perplexity) and `bench` (1K–128K)
of smollm2-135m's converted hybrid beside the teacher, through the same library functions as the CLI.

Run on the device after the two bundle calls of /work/shared/tools/device-bundle.sh:
    source /tmp/device-env.sh && pip install -q --no-deps --no-build-isolation . &&
    python3 benchmarks/eval_device.py --stage prepare,eval --out $OUT
    python3 benchmarks/eval_device.py --stage bench --out $OUT    (a second call, machine still warm)
`prepare` de-quantizes the GGUF teacher once into an HF directory (bfloat16) and converts it
(ratio 1:3, first/last sparse), so that later loads take seconds. Results go to --out as
eval.json, eval_heatmaps.png, eval_ppl.png, bench.json, bench.md, bench.png.
"""
import argparse
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def prepare(gguf: str, work: Path) -> None:
    from salaconvert.cli.common import quiet_transformers
    from salaconvert.convert import convert_model
    from salaconvert.io.load import resolve_source, save_as_hf_directory

    quiet_transformers()
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        save_as_hf_directory(resolve_source(gguf), teacher, "bfloat16")
        log(f"teacher saved to {teacher}")
    if not (work / "hybrid" / "config.json").exists():
        report = convert_model(str(teacher), work / "hybrid", ratio="1:3", step=log)
        log(f"converted: {report['counts']}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", default="prepare,bench,eval")
    p.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--data", nargs="+", default=[f"/tmp/corpus/{n}.jsonl" for n in ("austen", "python-docs", "linux-docs")])
    p.add_argument("--work", default="/tmp/evalwork")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-lengths", default="1K,2K,4K,8K,16K,32K")
    p.add_argument("--bench-lengths", default="1K,2K,4K,8K,16K,32K,64K,128K")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--ppl-tokens", type=int, default=32768)
    p.add_argument("--eval-budget", type=float, default=150, help="seconds per model (shortest lengths first)")
    p.add_argument("--bench-budget", type=float, default=100, help="seconds per model (shortest lengths first)")
    args = p.parse_args()
    from salaconvert.cli.common import quiet_transformers
    from salaconvert.eval.options import parse_floats, parse_lengths

    quiet_transformers()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    stages = args.stage.split(",")
    if "prepare" in stages:
        prepare(args.gguf, work)
    hybrid, teacher = str(work / "hybrid"), str(work / "teacher")
    if "bench" in stages:
        from salaconvert.bench import BenchSettings, run_bench
        from salaconvert.bench.report import markdown

        report = run_bench(hybrid, teacher, BenchSettings(parse_lengths(args.bench_lengths), decode_tokens=32, repeats=2,
                                                   time_budget_s=args.bench_budget),
                           out, step=log)
        print(markdown(report), flush=True)
    if "eval" in stages:
        from rich.console import Console

        from salaconvert.eval import EvalSettings, run_eval
        from salaconvert.eval.report import tables

        settings = EvalSettings(tasks=["ppl", "passkey", "niah_single", "niah_multi", "lmeval"],
                                lengths=parse_lengths(args.eval_lengths), depths=parse_floats(args.depths, "--depths"),
                                trials=args.trials, ppl_tokens=args.ppl_tokens, time_budget_s=args.eval_budget)
        report = run_eval(hybrid, teacher, args.data, settings, out, step=log)
        console = Console(file=sys.stdout, width=140)
        for t in tables(report):
            console.print(t)
    log("done")


if __name__ == "__main__":
    main()
