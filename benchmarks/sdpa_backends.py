"""Which SDPA backend is the dense baseline? Every backend on the shapes issues 4 and 7 compare against.

    python benchmarks/sdpa_backends.py --out DIR

The anchors (../shared/anchors) time `F.scaled_dot_product_attention(q, k, v, is_causal=True)` with
torch's default backend choice; a benchmark that forces one backend must know how it compares.
Rows: causal forward (B = 1, Hq = 32, d = 128, bf16, K/V expanded, [B, H, T, d]) at 32K and 128K,
forward + backward at 32K, and the teacher's chunked-prefill call of issue 7 (a 16K chunk after
240K cached keys, causal aligned to the last key: SDPA with a lower-right bias, and
salaconvert.layers.common.causal_attention over Hkv = 8, which the backend switch does not steer).
Each backend that refuses a shape is recorded as such. Writes DIR/sdpa_backends-<card>.json.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from salaconvert.layers.common import _prefix_plus_chunk, causal_attention

sdpa = torch.nn.functional.scaled_dot_product_attention
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_case(name: str, call, backend, reps: int) -> dict:
    def fn():
        if backend is None:
            return call()
        with sdpa_kernel(backend):
            return call()
    try:
        return dict(case=name, ms=round(time_ms(fn, reps), 3))
    except RuntimeError as e:
        return dict(case=name, error=str(e).splitlines()[0][:200])
    finally:
        torch.cuda.empty_cache()


def cases():
    dev, dt, H, D = "cuda", torch.bfloat16, 32, 128
    for T in (32768, 131072):
        q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=dt) for _ in range(3))
        yield f"fwd_causal_{T // 1024}K", (lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True)), 3
    T = 32768
    q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    def fwd_bwd():
        sdpa(q, k, v, is_causal=True).backward(torch.ones_like(q))
    yield "fwdbwd_causal_32K", fwd_bwd, 3
    q = torch.randn(1, H, T, D, device=dev, dtype=dt)
    k8, v8 = (torch.randn(1, 8, T, D, device=dev, dtype=dt) for _ in range(2))
    yield "fwd_causal_32K_gqa8_enable_gqa", (lambda: sdpa(q, k8, v8, is_causal=True, enable_gqa=True)), 3
    yield "fwd_causal_32K_gqa8_expanded", (lambda: sdpa(q, k8.repeat_interleave(4, 1), v8.repeat_interleave(4, 1),
                                                        is_causal=True)), 3
    T, S = 16384, 262144
    qc = torch.randn(1, H, T, D, device=dev, dtype=dt)
    kc, vc = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(2))
    yield "chunk_16K_of_256K_lower_right", (lambda: sdpa(qc, kc, vc, attn_mask=causal_lower_right(T, S))), 3
    yield "chunk_16K_x_240K_prefix_nomask", (lambda: sdpa(qc, kc[:, :, :S - T], vc[:, :, :S - T])), 3
    k8, v8 = kc[:, ::4].contiguous(), vc[:, ::4].contiguous()
    yield "chunk_16K_of_256K_gqa8_salaconvert", (lambda: causal_attention(qc, k8, v8)), 3
    # cuDNN's own GQA: the same two calls on the 8 K/V heads, no repeat (max |diff| in `gqa_check`)
    yield "chunk_16K_of_256K_gqa8_cudnn_unrepeated", (lambda: _prefix_plus_chunk(qc, k8, v8, None)), 3


def gqa_check() -> dict:
    """Whether cuDNN's attention takes 8 K/V heads for 32 query heads, and agrees with the repeat."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, 32, 1024, 128, device=dev, dtype=dt)
    k, v = (torch.randn(1, 8, 4096, 128, device=dev, dtype=dt) for _ in range(2))
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, True)
    out = dict(can_use_cudnn_gqa=torch.backends.cuda.can_use_cudnn_attention(params))
    try:
        got = _prefix_plus_chunk(q, k, v, None)
    except RuntimeError as e:
        return dict(out, error=str(e).splitlines()[0][:200])
    want = _prefix_plus_chunk(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), None)
    return dict(out, max_abs_diff=(got.float() - want.float()).abs().max().item())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for name, call, reps in cases():
        for label, backend in BACKENDS.items():
            row = dict(backend=label, **run_case(name, call, backend, reps))
            print(json.dumps(row), flush=True)
            rows.append(row)
    card = torch.cuda.get_device_name().replace(" ", "_")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from infllmv2 import sdpa_choice  # the same shape, dtype and call

    meta = dict(torch=torch.__version__, card=torch.cuda.get_device_name(), default_choice=sdpa_choice(),
                gqa_check=gqa_check())
    print(json.dumps(meta), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"sdpa_backends-{card}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
