"""The hybrid cache: transformers' DynamicCache built from `layer_types`; and the teacher's
cache for graph decode.

transformers already maps "linear_attention" to `LinearAttentionLayer` (a recurrent state, no
sequence axis, updated in place) and "full_attention" to `DynamicLayer`. A sparse layer keeps its
own layer type, `SparseAttentionCacheLayer`: K/V in [B, T, Hkv, d] buffers that grow geometrically
(appending a token costs O(1) amortised instead of DynamicLayer's O(T) concatenation, and
long-context runs can reserve the whole length up front), plus the compressed keys that
InfLLM-V2's block selection reads, kept up to date as tokens arrive. With a reserve, full-attention
layers (the teacher's, or a hybrid's) become `FullAttentionCacheLayer`: K/V allocated once.

A sparse layer may store its K/V in fp8 (`kv_dtype=FP8`, e4m3 with no scale, as vLLM's default
fp8 cache): half the bytes of bf16. Values are clamped to ±448 (e4m3's range) on the way in;
every reader sees the stored values: the prefill gets them widened back to the model's dtype,
the decode kernel widens the blocks it reads, and the compressed keys are means of them.

Graph decode (salaconvert.models.graph_decode) sets `position` on the sparse and full-attention
layers: a device tensor holding the new token's position. While it is set, a one-token step
writes K/V there (no Python int is baked into a captured graph) and the host-side `length` is
left alone: the decoder advances it with `advance` after each step, without a sync.
"""
import inspect

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from salaconvert.kernels.infllmv2 import compress_k, update_compressed_cache


def cache_argument(model) -> str:
    """The keyword a model's forward takes its cache by: `cache` from transformers 5.24 on, where
    `past_key_values` is deprecated (to go in 5.40), and `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


_GROWTH = 1.25  # capacity grows by a quarter: at most 25% spare memory, amortised O(1) appends
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_DTYPES = {"auto": None, "fp8": FP8}  # the choices users name (generate --kv-cache, benchmarks)


class SparseAttentionCacheLayer(CacheLayerMixin):
    """K/V (and compressed keys) of one InfLLM-V2 layer. Shapes: k, v [B, capacity, Hkv, d] in
    `kv_dtype` (None: the model's dtype; FP8); kc [B, ·, Hkv, d] fp32."""

    _layer_type = "sparse_attention"  # registers itself in transformers' layer-type mapping
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self.kernel_size = self.stride = None
        self.kc = self.seqlens = None
        self.position = None  # graph decode: int64 [1] device tensor, the position of the token a step writes
        self.kv_dtype = None  # storage dtype of K/V: None (the model's) or FP8

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, H, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        store = self.kv_dtype or key_states.dtype
        self.keys = key_states.new_empty(B, 0, H, d, dtype=store)
        self.values = value_states.new_empty(B, 0, H, d, dtype=store)
        self.kc = key_states.new_empty(B, 0, H, d, dtype=torch.float32)
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)  # a tensor: decode kernels read it
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def reserve(self, capacity: int) -> None:
        """Allocate room for `capacity` tokens now (long-context runs: no regrowth, no 2× peak)."""
        if capacity <= self.keys.shape[1]:
            return
        B, _, H, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(B, capacity, H, d)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)
        n_c = self._windows(capacity)
        kc = self.kc.new_empty(B, n_c, H, d)
        kc[:, : self._windows(self.length)] = self.kc[:, : self._windows(self.length)]
        self.kc = kc

    def append(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, kernel_size: int, stride: int):
        """Add T tokens; returns views of all cached K and V, [B, length, Hkv, d]."""
        if not self.is_initialized:
            self.lazy_initialization(k_BTHD, v_BTHD)
        self.kernel_size, self.stride = kernel_size, stride
        start, end = self.length, self.length + k_BTHD.shape[1]
        if end > self.keys.shape[1]:
            self.reserve(max(end, int(self.keys.shape[1] * _GROWTH) + 64))
        self.keys[:, start:end] = self._stored(k_BTHD)
        self.values[:, start:end] = self._stored(v_BTHD)
        n_old, n_new = self._windows(start), self._windows(end)
        if n_new > n_old:  # windows completed by these tokens
            first = n_old * stride
            span = self.keys[:, first:(n_new - 1) * stride + kernel_size]
            self.kc[:, n_old:n_new] = compress_k(span, kernel_size, stride)
        self.length = end
        self.seqlens.fill_(end)
        k, v = self.keys[:, :end], self.values[:, :end]
        if self.keys.dtype != self.dtype:  # fp8 storage: the prefill attends to the stored values, widened
            k, v = k.to(self.dtype), v.to(self.dtype)
        return k, v

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """x as the buffers hold it: fp8 clamped to its range (a plain cast would turn |x| > 448 into NaN)."""
        if self.keys.dtype == FP8:
            return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return x

    def write_token(self, k_B1HD: torch.Tensor, v_B1HD: torch.Tensor) -> None:
        """Graph decode: one token's K/V at the device `position`; seqlens and compressed keys follow.

        The whole buffers stay the decode kernel's input (capacity-sized, so a captured step
        replays at any length); `length` is the decoder's to advance.
        """
        for buf, x in ((self.keys, k_B1HD), (self.values, v_B1HD)):
            x = self._stored(x)
            if buf.dtype == FP8:  # index_copy_ has no fp8 kernels: copy the bytes
                buf, x = buf.view(torch.uint8), x.view(torch.uint8)
            buf.index_copy_(1, self.position, x)
        self.seqlens.copy_(self.position + 1)
        update_compressed_cache(self.keys, self.kc, self.seqlens, kernel_size=self.kernel_size, stride=self.stride)

    def advance(self, tokens: int) -> None:
        """Host bookkeeping after graph-decode steps wrote `tokens` tokens."""
        self.length += tokens

    def compressed_keys(self) -> torch.Tensor:
        return self.kc[:, : self._windows(self.length)]

    def _windows(self, length: int) -> int:
        if self.kernel_size is None or length < self.kernel_size:
            return 0
        return (length - self.kernel_size) // self.stride + 1

    # The transformers Cache interface ([B, H, T, d] in and out), for code that treats us as any layer.
    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("sparse layers append through SparseAttentionCacheLayer.append (kernel geometry needed)")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last |tokens_to_remove| tokens (compressed keys of whole windows stay valid)."""
        self.length = max(0, self.length - abs(tokens_to_remove))
        if self.seqlens is not None:
            self.seqlens.fill_(self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn) -> None:
        self.keys, self.values, self.kc = fn(self.keys), fn(self.values), fn(self.kc)
        self.seqlens = torch.full((self.keys.shape[0],), self.length, dtype=torch.int32, device=self.keys.device)

    def reset(self) -> None:
        self.length = 0
        if self.seqlens is not None:
            self.seqlens.zero_()


class FullAttentionCacheLayer(CacheLayerMixin):
    """K/V of one softmax-attention layer in buffers allocated once: [B, Hkv, capacity, d] (transformers' layout).

    Eager updates return views of the tokens so far, as DynamicLayer's concatenation would (same
    attention, same mask); under graph decode (`position` set) a one-token update writes at the
    device position and returns the whole buffers, which the decoder's mask limits to the tokens so far.
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.position = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        # Zeros, not empty: masked positions still meet the values (0 × NaN would poison the output).
        self.keys = key_states.new_zeros(B, H, self.capacity, d)
        self.values = value_states.new_zeros(B, H, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.position is not None:
            self.keys.index_copy_(2, self.position, key_states)
            self.values.index_copy_(2, self.position, value_states)
            return self.keys, self.values
        start, end = self.length, self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"cache full: {end} tokens do not fit the {self.capacity} reserved")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def advance(self, tokens: int) -> None:
        """Host bookkeeping after graph-decode steps wrote `tokens` tokens."""
        self.length += tokens

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove))

    def reset(self) -> None:
        self.length = 0


