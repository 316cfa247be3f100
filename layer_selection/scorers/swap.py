"""One-layer swaps: run the teacher with only layer i's attention replaced, and measure what changes.

This is the machinery of both the `kl` proxy and `halo`. Two things keep it cheap:
- the Lightning modules come from `convert` itself (two conversions cover every layer), so a
  swapped layer is exactly what `salaconvert convert` would build, sharing the teacher's tensors;
- layers before i are replayed: their outputs are recorded once per batch from the teacher and
  returned by stand-ins, so each swapped run computes only layers i..L−1 (about half the work).

The teacher is changed only inside `swapped`/`replayed` blocks and restored on the way out.

`kl` scores layer i by KL(teacher ‖ teacher with layer i linearised, untrained) on the calibration
text: the damage the layer's conversion does before any distillation. It mixes "how hard is this
layer to linearise" with "how much does this layer matter", both reasons to keep it softmax.
Before measuring, each Lightning layer's output projection gets its closed-form least-squares
scale against the teacher attention's output (no gradient steps, `align.py`): a fresh layer's
output is 2–4× too large, and without this the KL would mostly measure that scale mismatch
(`kl_rescale=False` turns it off).

Shape legend: B batch, T tokens, V vocabulary.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from salaconvert.layer_selection.align import align_layer, record_attention_io
from salaconvert.layer_selection.plan import FULL, LINEAR, LayerPlan
from salaconvert.layer_selection.probes import RecallItem, recall_batch
from salaconvert.layer_selection.scorers import ScoreContext, ScoreResult, register_scorer
from salaconvert.surgery.convert import convert, teacher_arch


def decoder_layers(model) -> nn.ModuleList:
    return getattr(model.model, teacher_arch(model).layers)


def lightning_candidates(teacher, lightning: dict | None = None) -> dict[int, nn.Module]:
    """layer index → the `LightningAttention` that `convert` builds for it (untrained, shared tensors)."""
    arch = teacher_arch(teacher)
    L = teacher.config.num_hidden_layers
    plans = [[LINEAR] * (L - 1) + [FULL], [FULL] * (L - 1) + [LINEAR]]  # an all-linear plan is invalid
    modules = {}
    for types in plans:
        hybrid = convert(teacher, LayerPlan(types), lightning=lightning)
        for i, layer in enumerate(getattr(hybrid.model, arch.layers)):
            if types[i] == LINEAR and i not in modules:
                modules[i] = getattr(layer, arch.attention)
    return modules


@contextlib.contextmanager
def swapped(model, idx: int, attention: nn.Module):
    """Layer `idx` of `model` runs `attention` in place of its own."""
    name = teacher_arch(model).attention
    layer = decoder_layers(model)[idx]
    original = getattr(layer, name)
    setattr(layer, name, attention)
    try:
        yield
    finally:
        setattr(layer, name, original)


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns what that layer returned in the recorded teacher run."""

    def __init__(self, layer: nn.Module, output):
        super().__init__()
        self.output = output
        for attr in ("attention_type", "layer_idx"):  # some models read these off each layer
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, *args, **kwargs):
        return self.output


@contextlib.contextmanager
def recorded(model, store: list):
    """Records each decoder layer's output (as the model received it) into `store` during a forward."""
    layers = decoder_layers(model)
    store[:] = [None] * len(layers)

    def hook_for(idx):
        def hook(module, args, output):
            store[idx] = output
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replayed(model, upto: int, outputs: list):
    """Layers 0..upto−1 return their recorded outputs instead of computing them."""
    layers = decoder_layers(model)
    originals = [layers[j] for j in range(upto)]
    for j in range(upto):
        layers[j] = _Replay(originals[j], outputs[j])
    try:
        yield
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer


@dataclass
class SwapMetrics:
    nll: float = 0.0  # next-token loss on natural text (nats/token)
    kl: float = 0.0  # KL(teacher ‖ swapped) on natural text (nats/token)
    recall_logp: float = 0.0  # mean log-prob of the tokens to recall
    recall_acc: float = 0.0  # share of tokens to recall that are the argmax


