"""Stage 2 of InfLLM-V2, two versions of `parallel.py` in one process on the same fixed block lists.

    git show 489fc3b:kernels/infllmv2/parallel.py > /tmp/parallel_old.py
    python benchmarks/stage2_ab.py --old /tmp/parallel_old.py --out $OUT [--rounds 3]

Times made in separate processes differ by more than the changes worth measuring (the spread
between calls on the lent GPUs is 3–8%), so this imports an older `parallel.py` next to the
installed one and alternates them, round after round: the forward (and forward + backward where
marked) of stage 2 on the benchmark's random inputs (benchmarks/infllmv2.py), on the lists of one
selection, so both versions walk the same lists: `attend_selected` where the version has it,
else `parallel_infllmv2_attn(block_indices=)` (which older versions treated alike). Also records each
output's largest difference from the first version's, relative to max |o|. Writes
DIR/stage2-ab.json (runs 27, 30 and 31 of notes-infllmv2.md). --smoke: tiny shapes on the CPU
under TRITON_INTERPRET=1, a check of the script (its times mean nothing).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import infllmv2 as bench  # noqa: E402
from salaconvert.kernels.infllmv2 import parallel as new  # noqa: E402

# (T, Hkv, with forward + backward)
CASES = [(32768, 2, True), (32768, 8, True), (65536, 2, True), (131072, 2, False), (131072, 8, False),
         (262144, 8, False)]


def stage2(module):
    """Stage 2 of a version of parallel.py over one selection's lists."""
    if hasattr(module, "attend_selected"):
        return lambda q, k, v, idx: module.attend_selected(q, k, v, idx, **bench.OURS96)
    return lambda q, k, v, idx: module.parallel_infllmv2_attn(q, k, v, block_indices=idx, **bench.OURS96)


def main():
    args = bench.ab_args(__doc__, "parallel.py")
    versions = {"old": bench.load_file(args.old, "parallel_old"), "new": new}
    rows = []
    for T, hkv, backward in CASES:
        T = bench.LEN(T)
        hkv = min(hkv, bench.H)
        q, k, v = bench.inputs(T, hkv)
        with torch.no_grad():
            idx = new.parallel_infllmv2_select(q, k, **bench.OURS96)
        first = None
        for rnd in range(args.rounds):
            for name, module in versions.items():
                attn = stage2(module)
                with torch.no_grad():
                    o = attn(q, k, v, idx).float()
                    first = o if first is None else first
                    row = dict(T=T, Hkv=hkv, variant=name, round=rnd,
                               rel_diff_vs_first=round(((o - first).abs().max() / first.abs().max()).item(), 5),
                               fwd_ms=round(bench.median_ms(lambda: attn(q, k, v, idx), 5 if T < 200000 else 3), 3))
                if backward:
                    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))

                    def step():
                        out = attn(qq, kk, vv, idx)
                        out.backward(torch.ones_like(out))
                    row["fwdbwd_ms"] = round(bench.median_ms(step, 5), 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
        bench.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage2-ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