def _reserve_full_attention(cache: DynamicCache, layer_types, capacity: int) -> None:
    for idx, layer_type in enumerate(layer_types):
        if layer_type == "full_attention":
            cache.layers[idx] = FullAttentionCacheLayer(capacity)


def make_teacher_cache(config, capacity: int) -> DynamicCache:
    """A teacher's cache with K/V for `capacity` tokens allocated at the first update (graph decode needs it).

    Only full-attention teachers (every layer a plain DynamicLayer in transformers' own cache for
    this config): a sliding-window layer would need a ring buffer.
    """
    cache = DynamicCache(config=config)
    other = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if other or len(cache.layers) != config.num_hidden_layers:
        raise ValueError(f"a reserved teacher cache holds full-attention layers only, this teacher has {other or 'none'}")
    cache.layers[:] = [FullAttentionCacheLayer(capacity) for _ in cache.layers]
    return cache


def make_hybrid_cache(config, reserve: int | None = None, batch_size: int = 1, dtype=None, device=None,
                      kv_dtype: torch.dtype | None = None) -> DynamicCache:
    """A fresh cache with one layer per entry of `config.layer_types`.

    With `reserve`, the sparse layers allocate room for that many tokens now: a long prefill then
    never regrows them (no copies, no transient 2× of a layer's K/V) and holds no spare capacity;
    full-attention layers become `FullAttentionCacheLayer`s of that capacity (allocated at their first update).
    `kv_dtype=FP8` stores the sparse layers' K/V in fp8 (module docstring).
    """
    if kv_dtype not in (None, FP8):
        raise ValueError(f"kv_dtype {kv_dtype}: sparse K/V are stored in the model's dtype (None) or {FP8}")
    cache = DynamicCache(config=config)
    if reserve:
        _reserve_full_attention(cache, config.layer_types, reserve)
    shape = (batch_size, 0, config.num_key_value_heads, config.head_dim)
    for layer in cache.layers:
        if not isinstance(layer, SparseAttentionCacheLayer):
            continue
        layer.kv_dtype = kv_dtype
        if reserve:
            empty = torch.empty(shape, dtype=dtype, device=device)
            layer.lazy_initialization(empty, empty)
            layer.kernel_size, layer.stride = config.sparse["kernel_size"], config.sparse["stride"]
            layer.reserve(reserve)
    return cache


def reserved_cache(model, tokens: int, kv_dtype: torch.dtype | None = None) -> DynamicCache:
    """A cache with room for `tokens` tokens that graph decode can drive: the hybrid's with its
    sparse (and any full) layers reserved, a teacher's of `FullAttentionCacheLayer`s. Raises
    ValueError for a teacher whose layers cannot be reserved (sliding windows). kv_dtype: see
    make_hybrid_cache (hybrids only)."""
    if getattr(model.config, "model_type", None) != "sala_hybrid":
        if kv_dtype is not None:
            raise ValueError("an fp8 K/V cache is for a hybrid's sparse layers; this model is not a hybrid")
        return make_teacher_cache(model.config, tokens)
    p = next(model.parameters())
    return make_hybrid_cache(model.config, reserve=tokens, dtype=p.dtype, device=p.device, kv_dtype=kv_dtype)
