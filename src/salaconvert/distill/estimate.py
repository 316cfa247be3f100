"""`--estimate`: the GPU memory a distillation stage needs, from the config alone (no weights).

Both models are built as meta-device skeletons, so any size costs nothing to estimate. The count
follows what the training code does (distill/pair.py, train.py):
  - frozen tensors the two models share: once, in bf16 (fp32 without bf16 autocast);
  - the teacher's tensors the student does not share (its attention in converted layers): bf16;
  - trainable tensors: an fp32 master copy, an fp32 gradient and AdamW's two fp32 moments;
  - activations of one micro-batch: stage 1 keeps every converted layer's input and output and the
    new modules' saved tensors; stages 2–3 keep one hidden state per layer (gradient checkpointing)
    plus one layer's recomputed activations and the logits of one KL chunk (salaconvert.kernels.kl).
The activation terms are analytic counts of the tensors autograd saves, so they are an estimate:
allocator rounding and temporary buffers are covered by a fixed margin, not modelled.

Shape legend in comments: N tokens of a micro-batch (B·T), D hidden, I MLP width, V vocabulary.
"""
import torch

from salaconvert.distill.pair import trainable_names
from salaconvert.distill.recipe import Recipe

GIB = 1024**3
OVERHEAD = int(1.0 * GIB)  # CUDA context, cuBLAS workspace, allocator slack


def _skeletons(config):
    from transformers import AutoModelForCausalLM

    from salaconvert.models import SalaHybridForCausalLM

    with torch.device("meta"):
        student = SalaHybridForCausalLM(config)
        teacher = AutoModelForCausalLM.from_config(config.teacher_config())
    return teacher, student


def _unique(named) -> dict[str, torch.Tensor]:
    seen, out = set(), {}
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            out[n] = p
    return out


def estimate_memory(config, recipe: Recipe, stages=(1, 2), bf16: bool = True, gradient_checkpointing: bool = True,
                    num_processes: int = 1, device_bytes: float = 80e9) -> dict:
    """Bytes per process for each stage in `stages`, by component, with `fits` against `device_bytes`.

    `config`: a SalaHybridConfig (e.g. read from a checkpoint's config.json, or built from any
    teacher config in code). Data parallel only: every process holds the full model.
    """
    teacher, student = _skeletons(config)
    t_params = dict(teacher.named_parameters())
    s_params = _unique(student.named_parameters())
    w = 2 if bf16 else 4  # frozen weights and activations
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    I = config.teacher.get("intermediate_size") or 4 * D
    H, Hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    types = config.layer_types
    n_conv = sum(t != "full_attention" for t in types)
    n_lin = types.count("linear_attention")
    result = {"params": {"teacher": sum(p.numel() for p in t_params.values()),
                         "student": sum(p.numel() for p in s_params.values())}, "stages": {}}
    for n in stages:
        cfg = recipe.stage(n)
        trainable = set(trainable_names(student, cfg.trainable))
        shared = {k for k, p in s_params.items()
                  if k not in trainable and k in t_params and t_params[k].shape == p.shape}
        n_shared = sum(s_params[k].numel() for k in shared)
        n_train = sum(p.numel() for k, p in s_params.items() if k in trainable)
        n_student_frozen_own = sum(p.numel() for k, p in s_params.items() if k not in trainable and k not in shared)
        n_teacher_own = sum(p.numel() for p in t_params.values()) - n_shared
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // num_processes)
        N = micro * cfg.seq_len
        one_layer = N * (6 * D + 4 * H * d + 4 * Hkv * d + 3 * I) * w + N * 2 * D * 4  # + fp32 norm temporaries
        lightning_extra = N * (4 * H * d * w + H * d * (d / 64) * 4)  # gate, o_norm, chunk states (fp32)
        if n == 1:
            captures = n_conv * 2 * N * D * w
            new_modules = n_conv * N * (10 * H * d * w + 2 * D * 4) + n_lin * lightning_extra  # + fp32 MSE inputs
            detail = {"captured teacher inputs/outputs": captures, "new modules' saved tensors": new_modules,
                      "teacher forward (one layer)": one_layer}
        else:
            per_layer = one_layer + (lightning_extra * n_lin / L)
            stored = L * N * D * w + per_layer if gradient_checkpointing else L * per_layer
            chunk = min(cfg.kl_chunk, cfg.seq_len)
            logits = 3 * micro * chunk * V * w  # student and teacher logits and their gradient (one chunk)
            head_grad = V * D * 4 if "lm_head.weight" in trainable else 0  # the fused KL's fp32 d W_s, kept to the backward
            hidden = 4 * N * D * w  # student and teacher final hidden states, the fused KL's d hs, grad
            teacher_fwd = one_layer
            detail = {"layer activations" + (" (checkpointed)" if gradient_checkpointing else ""): stored,
                      "logits (one chunk)": logits, "KL head gradient": head_grad, "final hidden states": hidden,
                      "teacher forward (one layer)": teacher_fwd}
        parts = {
            "shared frozen weights": n_shared * w,
            "teacher-only weights": n_teacher_own * w,
            "student frozen own weights": n_student_frozen_own * w,
            "trainable weights (fp32)": n_train * 4,
            "gradients (fp32)": n_train * 4,
            "AdamW moments (fp32)": n_train * 8,
            **detail,
            "overhead": OVERHEAD,
        }
        total = sum(parts.values())
        result["stages"][n] = {"parts": parts, "total": total, "fits": total <= device_bytes, "trainable": n_train,
                               "micro_batch": micro, "seq_len": cfg.seq_len, "device_bytes": device_bytes}
    return result
