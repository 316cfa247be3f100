"""Where a stage-2 distillation step spends its time (issue 8's throughput target), on the device.

Builds smollm2-135m's 1:3 hybrid in memory from the GGUF, runs a few steps of stage 1 and stage 2
of recipes/debug/smollm2-h100.yaml (B = 32, T = 512, bf16) through the real training loop under
torch.profiler, and prints per stage the steady tokens/s and the top CUDA kernels by total time.

    python3 benchmarks/distill_profile.py --out $OUT [--steps 8]
Writes distill_profile.json (tokens/s, top kernels) and the two profiler tables to --out.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

T0 = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8, help="profiled steps per stage (3 more warm up; tokens/s excludes them)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from torch.profiler import ProfilerActivity, profile

    from salaconvert.distill import train
    from salaconvert.distill.recipe import load_recipe
    from salaconvert.distill.run import make_accelerator
    from salaconvert.io.load import load_model, resolve_source
    from salaconvert.layer_selection import LayerPlan, uniform_layer_types
    from salaconvert.surgery.convert import convert

    teacher = load_model(resolve_source(args.gguf), "float32")
    student = convert(teacher, LayerPlan(uniform_layer_types(teacher.config.num_hidden_layers, "1:3")))
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    warm = 3
    recipe = load_recipe("debug/smollm2-h100", [f"stage{n}.steps={warm + args.steps}" for n in (1, 2)]
                         + ["stage1.max_seconds=null", "stage2.max_seconds=null", "runtime.log_every=1"])
    accelerator = make_accelerator(recipe)
    for p in teacher.parameters():  # as distill does: frozen weights in bf16 (shared with the student)
        p.data = p.data.to(torch.bfloat16)
    teacher.to(accelerator.device)
    student.to(accelerator.device)
    need = max(recipe.stage(n).num_steps() * recipe.stage(n).batch_size * recipe.stage(n).seq_len for n in (1, 2)) + 1024
    stream = torch.randint(0, teacher.config.vocab_size, (need,), generator=torch.Generator().manual_seed(0))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "stages": {}}
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = Path(run_dir) / "metrics.jsonl"
        session = train.Session(teacher, student, recipe, accelerator, stream, Path(run_dir), train.RunState(),
                                metrics_path=metrics)
        for n in (1, 2):
            steps = recipe.stage(n).num_steps()
            # the whole stage, warm-up included: compilation is CPU time, so the CUDA shares stand
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                train.run_stage(session, n)
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            rows = [r for r in rows if r["stage"] == n]
            a, b = rows[warm - 1], rows[-1]
            tps = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            (out / f"profile_stage{n}.txt").write_text(table + "\n")
            top = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:30]
            result["stages"][n] = {"steady_tokens_per_s": tps, "profiled_steps": steps,
                                   "top_cuda": [{"name": e.key[:120], "cuda_ms_total": e.device_time_total / 1e3,
                                                 "calls": e.count} for e in top]}
            log(f"stage {n}: {tps:,.0f} tokens/s steady")
            print(table, flush=True)
    (out / "distill_profile.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
