"""The hybrid cache: transformers' DynamicCache built from `layer_types`.

transformers already maps "linear_attention" to `LinearAttentionLayer` (a recurrent state, no
sequence axis) and "full_attention" to `DynamicLayer`. A sparse layer keeps its own layer type,
`SparseAttentionCacheLayer`: K/V in [B, T, Hkv, d] buffers that grow geometrically (appending a
token costs O(1) amortised instead of DynamicLayer's O(T) concatenation, and long-context runs
can reserve the whole length up front), plus the compressed keys that InfLLM-V2's block
selection reads, kept up to date as tokens arrive.
"""
import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

from salaconvert.kernels.infllmv2 import compress_k

_GROWTH = 1.25  # capacity grows by a quarter: at most 25% spare memory, amortised O(1) appends


class SparseAttentionCacheLayer(CacheLayerMixin):
    """K/V (and compressed keys) of one InfLLM-V2 layer. Shapes: k, v [B, capacity, Hkv, d]; kc [B, ·, Hkv, d] fp32."""

    _layer_type = "sparse_attention"  # registers itself in transformers' layer-type mapping
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self.kernel_size = self.stride = None
        self.kc = self.seqlens = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, H, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(B, 0, H, d)
        self.values = value_states.new_empty(B, 0, H, d)
        self.kc = key_states.new_empty(B, 0, H, d, dtype=torch.float32)
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)  # a tensor: decode kernels read it
        self.is_initialized = True

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
        self.keys[:, start:end] = k_BTHD
        self.values[:, start:end] = v_BTHD
        n_old, n_new = self._windows(start), self._windows(end)
        if n_new > n_old:  # windows completed by these tokens
            first = n_old * stride
            span = self.keys[:, first:(n_new - 1) * stride + kernel_size]
            self.kc[:, n_old:n_new] = compress_k(span, kernel_size, stride)
        self.length = end
        self.seqlens.fill_(end)
        return self.keys[:, :end], self.values[:, :end]

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


def make_hybrid_cache(config, reserve: int | None = None, batch_size: int = 1, dtype=None, device=None) -> DynamicCache:
    """A fresh cache with one layer per entry of `config.layer_types`.

    With `reserve`, the sparse layers allocate room for that many tokens now: a long prefill then
    never regrows them (no copies, no transient 2× of a layer's K/V) and holds no spare capacity.
    """
    cache = DynamicCache(config=config)
    if reserve:
        shape = (batch_size, 0, config.num_key_value_heads, config.head_dim)
        for layer in cache.layers:
            if isinstance(layer, SparseAttentionCacheLayer):
                empty = torch.empty(shape, dtype=dtype, device=device)
                layer.lazy_initialization(empty, empty)
                layer.kernel_size, layer.stride = config.sparse["kernel_size"], config.sparse["stride"]
                layer.reserve(reserve)
    return cache
