"""Where a kernel's warps wait, by SASS instruction, from an Nsight Compute source page.

    ncu --kernel-name regex:_fwd_kernel --launch-skip 1 --launch-count 1 --set full -o rep python3 ...
    ncu --import rep.ncu-rep --page source --csv --print-source sass > source.csv
    python benchmarks/ncu_stalls.py source.csv [--top 25]

Prints each stall reason's share of all warp-state samples, then the instructions with the most
samples and the reasons that make up at least 15% of each (benchmarks/notes-infllmv2.md, runs 26–28).
"""
import argparse
import collections
import csv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    rows = list(csv.reader(open(args.csv)))
    header = rows[1]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    per_instruction = []
    for r in rows[2:]:
        if len(r) < len(header):
            continue
        samples = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        counts = {h[6:]: int(r[col[h]] or 0) for h in reasons}
        total.update(counts)
        main_reasons = {k: v for k, v in counts.items() if v >= 0.15 * max(1, samples)}
        per_instruction.append((samples, r[col["Address"]][-5:], r[col["Source"]].strip(), main_reasons))
    n = sum(total.values())
    print(f"{n} samples")
    for reason, v in total.most_common(10):
        print(f"  {reason:20s} {100 * v / n:5.1f}%")
    for samples, addr, source, main_reasons in sorted(per_instruction, reverse=True)[:args.top]:
        print(f"{100 * samples / n:5.1f}%  {addr}  {source[:70]:70s}  {main_reasons}")


if __name__ == "__main__":
    main()
