"""Selection ablation (issue 5): which layers to keep softmax, judged after the same stage-1 budget.

For one teacher (default: the real SmolLM2-135M) this script
1. scores the layers with every method (halo, each proxy, uniform, random with 3 seeds) on the
   calibration split and turns each into a plan at --ratio (SALA's first/last rule on);
2. gives every plan the same short stage 1: each layer is aligned once as Lightning and once as
   InfLLM-V2 sparse (layer-local MSE to the teacher attention's output, `--align-steps` AdamW steps,
   lr 1e-3 cosine). Stage 1 is local to a layer with teacher inputs, so aligning every layer both
   ways once is exactly what running stage 1 on each plan would do, and no plan gets more training;
3. assembles each plan's hybrid from those aligned layers and measures, on the held-out split,
   recall (pass key and span repeat at 5 depths, greedy token accuracy and exact match) and
   perplexity.

Held-out split: documents are sorted by their position in the file; every 10th (index % 10 == 0)
is held out for evaluation, the rest calibrate and align. Results: JSON under benchmarks/results/
with card, versions and date, and a markdown table.

    python benchmarks/selection_ablation.py --model smollm2-135m --data austen.jsonl.xz --device cuda
"""
import argparse
import contextlib
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="/work/shared/data/corpus/austen.jsonl.xz")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ratio", default="1:3")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences for the scorers")
    ap.add_argument("--align-seqs", type=int, default=32, help="sequences recorded for the shared stage 1")
    ap.add_argument("--align-steps", type=int, default=200)
    ap.add_argument("--halo-steps", type=int, default=200)
    ap.add_argument("--eval-seqs", type=int, default=32, help="held-out sequences for perplexity")
    ap.add_argument("--probe-draws", type=int, default=3, help="recall probe draws of 10 items each")
    ap.add_argument("--methods", default="halo,kl,entropy,long_range,retrieval,uniform,random")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the random baseline")
    ap.add_argument("--out", default="benchmarks/results/selection_ablation.json")
    args = ap.parse_args()

    from salaconvert.io.load import load_model, load_tokenizer, resolve_source
    from salaconvert.layer_selection.align import align_layer, record_attention_io
    from salaconvert.layer_selection.plan import LINEAR, SPARSE, LayerPlan, select_layer_types
    from salaconvert.layer_selection.probes import build_calibration, read_documents, recall_items
    from salaconvert.layer_selection.scorers import ScoreContext, get_scorer
    from salaconvert.layer_selection.scorers.swap import lightning_candidates, swapped
    from salaconvert.surgery.convert import convert, teacher_arch

    t0 = time.perf_counter()
    source = resolve_source(args.model)
    teacher = load_model(source, "float32", device=args.device)
    tokenizer = load_tokenizer(source)
    L = teacher.config.num_hidden_layers
    docs, data_name = read_documents([args.data])
    held = [d for i, d in enumerate(docs) if i % 10 == 0]
    train = [d for i, d in enumerate(docs) if i % 10 != 0]
    T = args.seq_len
    calib = build_calibration(tokenizer, train, data_name, T, args.calib_seqs, 0, spare_tokens=2 * T)
    align_cal = build_calibration(tokenizer, train, data_name, T, args.align_seqs, 1234)
    heldout = build_calibration(tokenizer, held, data_name + " (held out)", T, args.eval_seqs, 0)
    # The recall probe has its own held-out packing, so it does not change with --eval-seqs; each
    # draw is 10 items (pass key and span repeat at 5 depths), --probe-draws of them.
    probe_text = build_calibration(tokenizer, held, data_name + " (held out)", T, 2, 99, spare_tokens=8 * T)
    probe = [item for d in range(args.probe_draws) for item in recall_items(tokenizer, probe_text, T, seed=7 + d)]
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    log(f"{args.model}: {L} layers on {args.device}; {len(train)}/{len(held)} train/held-out documents")

    # 1. plans
    plans, timings = {}, {}
    for spec in args.methods.split(","):
        # "halo:halo_recall=acc" is a variant: scorer options after the colon, k=v joined by "+".
        method, _, extra = spec.partition(":")
        opts = dict(kv.split("=", 1) for kv in extra.split("+") if kv)
        seeds = [int(s) for s in args.seeds.split(",")] if method == "random" else [0]
        for seed in seeds:
            name = f"random(seed={seed})" if method == "random" else spec
            ctx = ScoreContext(teacher, tokenizer, calib, L, T, seed, args.ratio, True,
                               {"halo_steps": args.halo_steps, "batch_size": 4, **opts})
            t = time.perf_counter()
            result = get_scorer(method).fn(ctx)
            timings[name] = time.perf_counter() - t
            plans[name] = LayerPlan(select_layer_types(result.scores, args.ratio), scores=[float(s) for s in result.scores],
                                    method=method, seed=seed, ratio=args.ratio)
            kept = [i for i, ty in enumerate(plans[name].layer_types) if ty == SPARSE]
            log(f"plan {name}: sparse {kept} ({timings[name]:.1f}s)")

    # 2. the shared stage 1: every layer aligned once as linear and once as sparse
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    rec = record_attention_io(teacher, align_cal.ids_NT, batch_size=4)
    linear_init = lightning_candidates(teacher)
    sparse_hybrid = convert(teacher, LayerPlan([SPARSE] * L))
    arch = teacher_arch(teacher)
    sparse_init = {i: getattr(layer, arch.attention) for i, layer in enumerate(getattr(sparse_hybrid.model, arch.layers))}
    aligned, align_report = {LINEAR: {}, SPARSE: {}}, {LINEAR: [], SPARSE: []}
    for kind, init in ((LINEAR, linear_init), (SPARSE, sparse_init)):
        for i in range(L):
            aligned[kind][i], rep = align_layer(init[i], rec, i, args.align_steps, 1e-3, autocast)
            align_report[kind].append([rep.rel_mse_before, rep.rel_mse_after])
        log(f"stage 1 ({kind}): rel-MSE after {args.align_steps} steps, median "
            f"{sorted(r[1] for r in align_report[kind])[L // 2]:.3f}")
    del rec

    # 3. evaluate every plan (and the teacher) on the held-out split; the results are rewritten
    # after each row, so a run cut short still leaves what it measured.
    report = {
        "what": "layer-selection ablation: same stage-1 budget for every plan, recall and perplexity held out",
        "model": args.model, "data": args.data, "heldout_split": "documents with index % 10 == 0", "ratio": args.ratio,
        "seq_len": T, "align_steps": args.align_steps, "halo_steps": args.halo_steps, "align_seqs": args.align_seqs,
        "calib_seqs": args.calib_seqs, "eval_seqs": args.eval_seqs, "recall_items": len(probe),
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "align_rel_mse": align_report, "plans": {k: p.to_dict() for k, p in plans.items()}, "rows": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    rows["teacher"] = evaluate(teacher, heldout.ids_NT, probe, args.device)
    for name, plan in plans.items():
        with contextlib.ExitStack() as stack:
            for i, ty in enumerate(plan.layer_types):
                stack.enter_context(swapped(teacher, i, aligned[ty][i]))
            rows[name] = evaluate(teacher, heldout.ids_NT, probe, args.device)
        rows[name]["sparse_layers"] = [i for i, ty in enumerate(plan.layer_types) if ty == SPARSE]
        rows[name]["score_seconds"] = timings[name]
        log(f"{name}: {rows[name]}")
        report["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(rows)
    out.with_suffix(".md").write_text(f"# Selection ablation ({args.model}, {report['card']}, {report['date']})\n\n{table}\n")
    print(table)


def evaluate(model, ids_NT, probe, device, batch: int = 4) -> dict:
    """Held-out perplexity, and recall: greedy accuracy on the recalled tokens and whole-answer exact match.

    bf16 autocast on the GPU for every row alike, the teacher's included (the kernels' training dtype)."""
    cuda = str(device).startswith("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return _evaluate(model, ids_NT, probe, device, batch)


def _evaluate(model, ids_NT, probe, device, batch: int) -> dict:
    nll, n = 0.0, 0
    for b in ids_NT.split(batch):
        ids = b.to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    hits, total, exact = 0, 0, {"span": [], "passkey": []}
    for item in probe:
        ids = item.ids_T[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0]
        pred = logits[torch.tensor(item.query_pos, device=device)].argmax(-1)
        target = ids[0, torch.tensor(item.query_pos, device=device) + 1]
        ok = (pred == target)
        hits += int(ok.sum())
        total += ok.numel()
        exact[item.kind].append(bool(ok.all()))
    return {"ppl": math.exp(nll / n), "recall_token_acc": hits / total,
            **{f"{k}_exact": sum(v) / max(len(v), 1) for k, v in exact.items()}}


def markdown(rows: dict) -> str:
    base = rows.get("uniform", {}).get("ppl")
    lines = ["| plan | recall token acc | span exact | passkey exact | held-out ppl | ppl vs uniform | sparse layers |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base and name != "teacher" else "–"
        lines.append(f"| {name} | {r['recall_token_acc']:.3f} | {r['span_exact']:.2f} | {r['passkey_exact']:.2f} | "
                     f"{r['ppl']:.2f} | {rel} | {r.get('sparse_layers', 'all (teacher)')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
