"""Brief stage-1 alignment of single converted layers (SPEC §5.1), layer by layer.

Stage 1 trains each converted layer to reproduce the teacher attention's output from the same
input, with MSE; only the new layer's parameters train. Because the loss is local to one layer and
its input is the teacher's, each layer can be aligned on its own from inputs recorded once: this
is how `halo` aligns every linear candidate without building L hybrids, and how the selection
ablation gives every plan the same stage-1 budget.

The layer being aligned is a deep copy: the teacher's tensors it was built from stay untouched.

Shape legend: B batch, T tokens, D hidden size.
"""
import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from salaconvert.surgery.convert import teacher_arch


@dataclass
class Recorded:
    """Per layer, the teacher attention's inputs and outputs on the alignment text."""
    x_BTD: list[list[torch.Tensor]]  # [layer][batch]
    y_BTD: list[list[torch.Tensor]]
    position_embeddings: list  # [batch] (cos, sin), the same for every layer


def record_attention_io(teacher, ids_NT: torch.Tensor, batch_size: int = 1, store_device=None) -> Recorded:
    """Runs the teacher on `ids_NT` and keeps every attention module's input and output."""
    arch = teacher_arch(teacher)
    layers = getattr(teacher.model, arch.layers)
    device = next(teacher.parameters()).device
    store_device = store_device or device
    rec = Recorded([[] for _ in layers], [[] for _ in layers], [])

    def hooks_for(idx):
        def pre(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rec.x_BTD[idx].append(x.detach().to(store_device))
            if idx == 0:
                cos, sin = kwargs["position_embeddings"]
                rec.position_embeddings.append((cos.detach().to(store_device), sin.detach().to(store_device)))

        def post(module, args, output):
            rec.y_BTD[idx].append(output[0].detach().to(store_device))
        return pre, post

    handles = []
    try:
        for i, layer in enumerate(layers):
            pre, post = hooks_for(i)
            attn = getattr(layer, arch.attention)
            handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post)]
        with torch.no_grad():
            for batch in ids_NT.split(batch_size):
                teacher(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return rec


@dataclass
class AlignReport:
    rel_mse_before: float  # ‖out − teacher‖² / ‖teacher‖² on the held-out batch, before training
    rel_mse_after: float
    steps: int


def align_layer(module: nn.Module, rec: Recorded, idx: int, steps: int, lr: float = 1e-3,
                autocast_dtype: torch.dtype | None = None, rescale: bool = True) -> tuple[nn.Module, AlignReport]:
    """A trained copy of `module` (layer `idx`'s new attention) and how close it got.

    With `rescale`, the output projection is first multiplied by the least-squares scale
    a = ⟨out, y⟩ / ⟨out, out⟩ on the training batches. A fresh Lightning layer's output has unit RMS
    before Wo (o_norm of ones, gate 1/2), far above the teacher's, so on SmolLM2-135M it starts at a
    relative MSE of 5–12; the scale brings that below 1 in closed form, which a brief run of
    gradient steps cannot. Then AdamW at `lr` with a cosine schedule and a short warm-up, one
    recorded batch a step; the last recorded batch is held out for the report when there are several.
    """
    student = copy.deepcopy(module).train()
    for p in student.parameters():
        p.requires_grad_(True)
    xs, ys, pes = rec.x_BTD[idx], rec.y_BTD[idx], rec.position_embeddings
    train = list(range(len(xs) - 1)) if len(xs) > 1 else [0]
    held = len(xs) - 1
    before = _rel_mse(student, xs[held], ys[held], pes[held], autocast_dtype)
    if rescale:
        _fit_output_scale(student, [(xs[b], ys[b], pes[b]) for b in train], autocast_dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    for step in range(steps):
        b = train[step % len(train)]
        with _autocast(xs[b].device, autocast_dtype):
            out, _ = student(xs[b], position_embeddings=pes[b])
        loss = F.mse_loss(out.float(), ys[b].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
    student.eval().requires_grad_(False)
    after = _rel_mse(student, xs[held], ys[held], pes[held], autocast_dtype)
    return student, AlignReport(before, after, steps)


@torch.no_grad()
def _fit_output_scale(module, batches, autocast_dtype) -> None:
    num = den = 0.0
    for x, y, pe in batches:
        with _autocast(x.device, autocast_dtype):
            out, _ = module(x, position_embeddings=pe)
        out, y = out.float(), y.float()
        num += float((out * y).sum())
        den += float((out * out).sum())
    if den > 0 and math.isfinite(num / den):
        scale = num / den
        module.o_proj.weight.mul_(scale)
        if module.o_proj.bias is not None:
            module.o_proj.bias.mul_(scale)


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def _rel_mse(module, x, y, pe, autocast_dtype) -> float:
    with _autocast(x.device, autocast_dtype):
        out, _ = module(x, position_embeddings=pe)
    y = y.float()
    return float(((out.float() - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-30))
