"""One-token decode as a CUDA graph: the whole model's step captured once, replayed per token.

An eager decode step on a small model is launch- and Python-bound (hundreds of small kernels, a
Python call per module); replaying a captured graph launches them all at once. Capture needs every
step to run the same kernels on the same addresses, so the decoder works on a prefilled cache
whose buffers already hold the whole run (`make_hybrid_cache(reserve=...)`,
`make_teacher_cache(capacity)`) and feeds each step through static tensors:

- `ids` [B, 1] and `position` [1] are filled before each step (`fill_`/`copy_`: no host sync);
  position ids, hence RoPE's cos/sin, come from `position`.
- The sparse and full-attention cache layers get `position` too (cache.py): they write the new
  K/V there and read lengths on the device; Lightning layers update their states in place.
- Full-attention layers read capacity-sized K/V under a mask computed in the graph from `position`,
  through `grouped_decode_attention` (the query heads of a KV group as rows: no K/V repeat).
- After each step the host bookkeeping (the layers' `length`) is advanced by one in Python.

On a CUDA device `step` replays the graph; elsewhere (and with graph=False) it runs the very same
forward eagerly, which is what the CPU tests compare against the plain eager decode.
"""

import torch
from transformers import AttentionInterface
from transformers.cache_utils import LinearAttentionLayer

from salaconvert.models.cache import FullAttentionCacheLayer, SparseAttentionCacheLayer, cache_argument
from salaconvert.models.decoder_glue import fused_decoder_glue
from salaconvert.models.prefill_attention import borrowed_attention

_ATTENTION = "salaconvert_decode"
_WARMUP_STEPS = 2  # on a side stream before capture: Triton compiles, cuBLAS picks its kernels


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query token against capacity-sized K/V under a [B, 1, 1, S] mask. query [B, Hq, 1, d],
    key/value [B, Hkv, S, d] -> ([B, 1, Hq, d], None), as transformers' attention functions return.

    The G = Hq/Hkv query heads of a group become G rows against their KV head, so no K/V copy is
    made. Plain matmuls and a masked softmax in fp32, as transformers' eager attention computes.
    The first version called SDPA with the mask, and the H100 bench measured the teacher's decode
    far above its bandwidth bound at long context: with a mask SDPA cannot use its split-KV
    flash-decoding kernel. With these matmuls the Llama-3-8B shape decodes at 11.5 ms/token at 32K
    (was 28.4) and 31.1 at 256K on an H100 (benchmarks/notes-long-context.md, run 4).
    """
    B, Hq, T, d = query.shape
    Hkv = key.shape[1]
    if T != 1:
        raise ValueError(f"{_ATTENTION} attends one query token, got {T}")
    q = query.reshape(B, Hkv, Hq // Hkv, d)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return o.reshape(B, Hq, 1, d).transpose(1, 2), None


AttentionInterface.register(_ATTENTION, grouped_decode_attention)


class GraphDecoder:
    """Decode on a prefilled, reserved cache: `step(token)` -> logits [B, V] (fp32) of the next token.

    `graph=None` captures a CUDA graph when the model is on CUDA. The cache is driven by the
    decoder while it lives (its sparse/full layers write at the decoder's position); `close()`
    hands it back to eager use, with its lengths as the steps left them.
    """

    @torch.inference_mode()
    def __init__(self, model, cache, graph: bool | None = None):
        self.model, self.cache = model, cache
        others = [type(layer).__name__ for layer in cache.layers
                  if not isinstance(layer, (SparseAttentionCacheLayer, FullAttentionCacheLayer, LinearAttentionLayer))]
        if others:
            raise ValueError(f"graph decode cannot drive cache layers {sorted(set(others))}: build the cache with "
                             "make_hybrid_cache(config, reserve=...) or make_teacher_cache(config, capacity)")
        self.layers = [layer for layer in cache.layers if isinstance(layer, (SparseAttentionCacheLayer, FullAttentionCacheLayer))]
        if not self.layers:
            raise ValueError("graph decode needs a cache with sparse or full-attention layers (their length is the position)")
        self.length = cache.get_seq_length()
        if self.length < 1 or any(not layer.is_initialized for layer in self.layers):
            raise ValueError("graph decode starts from a prefilled cache (prefill at least one token first)")
        self.capacity = min(layer.capacity for layer in self.layers)
        batch = self.layers[0].keys.shape[0]
        device = self.layers[0].keys.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        full = [layer for layer in self.layers if isinstance(layer, FullAttentionCacheLayer)]
        self._kv_index = torch.arange(full[0].capacity, device=device) if full else None
        self._attn_config = model.model.config if full else None  # the config the teacher's attention modules read
        if full and getattr(self._attn_config, "sliding_window", None) is not None:
            raise ValueError("graph decode masks full-attention layers causally: a sliding window would be ignored")
        for layer in self.layers:
            layer.position = self.position
        self.graph = None
        if graph if graph is not None else device.type == "cuda":
            self._capture()

    def _forward(self) -> torch.Tensor:
        kwargs = {}
        if self._kv_index is not None:  # the tokens so far, new one included, from the device position
            kwargs["attention_mask"] = (self._kv_index <= self.position).view(1, 1, 1, -1)
        with self._decode_attention(), fused_decoder_glue(self.model):
            out = self.model(input_ids=self.ids, position_ids=self.position.view(1, 1).expand_as(self.ids),
                             use_cache=True, logits_to_keep=1, **{cache_argument(self.model): self.cache}, **kwargs)
        return out.logits[:, -1].float()

    def _decode_attention(self):
        """Full-attention modules use grouped_decode_attention for the duration of a forward."""
        return borrowed_attention(self._attn_config, _ATTENTION)

    def _capture(self) -> None:
        # Warm-up steps run for real: they advance the Lightning states, which are saved and put
        # back (K/V written at `position` are rewritten by the first real step, seqlens reset).
        states = [layer.recurrent_states[0] for layer in self.cache.layers
                  if isinstance(layer, LinearAttentionLayer) and layer.is_recurrent_states_initialized[0]]
        saved = [s.clone() for s in states]
        self.position.fill_(self.length)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        for s, copy in zip(states, saved):
            s.copy_(copy)
        for layer in self.layers:
            if isinstance(layer, SparseAttentionCacheLayer):
                layer.seqlens.fill_(self.length)

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed `token` (an int, or a device tensor of B ids) at the next position; returns logits [B, V].

        Under a graph the logits are the graph's output buffer: the next step overwrites them.
        """
        if self.length >= self.capacity:
            raise ValueError(f"cache full: {self.capacity} tokens reserved")
        if isinstance(token, torch.Tensor):
            self.ids.copy_(token.view(-1, 1))
        else:
            self.ids.fill_(token)
        self.position.fill_(self.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        self.length += 1
        for layer in self.layers:
            layer.advance(1)
        return logits

    def close(self) -> None:
        """Give the cache back to eager use (its layers stop writing at the decoder's position)."""
        for layer in self.layers:
            layer.position = None
        self.graph = None
