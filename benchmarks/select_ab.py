"""Stage 1 of InfLLM-V2, two versions of `select.py` in one process on the same inputs.

    git show bff5a1d:kernels/infllmv2/select.py > /tmp/select_old.py
    python benchmarks/select_ab.py --old /tmp/select_old.py --out $OUT [--rounds 3]

Imports an older `select.py` next to the installed one and alternates them, round after round,
on the benchmark's random inputs (benchmarks/infllmv2.py): the whole selection
(`parallel_infllmv2_select` with that module's `select_blocks`) and its top-k alone
(`radix_topk` on the score buffer the new scoring pass wrote for the first tiles of the call, as
the selection feeds it). Records whether each version's block lists equal the first version's,
and the share of (row, KV head) lists that differ. Writes DIR/select-ab.json after each case.
--smoke: tiny shapes on the CPU under TRITON_INTERPRET=1, a check of the script (its times mean
nothing).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import infllmv2 as bench  # noqa: E402
from salaconvert.kernels.infllmv2 import parallel  # noqa: E402
from salaconvert.kernels.infllmv2 import select as new  # noqa: E402

CASES = [(32768, 2), (131072, 2), (131072, 8), (262144, 8), (524288, 2)]  # (T, Hkv)


def first_scores(q, k) -> tuple[torch.Tensor, int]:
    """The score buffer of the selection's first top-k call ([rows, NB] fp32) and its K."""
    seen = []
    real = new.radix_topk
    new.radix_topk = lambda scores, out, K: seen.append((scores.clone(), K)) or real(scores, out, K)
    try:
        with torch.no_grad():
            parallel.parallel_infllmv2_select(q, k, **bench.OURS96)
    finally:
        new.radix_topk = real
    return seen[0]


def main():
    args = bench.ab_args(__doc__, "select.py")
    versions = {"old": bench.load_file(args.old, "select_old"), "new": new}
    rows = []
    for T, hkv in CASES:
        T, hkv = bench.LEN(T), min(hkv, bench.H)
        q, k, _ = bench.inputs(T, hkv)
        scores, K = first_scores(q, k)
        want = None
        for rnd in range(args.rounds):
            for name, module in versions.items():
                def select():
                    parallel.select_blocks = module.select_blocks  # what _select_flat calls
                    try:
                        with torch.no_grad():
                            return parallel.parallel_infllmv2_select(q, k, **bench.OURS96)
                    finally:
                        parallel.select_blocks = new.select_blocks
                out = torch.full((scores.shape[0], K), -1, dtype=torch.int32, device=scores.device)
                module.radix_topk(scores, out, K)
                idx = select()
                want = (idx, out) if want is None else want
                row = dict(T=T, Hkv=hkv, variant=name, round=rnd, topk_rows=scores.shape[0], NB=scores.shape[1],
                           lists_equal_first=bool(torch.equal(idx, want[0]) and torch.equal(out, want[1])),
                           lists_differing_from_first=(idx != want[0]).any(-1).float().mean().item(),
                           select_ms=round(bench.median_ms(select, 5 if T < 200000 else 3), 3),
                           topk_ms=round(bench.median_ms(lambda: module.radix_topk(scores, out, K), 5), 3))
                rows.append(row)
                print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "select-ab.json").write_text(json.dumps(rows, indent=1))  # kept if a longer case fails
        q = k = scores = want = idx = out = None  # this case's tensors go before the next one's
        bench.empty_cache()


if __name__ == "__main__":
    main()
