"""Stage-2 step variants on the device: where the time goes and what fusing buys (issue 8).

Builds smollm2-135m's 1:3 hybrid from the GGUF as distill does (frozen tensors shared in bf16,
every student parameter trainable in fp32, fused AdamW, bf16 autocast, B = 32, T = 512) and times
the stage-2 step (teacher forward, student forward, chunked KL, backward, optimizer) per variant:

  eager      the step as salaconvert.distill.train runs it, without gradient checkpointing
  nokl       the KL replaced by a trivial loss on the student's hidden states (the KL's cost)
  compiled   each decoder layer of both models under torch.compile, as distill does on the GPU
             (runtime.compile; the Triton attention ops stay eager behind torch.compiler.disable)

Per variant: steady tokens/s over --steps steps, and one step split by CUDA events into its parts.
One eager step also runs under torch.cuda.set_sync_debug_mode to list host syncs by call site.

    python3 benchmarks/distill_step.py --out $OUT [--variants eager,compiled] [--steps 10]
"""
import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

T0 = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def build(gguf: str):
    from salaconvert.distill.pair import set_trainable, share_frozen, trainable_names
    from salaconvert.io.load import load_model, resolve_source
    from salaconvert.layer_selection import LayerPlan, uniform_layer_types
    from salaconvert.surgery.convert import convert

    teacher = load_model(resolve_source(gguf), "float32")
    student = convert(teacher, LayerPlan(uniform_layer_types(teacher.config.num_hidden_layers, "1:3")))
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    share_frozen(student, teacher)
    for p in teacher.parameters():
        p.data = p.data.to(torch.bfloat16)
    teacher.cuda()
    student.cuda()
    params = set_trainable(student, teacher, trainable_names(student, "all"))
    return teacher, student, params


def make_step(teacher, student, params, loss_kind: str):
    from salaconvert.distill.losses import chunked_kl

    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    head_s, head_t = student.lm_head.weight, teacher.lm_head.weight

    def step(ids, marks=None):
        def mark(name):
            if marks is not None:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks.append((name, e))

        mark("start")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                ht = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
            mark("teacher_fwd")
            hs = student.model(input_ids=ids, use_cache=False).last_hidden_state
            mark("student_fwd")
            if loss_kind == "kl":
                loss = chunked_kl(hs, ht, head_s, head_t, 512, 1.0)
            else:
                loss = hs.float().square().mean()
            mark("loss_fwd")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss

    return step


def timed(step, batches, steps: int) -> dict:
    for ids in batches[:3]:
        step(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for ids in batches[3:3 + steps]:
        loss = step(ids)
    loss.item()
    dt = time.perf_counter() - t
    tokens = steps * batches[0].numel()
    marks = []
    step(batches[0], marks)
    torch.cuda.synchronize()
    parts = {name: marks[i - 1][1].elapsed_time(e) for i, (name, e) in enumerate(marks) if i}
    return {"tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps, "parts_ms": parts,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def find_syncs(step, ids) -> list:
    sites = Counter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(ids)
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return sites.most_common(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="eager,nokl,compiled")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "B": 32, "T": 512, "variants": {}}

    teacher, student, params = build(args.gguf)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, teacher.config.vocab_size, (32, 512), generator=g).cuda() for _ in range(3 + args.steps)]
    log("built")
    for variant in args.variants.split(","):
        try:
            if variant == "compiled":
                from salaconvert.distill.train import compile_layers

                compile_layers(student)
                compile_layers(teacher)
            step = make_step(teacher, student, params, "trivial" if variant == "nokl" else "kl")
            if variant == "eager":
                result["syncs"] = find_syncs(step, batches[0])
                log(f"syncs: {result['syncs']}")
            torch.cuda.reset_peak_memory_stats()
            r = timed(step, batches, args.steps)
            result["variants"][variant] = r
            log(f"{variant}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step, parts "
                + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items()))
        except Exception:
            result["variants"][variant] = {"error": traceback.format_exc()[-2000:]}
            log(f"{variant} failed:\n{traceback.format_exc()[-2000:]}")
        (out / "distill_step.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
