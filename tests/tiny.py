"""Tiny teachers built from configs in code (never from the hub), one per registered architecture."""
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),  # per-head q/k norms
}


def tiny_teacher(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    if arch in ("qwen2", "qwen3"):
        # Random (non-zero) biases and norm weights, so that reusing them is actually tested.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


# Small InfLLM-V2 geometry so that short test sequences reach the sparse path.
SMALL_SPARSE = {"dense_len": 24, "block_size": 8, "kernel_size": 8, "stride": 4, "topk": 3,
                "init_blocks": 1, "local_blocks": 1}
# The GPU's Triton path needs blocks of ≥ 16 tokens (tl.dot): the same plan scaled up for `-m gpu` tests.
GPU_SPARSE = dict(SMALL_SPARSE, dense_len=48, block_size=16, kernel_size=16, stride=8)


def tiny_hybrid(layer_types, arch: str = "llama", sparse=SMALL_SPARSE, attn: str = "sdpa", lightning=None):
    """A tiny teacher converted under `layer_types`, with trained-looking gates and norms: a fresh
    hybrid's zero gates hide a wrong path in the attention, these let it show in the logits."""
    from salaconvert.layer_selection import LayerPlan
    from salaconvert.surgery.convert import convert

    teacher = tiny_teacher(arch)
    teacher.config._attn_implementation = attn
    hybrid = convert(teacher, LayerPlan(layer_types), sparse=sparse, lightning=lightning)
    with torch.no_grad():
        for name, p in hybrid.named_parameters():
            if any(k in name for k in ("z_proj", "og_proj", "o_norm")):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return hybrid.eval()



def tiny_tokenizer():
    """A character-level tokenizer with ids below the tiny models' vocabulary of 128."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_teacher(folder, arch: str = "llama", tokenizer: bool = True):
    """A tiny teacher written as a Hugging Face directory, as a user's local model would be."""
    model = tiny_teacher(arch)
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder
