"""Layer selection: which layers stay softmax (sparse) and which become linear (SPEC §4)."""
from salaconvert.layer_selection.plan import (LayerPlan, PlanError, num_sparse, parse_ratio, score_ranks,
                                              select_layer_types, uniform_layer_types)
from salaconvert.layer_selection.scorers import (ScoreContext, ScoreResult, available_scorers, get_scorer,
                                                 register_scorer)

__all__ = ["LayerPlan", "PlanError", "ScoreContext", "ScoreResult", "available_scorers", "get_scorer", "num_sparse",
           "parse_ratio", "register_scorer", "score_ranks", "select_layer_types", "uniform_layer_types"]
