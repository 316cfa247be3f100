"""The three stage losses, with bounded memory.

Stage 1 — attention-output alignment: forward hooks on the teacher's attention modules of the
converted layers record each one's input and output; the student's new module runs on exactly
that input and its output is compared by MSE. Only the new modules run with gradients.

Stage 2 — forward KL(teacher ‖ student) over the vocabulary at every position. The logits of a
long sequence are the largest tensors of the step (T·V floats), so they are made one chunk of
positions at a time, and the fused op (salaconvert.kernels.kl) turns each chunk's logits into the
gradients of the hidden states and the head during the forward: no logits stay alive or are
rebuilt. Every position counts, whatever the chunk size (HALO's published code scored only the
first 512 positions; tests/distill guard against that).

Shape legend: B batch, T tokens, D hidden size, V vocabulary.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from salaconvert.kernels.kl import linear_kl


def chunked_kl(hs_BTD: torch.Tensor, ht_BTD: torch.Tensor, w_student: torch.Tensor, w_teacher: torch.Tensor,
               chunk: int = 512, temperature: float = 1.0) -> torch.Tensor:
    """Mean over all B·T positions of KL(softmax(ht Wtᵀ/τ) ‖ softmax(hs Wsᵀ/τ)), times τ².

    hs_BTD: the student's final hidden states (after the final norm), with grad.
    ht_BTD: the teacher's, without grad. w_*: [V, D] output projections (the same tensor when tied
    and frozen). Logits exist one chunk of `chunk` positions at a time, and only in the forward:
    `salaconvert.kernels.kl.linear_kl` turns them into the gradients of hs and Ws on the spot.
    """
    B, T, _ = hs_BTD.shape
    return linear_kl(hs_BTD, ht_BTD, w_student, w_teacher, chunk, temperature) * temperature**2 / (B * T)


def _ce_sum(h_BTD, w, labels_BT) -> torch.Tensor:
    logits = F.linear(h_BTD, w).float()
    return F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten(), reduction="sum", ignore_index=-100)


def chunked_ce(h_BTD: torch.Tensor, w: torch.Tensor, input_ids_BT: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, number of predicted tokens): position t predicts t+1."""
    labels = input_ids_BT[:, 1:]
    h = h_BTD[:, :-1]
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[1], chunk):
        args = (h[:, s:s + chunk], w, labels[:, s:s + chunk])
        total = total + (checkpoint(_ce_sum, *args, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum(*args))
    return total, labels.numel()


class AttentionAlignment(nn.Module):
    """Stage 1's trainable part: the student's converted attention modules, scored against the teacher's.

    `capture()` (a context manager, yielding the records) records, for every converted layer, the
    teacher attention's input hidden states, its keyword inputs (rotary cos/sin, mask) and its
    output. `forward(records)` then runs each student module on the recorded input and returns the
    mean over layers of the MSE to the teacher's output. Being an nn.Module whose forward does the
    work, it can be wrapped by accelerate/DDP like any model; the records go in as its argument
    because DDP on GPUs moves a forward's inputs and fails on a forward that takes none.
    """

    def __init__(self, student_attn: dict[int, nn.Module], teacher_attn: dict[int, nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): m for i, m in student_attn.items()})
        self._teacher = teacher_attn  # a plain dict: the teacher's modules are not ours to train or save
        self._records = {}

    def _hooks(self):
        handles = []
        for i, module in self._teacher.items():
            def pre(mod, args, kwargs, i=i):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                keep = {k: kwargs[k] for k in ("position_embeddings", "attention_mask") if k in kwargs}
                if len(args) > 1 and "position_embeddings" not in keep:
                    keep["position_embeddings"] = args[1]
                self._records[i] = [x.detach(), keep, None]

            def post(mod, args, kwargs, output, i=i):
                out = output[0] if isinstance(output, tuple) else output
                self._records[i][2] = out.detach()

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        return handles

    @contextlib.contextmanager
    def capture(self):
        records = self._records = {}
        handles = self._hooks()
        try:
            yield records
        finally:
            for h in handles:
                h.remove()
            self._records = {}  # the caller holds this step's records; the module keeps none

    def forward(self, records: dict) -> torch.Tensor:
        losses = []
        for key, module in self.layers.items():
            x, kwargs, target = records[int(key)]
            y = module(hidden_states=x, past_key_values=None, **kwargs)[0]
            losses.append(F.mse_loss(y.float(), target.float()))
        return torch.stack(losses).mean()
