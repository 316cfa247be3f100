"""The sparse layers' cache: appends in any pieces equal one write; compressed keys track the keys."""
import torch
from transformers.cache_utils import DynamicCache, LinearAttentionLayer

from salaconvert.kernels.infllmv2 import compress_k
from salaconvert.models import SalaHybridConfig
from salaconvert.models.cache import SparseAttentionCacheLayer, make_hybrid_cache


def _filled(pieces, B=2, H=3, d=8, ks=8, st=4):
    layer = SparseAttentionCacheLayer()
    ks_all, vs_all = [], []
    for n in pieces:
        k, v = torch.randn(B, n, H, d), torch.randn(B, n, H, d)
        keys, values = layer.append(k, v, ks, st)
        ks_all.append(k)
        vs_all.append(v)
    return layer, keys, values, torch.cat(ks_all, 1), torch.cat(vs_all, 1)


def test_appends_in_uneven_pieces_equal_the_whole_and_compressed_keys_follow():
    layer, keys, values, k, v = _filled([5, 1, 1, 30, 1, 64, 3])
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert layer.get_seq_length() == 105 and layer.seqlens.tolist() == [105, 105]
    assert torch.allclose(layer.compressed_keys(), compress_k(k, 8, 4), atol=1e-6)
    assert layer.keys.shape[1] < 105 * 1.25 + 64 + 1  # bounded spare capacity


def test_reserve_keeps_contents_and_crop_forgets_the_tail():
    layer, _, _, k, _ = _filled([20])
    layer.reserve(1000)
    assert layer.keys.shape[1] == 1000 and torch.equal(layer.keys[:, :20], k)
    layer.crop(-7)
    assert layer.get_seq_length() == 13
    assert torch.allclose(layer.compressed_keys(), compress_k(k[:, :13], 8, 4), atol=1e-6)


def test_beam_reorder_selects_batch_rows():
    layer, _, _, k, _ = _filled([12], B=3)
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(layer.keys[:, :12], k[[2, 2, 0]])


def test_hybrid_cache_has_one_layer_kind_per_plan_entry():
    config = SalaHybridConfig(teacher={"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 32,
                                       "num_attention_heads": 2, "vocab_size": 10},
                              layer_types=["sparse_attention", "linear_attention", "full_attention"])
    cache = make_hybrid_cache(config)
    assert isinstance(cache, DynamicCache)
    assert [type(layer).__name__ for layer in cache.layers] == [
        SparseAttentionCacheLayer.__name__, LinearAttentionLayer.__name__, "DynamicLayer"]


def test_reserved_cache_holds_the_whole_run_without_regrowing():
    config = SalaHybridConfig(teacher={"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
                                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10},
                              layer_types=["sparse_attention", "linear_attention"])
    layer = make_hybrid_cache(config, reserve=300, batch_size=2, dtype=torch.float32).layers[0]
    buffer = layer.keys
    k = torch.randn(2, 300, 2, 8)
    keys, _ = layer.append(k, k, config.sparse["kernel_size"], config.sparse["stride"])
    assert layer.keys is buffer and torch.equal(keys, k)
    assert torch.allclose(layer.compressed_keys(), compress_k(k), atol=1e-6)


def test_fp8_layer_stores_rounded_values_in_half_the_bytes():
    # kv_dtype = FP8: stored e4m3 (clamped, never NaN), read back widened; compressed keys from the stored values
    from salaconvert.models.cache import FP8, FP8_MAX
    layer = SparseAttentionCacheLayer()
    layer.kv_dtype = FP8
    k, v = torch.randn(1, 40, 2, 8) * 3, torch.randn(1, 40, 2, 8)
    k[0, 5, 0, 0], v[0, 7, 1, 3] = 1000., -5000.  # beyond e4m3's ±448
    keys, values = layer.append(k[:, :25], v[:, :25], 8, 4)
    keys, values = layer.append(k[:, 25:], v[:, 25:], 8, 4)
    rounded_k = k.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    rounded_v = v.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    assert layer.keys.dtype == FP8 and keys.dtype == torch.float32
    assert torch.equal(keys, rounded_k) and torch.equal(values, rounded_v)
    assert keys[0, 5, 0, 0] == FP8_MAX and values[0, 7, 1, 3] == -FP8_MAX
    assert not torch.equal(keys, k), "e4m3 rounds"
    assert torch.allclose(layer.compressed_keys(), compress_k(rounded_k, 8, 4), atol=1e-6)
    assert layer.keys.element_size() == 1


def test_make_hybrid_cache_takes_fp8_for_sparse_layers_only():
    import pytest
    from salaconvert.models.cache import FP8
    config = SalaHybridConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32,
                              layer_types=["sparse_attention", "linear_attention"])
    cache = make_hybrid_cache(config, reserve=64, dtype=torch.bfloat16, kv_dtype=FP8)
    sparse = cache.layers[0]
    assert sparse.keys.dtype == FP8 and sparse.keys.shape[1] == 64 and sparse.kc.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_dtype"):
        make_hybrid_cache(config, kv_dtype=torch.float16)
