"""`halo`: HALO's layer selection (arXiv 2601.22156), as SPEC §4 states it.

1. Align every linear candidate briefly (stage 1, layer-local: `align.py`).
2. For each layer i, swap only layer i to its aligned linear form; measure a recall probe R_i and
   a general probe C_i.
3. score_i = (max_j R_j − R_i) / (max_j C_j − C_i + ε): layers whose linearisation costs recall
   but little general ability rank highest and stay sparse.

Probes (from the calibration text, `probes.py`): R = mean log-probability of the tokens to
recall (span repeats and pass keys at five depths; log-probability rather than accuracy because a
small model's accuracy saturates or floors and then cannot rank layers; accuracy is reported
too; `halo_recall="acc"` uses accuracy, as HALO did); C = −next-token loss on held-out packed text (nats/token).
ε: 5% of the spread of C over layers, so one layer whose general drop happens to be ~0 does not
win on noise alone; `halo_eps` sets it absolutely.
"""
import torch

from salaconvert.errors import InputError
from salaconvert.layer_selection.align import align_layer, record_attention_io
from salaconvert.layer_selection.probes import recall_items
from salaconvert.layer_selection.scorers import ScoreContext, ScoreResult, register_scorer
from salaconvert.layer_selection.scorers.swap import evaluate_swaps, lightning_candidates


@register_scorer("halo", "HALO: stage-1-align each linear candidate, swap one layer at a time, "
                         "score recall drop / general drop", kind="halo")
def halo(ctx: ScoreContext) -> ScoreResult:
    o = ctx.options
    ids = ctx.calibration.ids_NT
    n_align = int(o.get("align_seqs", max(1, ids.shape[0] // 2)))
    if n_align >= ids.shape[0]:
        raise InputError(f"halo: {ids.shape[0]} calibration sequence(s); it needs more than the {n_align} it aligns on, "
                         "to keep a held-out general probe (raise --num-seqs)")
    steps, lr = int(o.get("halo_steps", 100)), float(o.get("halo_lr", 1e-3))
    autocast = torch.bfloat16 if ctx.device.type == "cuda" else None

    ctx.progress("building Lightning layers", 0, 1)
    candidates = lightning_candidates(ctx.teacher, o.get("lightning"))
    ctx.progress("recording teacher attention", 0, 1)
    rec = record_attention_io(ctx.teacher, ids[:n_align], batch_size=1)
    aligned, reports = {}, {}
    for done, i in enumerate(sorted(candidates)):
        ctx.progress(f"stage-1 alignment ({steps} steps a layer)", done, len(candidates))
        aligned[i], reports[i] = align_layer(candidates[i], rec, i, steps, lr, autocast)
    ctx.progress(f"stage-1 alignment ({steps} steps a layer)", len(candidates), len(candidates))
    del rec

    items = recall_items(ctx.tokenizer, ctx.calibration, ctx.seq_len, ctx.seed)
    teacher, per = evaluate_swaps(ctx, aligned, ids[n_align:], items, "one-layer swaps (recall, general)")
    L = ctx.num_layers
    recall = o.get("halo_recall", "logp")
    if recall not in ("logp", "acc"):
        raise InputError(f"halo_recall {recall!r}: expected 'logp' or 'acc'")
    R = [per[i].recall_logp if recall == "logp" else per[i].recall_acc for i in range(L)]
    C = [-per[i].nll for i in range(L)]
    eps = float(o["halo_eps"]) if "halo_eps" in o else 0.05 * (max(C) - min(C)) + 1e-8
    scores = [(max(R) - R[i]) / (max(C) - C[i] + eps) for i in range(L)]
    details = {
        "teacher": {"nll": teacher.nll, "recall_logp": teacher.recall_logp, "recall_acc": teacher.recall_acc},
        "recall_metric": recall, "recall_logp": [per[i].recall_logp for i in range(L)], "recall_acc": [per[i].recall_acc for i in range(L)], "nll": [-c for c in C],
        "eps": eps, "align_steps": steps, "align_lr": lr, "align_seqs": n_align,
        "align_rel_mse": [[reports[i].rel_mse_before, reports[i].rel_mse_after] for i in range(L)],
    }
    columns = {"recall Δlogp": [teacher.recall_logp - per[i].recall_logp for i in range(L)], "Δloss": [per[i].nll - teacher.nll for i in range(L)],
               "align rel-MSE": [reports[i].rel_mse_after for i in range(L)]}
    return ScoreResult(scores, details, columns)
