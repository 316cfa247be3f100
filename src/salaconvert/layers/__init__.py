"""The two attention modules that replace a teacher's softmax attention (SPEC §2)."""
from salaconvert.layers.lightning import LightningAttention
from salaconvert.layers.sparse import SparseAttention

__all__ = ["LightningAttention", "SparseAttention"]
