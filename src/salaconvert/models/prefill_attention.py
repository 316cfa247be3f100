"""Softmax attention for a chunked prefill of one unpadded sequence: causal, aligned to the last key.

A chunk of T queries after S − T cached tokens sees every cached key and, among its own, those up
to itself: the causal mask aligned to the bottom-right corner of the [T, S] score matrix. Through
transformers' "sdpa" path that mask is materialised ([T, S] per call: 4 GiB of booleans for a 16K
chunk at 256K) and SDPA leaves its flash kernel for the memory-efficient one with an explicit
mask. `causal_lower_right` says the same without a tensor, and SDPA runs flash attention on it.
Only valid without padding (a single sequence, as `eval.forward.prefill` feeds), and only for
full-attention layers without a sliding window, so `chunk_causal_attention` switches a model to
it only when that holds.
"""
import contextlib

from transformers import AttentionInterface

from salaconvert.layers.common import causal_attention

_ATTENTION = "salaconvert_prefill"


def lower_right_causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, Hq, T, d], key/value [B, Hkv, S, d] (S ≥ T) -> ([B, T, Hq, d], None); the mask is ignored
    (transformers makes none for this implementation: it is not in its mask registry)."""
    return causal_attention(query, key, value, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(_ATTENTION, lower_right_causal_sdpa)


@contextlib.contextmanager
def chunk_causal_attention(model):
    """For the duration, a model's SDPA full-attention layers use `lower_right_causal_sdpa`.

    Left alone: other attention implementations (flash_attention_2 already aligns bottom-right),
    configs with a sliding window or non-full layer types in the teacher's own layout, and models
    without a decoder at `.model`.
    """
    config = getattr(getattr(model, "model", None), "config", None)  # what the (teacher's) attention modules read
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    plain = (getattr(config, "_attn_implementation", None) == "sdpa" and getattr(config, "sliding_window", None) is None
             and set(layer_types) <= {"full_attention"})
    with borrowed_attention(config if plain else None, _ATTENTION):
        yield


@contextlib.contextmanager
def borrowed_attention(config, name: str):
    """For the duration, the attention modules reading `config` use the registered implementation
    `name`; the one they had comes back after. config None: nothing changes."""
    if config is None:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before
