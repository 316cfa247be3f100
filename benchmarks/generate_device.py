"""`generate` on the device: greedy decoding through CUDA graphs vs transformers' `generate`.

Loads the teacher and hybrid that `benchmarks/eval_device.py --stage prepare` writes (smollm2-135m,
bf16), continues one prompt both ways, and records the tokens/s and whether the texts are equal.

    python3 benchmarks/generate_device.py --out $OUT [--work /tmp/evalwork] [--new-tokens 128]
"""
import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/evalwork")
    p.add_argument("--out", required=True)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    from salaconvert.generate import generate_text, load_for_generation

    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    rows = []
    for name in ("teacher", "hybrid"):
        model, tok = load_for_generation(str(Path(args.work) / name))
        generate_text(model, tok, prompt, 8, graph_decode=True)  # warm-up: Triton and cuBLAS kernels
        generate_text(model, tok, prompt, 8, graph_decode=False)
        runs = {str(g): generate_text(model, tok, prompt, args.new_tokens, graph_decode=g) for g in (True, False)}
        row = {"model": name, "same_text": runs["True"]["text"] == runs["False"]["text"],
               **{f"{'graph' if g == 'True' else 'transformers'}_{k}": v for g, r in runs.items() for k, v in r.items()
                  if k != "text"},
               "text": runs["True"]["text"][:200]}
        for g in ("graph", "transformers"):
            row[f"{g}_tokens_per_s"] = row[f"{g}_new_tokens"] / row[f"{g}_seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate_device.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                          "prompt": prompt, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
