"""Lightning linear attention: the module that replaces the teacher's attention in a linear layer.

Differs from the teacher's attention because there is no softmax: each head keeps a d×d state
S_t = γ_h S_{t−1} + k_tᵀ v_t and reads it with o_t = (q_t/√d) S_t (SPEC §2). The math lives in
`salaconvert.kernels.lightning`; this module does the projections, norms, RoPE, gate and cache.

Shape legend: B batch, T tokens, D hidden size, H heads of this layer, d head dim.
"""
import torch
from torch import nn

from salaconvert.kernels.lightning import lightning_attn, lightning_attn_step
from salaconvert.layers.common import RMSNorm, gated_rms_norm, norm_rope


class LightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = config.head_dim
        self.num_heads = H = config.num_attention_heads
        # GQA→MHA (K/V rows repeated per query head) unless lightning.gqa keeps the teacher's K/V heads
        Hkv = config.num_key_value_heads if config.lightning["gqa"] else H
        D = config.hidden_size
        bq, bk, bv, bo = config.qkvo_bias
        self.q_proj = nn.Linear(D, H * d, bias=bq)
        self.k_proj = nn.Linear(D, Hkv * d, bias=bk)
        self.v_proj = nn.Linear(D, Hkv * d, bias=bv)
        self.o_proj = nn.Linear(H * d, D, bias=bo)
        eps = config.rms_norm_eps or 1e-6
        self.q_norm = RMSNorm(d, eps) if config.lightning["qk_norm"] else nn.Identity()
        self.k_norm = RMSNorm(d, eps) if config.lightning["qk_norm"] else nn.Identity()
        self.o_norm = RMSNorm(H * d, eps)
        self.z_proj = nn.Linear(D, H * d, bias=False)  # output gate; init in SalaHybridForCausalLM._init_weights
        self.register_buffer("log_decay", torch.tensor(config.layer_log_decay(layer_idx), dtype=torch.float32))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # transformers ≥ 5.24 says `cache`
        x_BTD = hidden_states
        B, T, _ = x_BTD.shape
        d = self.head_dim
        cos, sin = position_embeddings
        q = norm_rope(self.q_proj(x_BTD).view(B, T, -1, d), self.q_norm, cos, sin)
        k = norm_rope(self.k_proj(x_BTD).view(B, T, -1, d), self.k_norm, cos, sin)
        v = self.v_proj(x_BTD).view(B, T, -1, d)
        if isinstance(attention_mask, torch.Tensor) and T > 1:
            k = k * _real_tokens(attention_mask, T)[:, :, None, None].to(k.dtype)

        state = self._cached_state(past_key_values)
        if state is not None and T == 1:
            o = lightning_attn_step(q, k, v, self.log_decay, state)  # updates the cached state in place
        else:
            o, final = lightning_attn(q, k, v, self.log_decay, initial_state=state,
                                      output_final_state=past_key_values is not None)
            if past_key_values is not None:
                past_key_values.update_recurrent_state(final, self.layer_idx)

        o_BTD = gated_rms_norm(o.reshape(B, T, -1), self.o_norm, self.z_proj(x_BTD))
        return self.o_proj(o_BTD), None

    def _cached_state(self, cache):
        if cache is None:
            return None
        layer = cache.layers[self.layer_idx]
        return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None


def _real_tokens(mask, T: int) -> torch.Tensor:
    """[B, T] bool: which of this call's T tokens are not padding, from the mask transformers built.

    A 4-D mask [B, 1, T, S] (causal, maybe a sliding window, padding) lets every real token see
    itself and no row see a padding key, so its diagonal over this call's keys answers; flash
    attention passes the 2-D padding mask itself. A padding token's key is zeroed, so it adds
    nothing to the state or to any output: with left padding the state is still exactly zero when
    the first real token arrives.
    """
    if mask.dim() == 2:
        return mask[:, -T:].bool()
    own = mask[:, 0, :, -T:].diagonal(dim1=-2, dim2=-1)
    return own if own.dtype == torch.bool else own == 0  # an additive float mask is 0 where visible
