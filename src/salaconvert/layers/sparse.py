"""InfLLM-V2 sparse attention: the module that keeps softmax attention in a sparse layer.

Differs from the teacher's attention in three ways (SPEC §2): no rotary embedding by default
(NoPE), an output gate o_proj(attn ⊙ sigmoid(x W_og)), and attention that turns block-sparse
once the keys outgrow `dense_len`. The weights Wq, Wk, Wv, Wo (and any QK-norm) are the teacher's.

Shape legend: B batch, T query tokens, S key tokens, D hidden size, Hq query heads, Hkv KV heads, d head dim.
"""
import torch
import torch.nn.functional as F
from torch import nn

from salaconvert.kernels.infllmv2 import infllmv2_attn, infllmv2_decode
from salaconvert.kernels.infllmv2.route import Router
from salaconvert.layers.common import RMSNorm, causal_attention, norm_rope

KERNEL_KEYS = (  # the sparse config entries the InfLLM-V2 ops take
    "block_size", "topk", "init_blocks", "local_blocks", "kernel_size", "stride", "dense_len", "coarse_norm")


class SparseAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = config.head_dim
        Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        bq, bk, bv, bo = config.qkvo_bias
        self.q_proj = nn.Linear(D, Hq * d, bias=bq)
        self.k_proj = nn.Linear(D, Hkv * d, bias=bk)
        self.v_proj = nn.Linear(D, Hkv * d, bias=bv)
        self.o_proj = nn.Linear(Hq * d, D, bias=bo)
        eps = config.rms_norm_eps or 1e-6
        self.q_norm = RMSNorm(d, eps) if config.sparse["qk_norm"] else nn.Identity()
        self.k_norm = RMSNorm(d, eps) if config.sparse["qk_norm"] else nn.Identity()
        self.og_proj = nn.Linear(D, Hq * d, bias=False) if config.sparse["output_gate"] else None
        self.rope = config.sparse["rope"]
        self.kernel_kwargs = {key: config.sparse[key] for key in KERNEL_KEYS}
        self.router = Router()  # where long prefill calls send their chosen blocks (kernels/infllmv2/route.py)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # transformers ≥ 5.24 says `cache`
        x_BTD = hidden_states
        B, T, _ = x_BTD.shape
        d = self.head_dim
        cos, sin = position_embeddings if self.rope else (None, None)
        q = norm_rope(self.q_proj(x_BTD).view(B, T, -1, d), self.q_norm, cos, sin)
        k = norm_rope(self.k_proj(x_BTD).view(B, T, -1, d), self.k_norm, cos, sin)
        v = self.v_proj(x_BTD).view(B, T, -1, d)
        kw = self.kernel_kwargs
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if layer is not None and layer.position is not None:
            # Graph decode: K/V written at a device position, the kernel reads the capacity-sized
            # buffers and the lengths on the device, so the step can be captured once and replayed.
            layer.write_token(k, v)
            o = infllmv2_decode(q, layer.keys, layer.values, layer.seqlens, layer.kc, **kw)
            return self._output(o, x_BTD), None
        if layer is not None:
            k, v = layer.append(k, v, kw["kernel_size"], kw["stride"])  # all cached K/V, [B, S, Hkv, d]

        if isinstance(attention_mask, torch.Tensor) and k.shape[1] <= kw["dense_len"]:
            o = _masked_dense(q, k, v, attention_mask)  # padded batch: honour the padding mask
        elif k.shape[1] <= kw["dense_len"]:
            # Below dense_len the layer is dense causal attention, exactly (SPEC §2): the flash kernel
            # does that fastest, forward and backward (training at 512 tokens, chunks of a prefill).
            o = causal_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        elif layer is not None and T == 1:
            # One token against the cache: reads only the selected blocks and the cached compressed keys.
            o = infllmv2_decode(q, layer.keys, layer.values, layer.seqlens, layer.compressed_keys(), **kw)
        else:
            o = infllmv2_attn(q, k, v, router=self.router, **kw)
        return self._output(o, x_BTD), None

    def _output(self, o_BTHD, x_BTD):
        B, T, _ = x_BTD.shape
        o_BTD = o_BTHD.reshape(B, T, -1)
        if self.og_proj is not None:
            o_BTD = o_BTD * torch.sigmoid(self.og_proj(x_BTD))
        return self.o_proj(o_BTD)


def _masked_dense(q_BTHD, k_BSHD, v_BSHD, mask) -> torch.Tensor:
    """Softmax attention with the 4-D mask transformers built (causal + padding)."""
    group = q_BTHD.shape[2] // k_BSHD.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BSHD, v_BSHD))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., : k.shape[2]])
    return o.transpose(1, 2)
