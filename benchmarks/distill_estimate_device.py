"""Issue 8 on the device: is `distill --estimate` right for an 8B model?

Builds a Llama-3-8B-shaped teacher from a config in code (random weights, bf16, on the GPU), its
1:3 hybrid, prints the estimate of the HALO recipe's stages 1 and 2 (micro-batches 4 and 8 of 512
tokens, bf16 autocast, gradient checkpointing), then runs a few real optimizer steps of each stage
through the training loop `salaconvert distill` uses (random token ids: memory does not depend on
the text) and compares each stage's measured peak with the estimate.

    python3 benchmarks/distill_estimate_device.py --out $OUT            # H100, ~2 minutes
    python3 benchmarks/distill_estimate_device.py --out /tmp/x --smoke  # tiny shape, CPU, checks the script

Writes distill_estimate.json to --out: per stage the estimate by component, the measured peak
allocated and reserved bytes, their ratio and tokens/s.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                 tie_word_embeddings=False)
SMOKE = dict(LLAMA3_8B, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
T0 = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {what}", flush=True)


def build_pair(shape: dict, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from salaconvert.layer_selection import LayerPlan, uniform_layer_types
    from salaconvert.surgery.convert import convert

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    student = convert(teacher, LayerPlan(uniform_layer_types(shape["num_hidden_layers"], "1:3")))
    teacher.requires_grad_(False).eval()
    student.requires_grad_(False).eval()
    return teacher, student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage (2 micro-batches each)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from salaconvert.cli.distill import print_estimate
    from salaconvert.distill import train
    from salaconvert.distill.estimate import estimate_memory
    from salaconvert.distill.recipe import load_recipe
    from salaconvert.distill.run import make_accelerator
    from salaconvert.units import human_bytes

    device = "cpu" if args.smoke else "cuda"
    shape = SMOKE if args.smoke else LLAMA3_8B
    # The published recipe's micro-batches; two per optimizer step so gradient accumulation runs too.
    halo = load_recipe("halo")
    overrides = [f"stage{n}.{k}={v}" for n in (1, 2) for k, v in
                 (("steps", args.steps), ("batch_size", 2 * halo.stage(n).micro_batch_size), ("warmup_steps", 0))]
    recipe = load_recipe("halo", overrides + ["runtime.checkpoint_every=0", "runtime.gradient_checkpointing=on"])

    log(f"building the {'smoke' if args.smoke else 'Llama-3-8B'}-shaped teacher and its 1:3 hybrid on {device}")
    teacher, student = build_pair(shape, device)
    estimate = estimate_memory(student.config, recipe, (1, 2), bf16=True, gradient_checkpointing=True)
    print_estimate(estimate, "a Llama-3-8B-shaped 1:3 hybrid" if not args.smoke else "the smoke shape")
    log(f"teacher {estimate['params']['teacher'] / 1e9:.2f}B parameters, hybrid {estimate['params']['student'] / 1e9:.2f}B")

    accelerator = make_accelerator(recipe, cpu=args.smoke)
    need = max(recipe.stage(n).num_steps() * recipe.stage(n).batch_size * recipe.stage(n).seq_len for n in (1, 2)) + 1024
    stream = torch.randint(0, shape["vocab_size"], (need,), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as run_dir:
        session = train.Session(teacher, student, recipe, accelerator, stream, Path(run_dir), train.RunState())
        stages = {}
        for n in (1, 2):
            t = time.perf_counter()
            train.run_stage(session, n)
            secs = time.perf_counter() - t
            est = estimate["stages"][n]["total"]
            row = {"estimate_bytes": est, "estimate_parts": estimate["stages"][n]["parts"],
                   "fits_80GB_estimated": estimate["stages"][n]["fits"],
                   "steps": recipe.stage(n).num_steps(), "micro_batch": recipe.stage(n).micro_batch_size,
                   "seq_len": recipe.stage(n).seq_len, "seconds_incl_first_step": secs,
                   "loss": session.state.losses[str(n)]}
            if device == "cuda":
                alloc = session.state.peak_memory[str(n)]
                reserved = torch.cuda.max_memory_reserved()
                row.update(peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                           estimate_over_allocated=est / alloc, estimate_over_reserved=est / reserved,
                           within_15pct_of_reserved=abs(est / reserved - 1) <= 0.15)
                log(f"stage {n}: estimate {human_bytes(est)}, measured peak {human_bytes(alloc)} allocated / "
                    f"{human_bytes(reserved)} reserved → estimate/reserved {est / reserved:.3f}; {secs:.1f}s")
            else:
                log(f"stage {n}: ran {row['steps']} steps in {secs:.1f}s (no GPU: nothing to compare)")
            stages[n] = row
    result = {"shape": shape, "recipe": recipe.to_dict(), "stages": stages, "params": estimate["params"],
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "distill_estimate.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {out / 'distill_estimate.json'}")


if __name__ == "__main__":
    main()
