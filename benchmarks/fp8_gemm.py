"""The GEMMs of the Llama-3-8B-shaped hybrid's prefill (issue 7) in bf16 against fp8, same run, same card.

At 256K tokens the 8B hybrid spends 5.4 of its 9.0 s of prefill in bf16 GEMMs that it shares with
its teacher (notes-long-context.md, run 58), so they decide how close it can come to 5× its
teacher. This times every projection and MLP product of one decoder layer on one 16K-token chunk,
[M, K] x [K, N] with M = --tokens:
- bf16: `x @ w.t()`, what both models run;
- fp8 e4m3 through `torch._scaled_mm`, with one scale per tensor, and with one scale per token
  row and per output channel (rowwise);
- the activations' quantisation to fp8 with a scale per row in plain PyTorch (amax, divide, cast),
  an upper bound for what a fused kernel would cost;
and the relative error of each fp8 product against the bf16 one. Per-layer sums are scaled to one
256K prefill (32 layers, 16 chunks).

    python benchmarks/fp8_gemm.py --out $OUT
Writes fp8_gemm-<card>.json under --out and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

# (name, N, K, products per layer) for Llama-3-8B (hidden 4096, 8 KV heads of 128, FFN 14336) and
# its hybrid, whose every layer adds an output gate (4096 x 4096) to q, k, v and o.
SHAPES = [("q / o / gate z", 4096, 4096, 3), ("k / v", 1024, 4096, 2), ("MLP gate / up", 14336, 4096, 2),
          ("MLP down", 4096, 14336, 1)]
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (fp8 [R, C], fp32 scale [R, 1]) with x ≈ q · scale."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def time_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_shape(M: int, N: int, K: int, iters: int) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    ws = ws.t().contiguous()  # [1, N]: one scale per output channel
    x_t, w_t = x.float().abs().max() / FP8_MAX, w.float().abs().max() / FP8_MAX
    xq_t, wq_t = (x.float() / x_t).to(FP8), (w.float() / w_t).to(FP8)

    def tensorwise():
        return torch._scaled_mm(xq_t, wq_t.t(), scale_a=x_t, scale_b=w_t, out_dtype=torch.bfloat16)

    def rowwise():
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)

    ref = x @ w.t()
    row = {"M": M, "N": N, "K": K,
           "bf16_ms": time_ms(lambda: x @ w.t(), iters),
           "fp8_tensorwise_ms": time_ms(tensorwise, iters),
           "fp8_rowwise_ms": time_ms(rowwise, iters),
           "quantize_rows_ms": time_ms(lambda: quantize_rows(x), iters),
           "rel_err_tensorwise": rel(tensorwise(), ref), "rel_err_rowwise": rel(rowwise(), ref)}
    flop = 2 * M * N * K
    for k in ("bf16", "fp8_tensorwise", "fp8_rowwise"):
        row[f"{k}_tflops"] = flop / row[f"{k}_ms"] / 1e9
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=16384, help="rows of each product (the prefill chunk)")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    rows = []
    for name, N, K, per_layer in SHAPES:
        rows.append({"name": name, "per_layer": per_layer, **bench_shape(args.tokens, N, K, args.iters)})
        print(json.dumps(rows[-1]), flush=True)
    calls = 32 * (262144 // args.tokens)  # one 256K prefill: 32 layers x its chunks
    totals = {k: calls * sum(r["per_layer"] * r[k] for r in rows) / 1e3
              for k in ("bf16_ms", "fp8_tensorwise_ms", "fp8_rowwise_ms")}
    # the activations each layer quantises: the normed input (once, shared by q, k, v, z), the
    # attention output (o), the normed MLP input (gate, up) and the SiLU product (down)
    quant = {4096: 3, 14336: 1}
    totals["quantize_rows_s"] = calls * sum(n * next(r["quantize_rows_ms"] for r in rows if r["K"] == K)
                                           for K, n in quant.items()) / 1e3
    report = {"what": "bf16 vs fp8 GEMMs of one Llama-3-8B-shaped hybrid layer on a chunk of --tokens rows",
              "card": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "tokens": args.tokens, "rows": rows,
              "prefill_256k_seconds": {k.replace("_ms", "_s"): v for k, v in totals.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name().replace(" ", "-")
    (args.out / f"fp8_gemm-{card}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'product':>16} {'N':>6} {'K':>6} | {'bf16 TFLOPS':>11} {'fp8 tensor':>10} {'fp8 row':>8} | "
          f"{'quant ms':>8} {'err row':>8}")
    for r in rows:
        print(f"{r['name']:>16} {r['N']:>6} {r['K']:>6} | {r['bf16_tflops']:>11.0f} {r['fp8_tensorwise_tflops']:>10.0f} "
              f"{r['fp8_rowwise_tflops']:>8.0f} | {r['quantize_rows_ms']:>8.3f} {r['rel_err_rowwise']:>8.4f}")
    print("one 256K prefill, s:", {k: round(v, 2) for k, v in report["prefill_256k_seconds"].items()})


if __name__ == "__main__":
    main()
