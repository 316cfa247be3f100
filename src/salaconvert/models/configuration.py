"""`SalaHybridConfig`: the teacher's config nested whole, plus the plan and the two new layers' settings.

The teacher's config is kept as a dict (`teacher`) so the hybrid can rebuild the teacher's own
model class, whatever the architecture; the fields that generation and the cache read at the
top level (vocab size, layer count, heads, special tokens) are mirrored from it.
"""
import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

LAYER_TYPES = ("linear_attention", "sparse_attention", "full_attention")

# SPEC §2 defaults. Every number is configuration.
LIGHTNING_DEFAULTS = {
    "decay": "sala",  # γ_h = exp(−2^(−8h/H)); "minimax" scales it by layer depth
    "qk_norm": True,  # per-head RMSNorm on q and k (the teacher's own norms when it has them)
    # False: GQA→MHA, K/V rows repeated per query head (HALO). True: the teacher's K/V heads kept,
    # shared by the query heads of a group; each query head still keeps its own state and decay.
    "gqa": False,
}
SPARSE_DEFAULTS = {
    "block_size": 64,
    "topk": 96,
    "init_blocks": 1,
    "local_blocks": 32,
    "kernel_size": 32,
    "stride": 16,
    "dense_len": 8192,
    "coarse_norm": False,  # True: the selection's softmax normaliser from the 4x coarser pool (the paper's approximation)
    "rope": False,  # NoPE (HyPE): the sparse layers drop the rotary embedding
    "output_gate": True,
    "qk_norm": False,  # set at conversion when the teacher's attention has per-head q/k norms
}

# Fields that the cache, masks and generate() read from the top-level config, mirrored from the teacher.
_MIRRORED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",
)


@strict
class SalaHybridConfig(PreTrainedConfig):
    model_type = "sala_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    teacher: dict | None = None
    layer_types: list[str] | None = None
    lightning: dict | None = None
    sparse: dict | None = None
    qkvo_bias: list[bool] | None = None  # whether the teacher's q/k/v/o projections have biases
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    initializer_range: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.teacher = dict(self.teacher or {})
        for name in _MIRRORED:
            if getattr(self, name) is None and self.teacher.get(name) is not None:
                setattr(self, name, self.teacher[name])
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.tie_word_embeddings = bool(self.tie_word_embeddings)
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * (self.num_hidden_layers or 0)
        self.qkvo_bias = list(self.qkvo_bias or [bool(self.teacher.get("attention_bias", False))] * 4)
        self.lightning = {**LIGHTNING_DEFAULTS, **(self.lightning or {})}
        self.sparse = {**SPARSE_DEFAULTS, **(self.sparse or {})}
        super().__post_init__(**kwargs)

    def validate_layer_type(self):
        """Replaces transformers' check: our plan has its own three types, one per layer."""
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types: unknown type(s) {bad}; expected {list(LAYER_TYPES)}")
        if self.num_hidden_layers is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def validate_sparse_windows(self):
        """The sparse layers' block / compressed window / stride must suit the kernels' max-pool."""
        from salaconvert.kernels.infllmv2.layout import pool_shape
        pool_shape(self.sparse["block_size"], self.sparse["kernel_size"], self.sparse["stride"])

    def teacher_config(self) -> PreTrainedConfig:
        """The teacher's own config object, rebuilt from the nested dict."""
        fields = dict(self.teacher)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
        config._attn_implementation = self._attn_implementation or "sdpa"
        return config

    def log_decay(self) -> list[float]:
        """Per-head log-decay (negative) of the Lightning layers: log γ_h = −2^(−8h/H), h = 1..H."""
        n_heads = self.num_attention_heads
        return [-(2.0 ** (-8.0 * h / n_heads)) for h in range(1, n_heads + 1)]

    def layer_log_decay(self, layer_idx: int) -> list[float]:
        """The decay a given layer uses; "minimax" scales SALA's by (1 − l/(L−1) + ε) as MiniMax-01 does."""
        base = self.log_decay()
        if self.lightning["decay"] == "sala":
            return base
        if self.lightning["decay"] == "minimax":
            depth = 1.0 - layer_idx / max(self.num_hidden_layers - 1, 1) + 1e-5
            return [d * depth for d in base]
        raise ValueError(f"lightning.decay={self.lightning['decay']!r}: expected 'sala' or 'minimax'")

    def cache_bytes_per_token(self, dtype_bytes: int = 2) -> dict:
        """Cache growth per token and the fixed state size (bytes), hybrid vs the all-softmax teacher."""
        kv = 2 * self.num_key_value_heads * self.head_dim * dtype_bytes
        n_sparse = self.layer_types.count("sparse_attention")
        n_full = self.layer_types.count("full_attention")
        n_linear = self.layer_types.count("linear_attention")
        heads = self.num_attention_heads  # one state per query head, with or without lightning.gqa
        compressed = self.num_key_value_heads * self.head_dim * dtype_bytes / self.sparse["stride"]
        return {
            "teacher_per_token": kv * self.num_hidden_layers,
            "hybrid_per_token": kv * (n_sparse + n_full) + math.ceil(compressed * n_sparse),
            "hybrid_fixed": n_linear * heads * self.head_dim * self.head_dim * 4,
        }
