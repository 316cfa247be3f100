"""salaconvert: turn a pretrained Hugging Face decoder LM into a MiniCPM-SALA-style hybrid.

Importing the package registers the `sala_hybrid` model type with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained(DIR)` loads a converted checkpoint.
"""
__version__ = "0.1.0"

from salaconvert.models import SalaHybridConfig, SalaHybridForCausalLM  # noqa: E402

__all__ = ["SalaHybridConfig", "SalaHybridForCausalLM", "__version__"]
