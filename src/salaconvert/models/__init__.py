"""The hybrid checkpoint's config, model and cache, registered with the transformers Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from salaconvert.models.cache import SparseAttentionCacheLayer
from salaconvert.models.configuration import LAYER_TYPES, SalaHybridConfig
from salaconvert.models.modeling import SalaHybridForCausalLM

AutoConfig.register(SalaHybridConfig.model_type, SalaHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(SalaHybridConfig, SalaHybridForCausalLM, exist_ok=True)

__all__ = ["LAYER_TYPES", "SalaHybridConfig", "SalaHybridForCausalLM", "SparseAttentionCacheLayer"]
