"""Training-free proxies read off the teacher's own attention maps (one eager forward pass each).

- `entropy`: how peaked each layer's attention is. Linear attention cannot make a spiky
  distribution (it has no softmax to sharpen it), so sharp layers should stay softmax.
  score = 1 − mean normalised entropy, with the attention sink (key 0) left out and each row's
  entropy divided by log(number of keys), so short and long rows weigh alike.
- `long_range`: the share of attention (sink left out) on keys more than `window` tokens back.
  A decayed linear state remembers recent tokens well and far ones poorly (SALA's fastest head
  forgets within a few tokens, its slowest within a few hundred), so layers that look far need softmax.
- `retrieval`: retrieval-head score (Wu et al., 2024) on the recall probe of `probes.py`: for each
  head, the share of recall positions where its strongest attention falls on exactly the token to
  be copied next. A layer's score is its best head's: one retrieval head is reason enough to keep it.

Shape legend: B batch, H heads, T queries, S keys.
"""
import contextlib
import math

import torch

from salaconvert.layer_selection.probes import recall_batch, recall_items
from salaconvert.layer_selection.scorers import ScoreContext, ScoreResult, register_scorer
from salaconvert.surgery.convert import teacher_arch

SINK = 1  # keys before this index are the attention sink, left out of entropy and long-range mass
MIN_QUERY = 16  # rows with fewer keys say little about a layer's habits


@contextlib.contextmanager
def eager_attention(model):
    """Attention maps need the eager path (SDPA and flash never materialise them); restored after."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@contextlib.contextmanager
def attention_maps(model, on_maps):
    """Calls `on_maps(layer_idx, weights_BHTS)` for each layer during forwards; the maps are then dropped."""
    arch = teacher_arch(model)
    layers = getattr(model.model, arch.layers)
    handles = []

    def hook_for(idx):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                on_maps(idx, output[1].detach().float())
                return (output[0], None, *output[2:])
            return output
        return hook

    with eager_attention(model):
        try:
            for idx, layer in enumerate(layers):
                handles.append(getattr(layer, arch.attention).register_forward_hook(hook_for(idx)))
            yield
        finally:
            for h in handles:
                h.remove()


def _batches(ids_NT: torch.Tensor, batch_size: int):
    for start in range(0, ids_NT.shape[0], batch_size):
        yield ids_NT[start: start + batch_size]


def attention_stats(ctx: ScoreContext) -> dict:
    """Per layer and head: mean normalised entropy and long-range mass on the calibration text."""
    if "attention_stats" in ctx.cache:
        return ctx.cache["attention_stats"]
    T = ctx.seq_len
    window = int(ctx.options.get("window", min(64, T // 4)))
    ent_sum = [None] * ctx.num_layers
    far_sum = [None] * ctx.num_layers
    rows = 0
    q_idx = torch.arange(T)
    k_idx = torch.arange(T)
    n_keys = (q_idx - SINK + 1).clamp_min(1).float()  # keys SINK..t for query t
    far_mask = (q_idx[:, None] - k_idx[None, :] > window) & (k_idx[None, :] >= SINK)

    def on_maps(idx, w_BHTS):
        w = w_BHTS[..., SINK:]
        body = w.sum(-1).clamp_min(1e-12)  # mass outside the sink
        p = w / body[..., None]
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / n_keys.to(w.device).log().clamp_min(1e-6)
        far = (w_BHTS * far_mask.to(w.device)).sum(-1) / body
        ent = ent[..., MIN_QUERY:].mean(-1).sum(0)  # [H], summed over the batch
        far = far[..., window + 1:].mean(-1).sum(0)
        ent_sum[idx] = ent if ent_sum[idx] is None else ent_sum[idx] + ent
        far_sum[idx] = far if far_sum[idx] is None else far_sum[idx] + far

    ids = ctx.calibration.ids_NT
    batch_size = int(ctx.options.get("batch_size", 2))
    total = math.ceil(ids.shape[0] / batch_size)
    with torch.no_grad(), attention_maps(ctx.teacher, on_maps):
        for done, batch in enumerate(_batches(ids, batch_size)):
            ctx.progress("attention maps", done, total)
            ctx.teacher(input_ids=batch.to(ctx.device), use_cache=False)
            rows += batch.shape[0]
    ctx.progress("attention maps", total, total)
    stats = {"entropy": [(e / rows).cpu() for e in ent_sum], "long_range": [(f / rows).cpu() for f in far_sum],
             "window": window}
    ctx.cache["attention_stats"] = stats
    return stats


@register_scorer("entropy", "attention sharpness: 1 − normalised entropy of the teacher's attention (sink excluded)")
def entropy(ctx: ScoreContext) -> ScoreResult:
    stats = attention_stats(ctx)
    ent = [float(e.mean()) for e in stats["entropy"]]
    far = [float(f.mean()) for f in stats["long_range"]]
    return ScoreResult([1.0 - e for e in ent], {"entropy_per_head": [e.tolist() for e in stats["entropy"]]},
                       {"entropy": ent, f"far>{stats['window']}": far})


@register_scorer("long_range", "share of attention on keys more than --window tokens back (sink excluded)")
def long_range(ctx: ScoreContext) -> ScoreResult:
    stats = attention_stats(ctx)
    far = [float(f.mean()) for f in stats["long_range"]]
    ent = [float(e.mean()) for e in stats["entropy"]]
    return ScoreResult(far, {"window": stats["window"], "long_range_per_head": [f.tolist() for f in stats["long_range"]]},
                       {"max head": [float(f.max()) for f in stats["long_range"]], "entropy": ent})


@register_scorer("retrieval", "retrieval-head score: how often a layer's best head attends to the token it must copy")
def retrieval(ctx: ScoreContext) -> ScoreResult:
    items = recall_items(ctx.tokenizer, ctx.calibration, ctx.seq_len, ctx.seed)
    hits = [None] * ctx.num_layers
    current: list = []  # the items of the batch now running

    def on_maps(idx, w_BHTS):
        top_BHT = w_BHTS.argmax(-1)
        for b, item in enumerate(current):
            q = torch.tensor(item.query_pos, device=top_BHT.device)
            src = torch.tensor(item.source_pos, device=top_BHT.device)
            h = (top_BHT[b][:, q] == src).float().sum(-1)  # [H]
            hits[idx] = h if hits[idx] is None else hits[idx] + h

    batch_size = int(ctx.options.get("batch_size", 2))
    total = math.ceil(len(items) / batch_size)
    with torch.no_grad(), attention_maps(ctx.teacher, on_maps):
        for done, start in enumerate(range(0, len(items), batch_size)):
            ctx.progress("retrieval probe", done, total)
            current[:] = items[start: start + batch_size]
            ctx.teacher(input_ids=recall_batch(current).to(ctx.device), use_cache=False)
    ctx.progress("retrieval probe", total, total)
    n = sum(len(it.query_pos) for it in items)
    per_head = [(h / n).cpu() for h in hits]
    return ScoreResult([float(h.max()) for h in per_head], {"retrieval_per_head": [h.tolist() for h in per_head],
                                                            "recall_positions": n},
                       {"mean head": [float(h.mean()) for h in per_head]})
