"""Architecture registry: where a teacher keeps its decoder layers and attention projections.

The four architectures below are registered by name and tested; any other decoder whose
attention has separate q/k/v/o projections and takes the rotary cos/sin from its model is found
by `resolve_arch`'s generic detection. They differ only in data, so they share this one file.
"""
import inspect
from dataclasses import dataclass

from torch import nn

from salaconvert.errors import InputError


class ConversionError(InputError):
    """The teacher or the plan cannot be converted; the message names the problem in one line."""


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers: str = "layers"  # attribute of the base model holding the decoder layers
    attention: str = "self_attn"  # attribute of a decoder layer holding its attention
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None  # per-head QK-norm, kept by both new layer types
    k_norm: str | None = None
    generic: bool = False  # found by detection rather than registered


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    _REGISTRY[spec.model_type] = spec
    return spec


def get_arch(model_type: str) -> ArchSpec | None:
    return _REGISTRY.get(model_type)


register_arch(ArchSpec("llama"))
register_arch(ArchSpec("mistral"))
register_arch(ArchSpec("qwen2"))
register_arch(ArchSpec("qwen3", q_norm="q_norm", k_norm="k_norm"))


def resolve_arch(base_model: nn.Module) -> ArchSpec:
    """The spec for a teacher's base model (e.g. a `LlamaModel`), checked against its modules.

    Raises ConversionError naming what is missing when the model is not a decoder we can convert.
    """
    config = base_model.config
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise ConversionError(f"{model_type}: encoder-decoder models are not supported, only decoder-only LMs")
    spec = get_arch(model_type) or _detect(base_model)
    layers = getattr(base_model, spec.layers, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != config.num_hidden_layers:
        raise ConversionError(f"{model_type}: no list of {config.num_hidden_layers} decoder layers at .{spec.layers}")
    for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.o_proj):
        if not isinstance(getattr(getattr(layers[0], spec.attention, None), name, None), nn.Linear):
            raise ConversionError(f"{model_type}: attention has no linear projection {spec.attention}.{name}")
    return spec


def _detect(base_model: nn.Module) -> ArchSpec:
    """Find decoder layers, an attention with q/k/v/o projections, and a model-level rotary embedding."""
    model_type = base_model.config.model_type
    if not hasattr(base_model, "rotary_emb"):
        raise ConversionError(f"{model_type}: not a decoder-only LM with rotary attention (no rotary embedding found)")
    layers_name = next((n for n, m in base_model.named_children()
                        if isinstance(m, nn.ModuleList) and len(m) == base_model.config.num_hidden_layers), None)
    if layers_name is None:
        raise ConversionError(f"{model_type}: no list of decoder layers found")
    layer = getattr(base_model, layers_name)[0]
    attn_name = next((n for n, m in layer.named_children()
                      if all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))),
                     None)
    if attn_name is None:
        raise ConversionError(f"{model_type}: attention without separate q_proj/k_proj/v_proj/o_proj is not supported")
    attn = getattr(layer, attn_name)
    if "position_embeddings" not in inspect.signature(attn.forward).parameters:
        raise ConversionError(f"{model_type}: attention does not take the model's rotary cos/sin (position_embeddings)")
    has_qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    return ArchSpec(model_type, layers=layers_name, attention=attn_name, generic=True,
                    q_norm="q_norm" if has_qk_norm else None, k_norm="k_norm" if has_qk_norm else None)
