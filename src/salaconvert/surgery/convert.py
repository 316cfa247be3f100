"""Build a hybrid from a loaded teacher: validate everything first, then build, reusing tensors.

The hybrid skeleton is made on the `meta` device (no memory, no init) and then filled with
`load_state_dict(assign=True)`: every tensor the teacher already has is taken as is (the same
storage, no copy); only the new ones are made here (repeated K/V rows for GQA→MHA, norms of ones,
zero gates, the decay).
"""
import torch
from torch import nn

from salaconvert.layer_selection.plan import FULL, LINEAR, SPARSE, LayerPlan
from salaconvert.models import SalaHybridConfig, SalaHybridForCausalLM
from salaconvert.surgery.registry import ArchSpec, ConversionError, resolve_arch


def teacher_arch(teacher: nn.Module) -> ArchSpec:
    """The spec of a teacher `*ForCausalLM` (or its meta-device skeleton); raises ConversionError."""
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "config"):
        raise ConversionError(f"{teacher.config.model_type}: no decoder at .model; not a supported causal LM")
    return resolve_arch(base)


def hybrid_config(teacher: nn.Module, plan: LayerPlan, arch: ArchSpec, lightning: dict | None = None,
                  sparse: dict | None = None) -> SalaHybridConfig:
    teacher_config = teacher.config
    plan.validate(teacher_config.num_hidden_layers)
    fields = teacher_config.to_dict()
    fields.pop("dtype", None)
    attn = getattr(getattr(teacher.model, arch.layers)[0], arch.attention)
    bias = [getattr(attn, name).bias is not None for name in (arch.q_proj, arch.k_proj, arch.v_proj, arch.o_proj)]
    sparse = {"qk_norm": arch.q_norm is not None, **(sparse or {})}
    config = SalaHybridConfig(teacher=fields, layer_types=list(plan.layer_types), lightning=lightning, sparse=sparse,
                              qkvo_bias=bias)
    config.dtype = teacher_config.dtype
    return config


def convert(teacher: nn.Module, plan: LayerPlan, lightning: dict | None = None,
            sparse: dict | None = None) -> SalaHybridForCausalLM:
    """The hybrid of `teacher` under `plan`. The teacher itself is left unchanged; the two share tensors."""
    arch = teacher_arch(teacher)
    config = hybrid_config(teacher, plan, arch, lightning, sparse)
    config._attn_implementation = teacher.config._attn_implementation
    with torch.device("meta"):
        hybrid = SalaHybridForCausalLM(config)
    teacher_state = teacher.state_dict()
    layers_prefix = f"model.{arch.layers}"
    state, used = {}, set()
    for name, meta in hybrid.state_dict().items():
        state[name] = _tensor_for(name, meta, teacher_state, config, arch, layers_prefix, used)
    dropped = sorted(n for n in teacher_state if n not in used and _attention_param(n, layers_prefix, arch)[0] is not None)
    if dropped:
        raise ConversionError(f"the hybrid has no place for teacher tensor(s) {dropped[:3]}")
    hybrid.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the rotary inv_freq) are not in any state dict: take the teacher's.
    teacher_buffers = dict(teacher.named_buffers())
    for name, buf in list(hybrid.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(hybrid.get_submodule(owner), attr, teacher_buffers[name])
    if config.tie_word_embeddings:
        hybrid.tie_weights()
    hybrid.generation_config = teacher.generation_config
    return hybrid.eval() if not teacher.training else hybrid


def _tensor_for(name, meta, teacher_state, config, arch, layers_prefix, used: set) -> torch.Tensor:
    """The tensor for hybrid parameter `name`: the teacher's own where it has one, else a new one."""
    like = next(iter(teacher_state.values()))
    idx, attr = _attention_param(name, layers_prefix, arch)
    if idx is None or config.layer_types[idx] == FULL:
        used.add(name)
        if name not in teacher_state:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                return torch.empty(meta.shape, dtype=like.dtype, device=like.device)  # tied just after
            raise ConversionError(f"teacher has no tensor {name}")
        return teacher_state[name]
    layer_type = config.layer_types[idx]
    teacher_name = _teacher_param_name(name, idx, attr, arch, layers_prefix)
    src = teacher_state.get(teacher_name) if teacher_name else None
    kind, _, param = attr.partition(".")
    if kind == "log_decay":
        return torch.tensor(config.layer_log_decay(idx), dtype=torch.float32, device=like.device)
    if kind in ("z_proj", "og_proj"):
        return torch.zeros(meta.shape, dtype=like.dtype, device=like.device)
    if kind in ("q_norm", "k_norm", "o_norm") and src is None:
        return torch.ones(meta.shape, dtype=like.dtype, device=like.device)
    if src is not None:
        used.add(teacher_name)
    if src is None:
        raise ConversionError(f"teacher has no tensor for {name}")
    if layer_type == LINEAR and kind in ("k_proj", "v_proj") and src.shape != meta.shape:
        return _repeat_kv_rows(src, config)
    return src


def _attention_param(name: str, layers_prefix: str, arch: ArchSpec) -> tuple[int | None, str]:
    """(layer index, 'q_proj.weight') for a parameter of a layer's attention, else (None, '')."""
    if not name.startswith(layers_prefix + "."):
        return None, ""
    idx, _, rest = name[len(layers_prefix) + 1:].partition(".")
    if not rest.startswith(arch.attention + "."):
        return None, ""
    return int(idx), rest[len(arch.attention) + 1:]


def _teacher_param_name(name, idx, attr, arch: ArchSpec, layers_prefix) -> str | None:
    kind, _, param = attr.partition(".")
    teacher_kind = {"q_proj": arch.q_proj, "k_proj": arch.k_proj, "v_proj": arch.v_proj, "o_proj": arch.o_proj,
                    "q_norm": arch.q_norm, "k_norm": arch.k_norm}.get(kind)
    if teacher_kind is None:
        return None
    return f"{layers_prefix}.{idx}.{arch.attention}.{teacher_kind}.{param}"


def _repeat_kv_rows(w: torch.Tensor, config) -> torch.Tensor:
    """GQA→MHA: each KV head's rows repeated for every query head of its group (weight or bias)."""
    Hkv, d = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // Hkv
    return w.view(Hkv, d, *w.shape[1:]).repeat_interleave(group, dim=0).reshape(Hkv * group * d, *w.shape[1:])


def describe(config: SalaHybridConfig) -> dict:
    """Counts of each layer type, for reports."""
    return {t: config.layer_types.count(t) for t in (LINEAR, SPARSE, FULL)}