def evaluate_swaps(ctx: ScoreContext, modules: dict[int, nn.Module], general_NT: torch.Tensor | None,
                   items: list[RecallItem] | None, what: str = "one-layer swaps") -> tuple[SwapMetrics, dict[int, SwapMetrics]]:
    """Metrics of the teacher, and of the teacher with each layer in `modules` swapped in alone."""
    model, device = ctx.teacher, ctx.device
    batch_size = int(ctx.options.get("batch_size", 2))
    general = [] if general_NT is None else list(general_NT.split(batch_size))
    recall = [] if not items else [items[s: s + batch_size] for s in range(0, len(items), batch_size)]
    order = sorted(modules)
    sums = {i: SwapMetrics() for i in [-1, *order]}  # -1: the teacher itself
    counts = {"general": 0, "recall": 0}
    total, done = (len(general) + len(recall)) * (len(order) + 1), 0
    outputs: list = []
    with torch.no_grad():
        for kind, batches in (("general", general), ("recall", recall)):
            for batch in batches:
                if kind == "general":
                    ids, keep = batch.to(device), 0
                else:
                    ids = recall_batch(batch).to(device)
                    keep = ids.shape[1] - min(q for it in batch for q in it.query_pos)
                with recorded(model, outputs):
                    ref = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()
                ref_logp = F.log_softmax(ref, -1)
                done += 1
                _accumulate(sums[-1], kind, ids, ref_logp, ref_logp, batch, keep)
                for i in order:
                    ctx.progress(what, done, total)
                    with swapped(model, i, modules[i]), replayed(model, i, outputs):
                        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()
                    _accumulate(sums[i], kind, ids, F.log_softmax(logits, -1), ref_logp, batch, keep)
                    done += 1
                counts[kind] += ids.shape[0] if kind == "general" else sum(len(it.query_pos) for it in batch)
            outputs.clear()
    ctx.progress(what, total, total)
    for m in sums.values():
        m.nll /= max(counts["general"], 1)
        m.kl /= max(counts["general"], 1)
        m.recall_logp /= max(counts["recall"], 1)
        m.recall_acc /= max(counts["recall"], 1)
    teacher = sums.pop(-1)
    return teacher, sums


def _accumulate(m: SwapMetrics, kind, ids, logp_BTV, ref_logp_BTV, batch, keep) -> None:
    """Adds per-sequence means (general) or per-token sums (recall) into `m`."""
    if kind == "general":
        nll = -logp_BTV[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        kl = (ref_logp_BTV.exp() * (ref_logp_BTV - logp_BTV)).sum(-1)  # [B, T]
        m.nll += float(nll.mean(-1).sum())
        m.kl += float(kl.mean(-1).sum())
        return
    T = ids.shape[1]
    for b, item in enumerate(batch):
        q = torch.tensor(item.query_pos, device=ids.device) - (T - keep)  # positions within the kept logits
        target = ids[b, torch.tensor(item.query_pos, device=ids.device) + 1]
        lp = logp_BTV[b, q]
        m.recall_logp += float(lp.gather(-1, target[:, None]).sum())
        m.recall_acc += float((lp.argmax(-1) == target).sum())


@register_scorer("kl", "KL(teacher ‖ teacher with only this layer linearised, untrained) on the calibration text")
def kl(ctx: ScoreContext) -> ScoreResult:
    ctx.progress("building Lightning layers", 0, 1)
    modules = lightning_candidates(ctx.teacher, ctx.options.get("lightning"))
    ids = ctx.calibration.ids_NT[: int(ctx.options.get("kl_seqs", ctx.calibration.ids_NT.shape[0]))]
    fit = {}
    if ctx.options.get("kl_rescale", True):
        ctx.progress("output scales (least squares)", 0, 1)
        rec = record_attention_io(ctx.teacher, ids, batch_size=int(ctx.options.get("batch_size", 2)))
        for i in list(modules):
            modules[i], fit[i] = align_layer(modules[i], rec, i, steps=0)
        del rec
    teacher, per_layer = evaluate_swaps(ctx, modules, ids, None, "KL per swapped layer")
    L = ctx.num_layers
    scores = [per_layer[i].kl for i in range(L)]
    if not all(math.isfinite(s) for s in scores):
        raise FloatingPointError("kl: non-finite KL; the model's activations overflow in this dtype (try --dtype float32)")
    columns = {"Δloss": [per_layer[i].nll - teacher.nll for i in range(L)]}
    if fit:
        columns["rel-MSE"] = [fit[i].rel_mse_after for i in range(L)]
    return ScoreResult(scores, {"teacher_nll": teacher.nll, "rescaled": bool(fit)}, columns)
