"""`SalaHybridForCausalLM`: the teacher's own model with some attention modules swapped out.

Differs from the teacher's `*ForCausalLM` because its layers are a mix (SPEC §2): the decoder is
the teacher's base model rebuilt from the nested teacher config, and every layer whose plan entry
is not "full_attention" gets a `LightningAttention` or `SparseAttention` in place of its
attention. Parameter names stay the teacher's, so conversion can reuse the teacher's tensors.
"""
import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from salaconvert.layers import LightningAttention, SparseAttention
from salaconvert.models.cache import cache_argument, make_hybrid_cache
from salaconvert.models.configuration import SalaHybridConfig
from salaconvert.surgery.registry import resolve_arch

_LAYER_CLASSES = {"linear_attention": LightningAttention, "sparse_attention": SparseAttention}


class SalaHybridPreTrainedModel(PreTrainedModel):
    config: SalaHybridConfig
    config_class = SalaHybridConfig
    base_model_prefix = ""  # the decoder sits at `.model`, as in the teacher's *ForCausalLM
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, LightningAttention):
            init.copy_(module.log_decay, torch.tensor(self.config.layer_log_decay(module.layer_idx)))
        # The output gates start at zero: sigmoid(0) = 1/2 everywhere, a neutral start with no noise.
        if isinstance(module, (LightningAttention, SparseAttention)):
            gate = module.z_proj if isinstance(module, LightningAttention) else module.og_proj
            if gate is not None:
                init.zeros_(gate.weight)
                gate.weight._is_hf_initialized = True
        super()._init_weights(module)


class SalaHybridForCausalLM(SalaHybridPreTrainedModel, GenerationMixin):
    def __init__(self, config: SalaHybridConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.teacher_config())
        self.arch = resolve_arch(self.model)
        layers = getattr(self.model, self.arch.layers)
        for idx, layer_type in enumerate(config.layer_types):
            if layer_type in _LAYER_CLASSES:
                setattr(layers[idx], self.arch.attention, _LAYER_CLASSES[layer_type](config, idx))
        self._no_split_modules = [type(layers[0]).__name__]
        self._cache_kwarg = cache_argument(self.model)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            embed = self.model.get_input_embeddings()
            embed_name = next(n for n, m in self.model.named_modules() if m is embed)
            self._tied_weights_keys = {"lm_head.weight": f"model.{embed_name}.weight"}
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if cache is not None:  # transformers ≥ 5.24 renamed past_key_values to cache
            past_key_values = cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            # The teacher's model would make a cache of its own layer types; ours has one per plan entry.
            past_key_values = make_hybrid_cache(self.config)
        if past_key_values is not None and len(past_key_values.layers) != len(self.config.layer_types):
            raise ValueError("past_key_values: pass a cache from salaconvert.models.cache.make_hybrid_cache(config), "
                             "which has one layer per plan entry, or none")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{self._cache_kwarg: past_key_values},
            **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
