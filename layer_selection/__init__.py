"""Layer selection: which layers stay softmax (sparse) and which become linear (SPEC §4)."""
from salaconvert.layer_selection.plan import LayerPlan, PlanError, num_sparse, parse_ratio, uniform_layer_types

__all__ = ["LayerPlan", "PlanError", "num_sparse", "parse_ratio", "uniform_layer_types"]
