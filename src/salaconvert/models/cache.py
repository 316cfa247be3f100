"""The hybrid cache: transformers' DynamicCache built from `layer_types`.

transformers already maps "linear_attention" to `LinearAttentionLayer` (a recurrent state, no
sequence axis) and "full_attention" to `DynamicLayer`. A sparse layer keeps the full K/V as a
softmax layer does, so it is a `DynamicLayer` registered under our own type name.
"""
from transformers.cache_utils import DynamicCache, DynamicLayer


class SparseAttentionCacheLayer(DynamicLayer):
    """K/V of an InfLLM-V2 layer, laid out [B, Hkv, T, d] like every transformers attention cache."""

    _layer_type = "sparse_attention"  # registers itself in transformers' layer-type mapping


def make_hybrid_cache(config) -> DynamicCache:
    """A fresh cache with one layer per entry of `config.layer_types`."""
    return DynamicCache(config=config)
