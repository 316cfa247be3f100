"""`salaconvert eval`: perplexity, passkey and needle-in-a-haystack retrieval, lm-eval tasks;
teacher beside hybrid (SPEC §7)."""
from salaconvert.eval.run import EvalSettings, run_eval

__all__ = ["EvalSettings", "run_eval"]
