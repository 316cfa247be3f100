"""Baselines for ablation (SPEC §4): evenly spaced layers, and a seeded random choice."""
import random

from salaconvert.layer_selection.plan import SPARSE, uniform_layer_types
from salaconvert.layer_selection.scorers import ScoreContext, ScoreResult, register_scorer


@register_scorer("uniform", "sparse layers evenly spaced (the convert default)", kind="baseline", needs_model=False)
def uniform(ctx: ScoreContext) -> ScoreResult:
    # Score 1 on the evenly spaced layers, 0 elsewhere: the common top-k selection then picks exactly them.
    types = uniform_layer_types(ctx.num_layers, ctx.ratio, ctx.first_last)
    return ScoreResult([1.0 if t == SPARSE else 0.0 for t in types])


@register_scorer("random", "seeded random scores (same --seed, same plan)", kind="baseline", needs_model=False)
def random_scores(ctx: ScoreContext) -> ScoreResult:
    rng = random.Random(f"salaconvert-random-{ctx.seed}")
    return ScoreResult([round(rng.random(), 6) for _ in range(ctx.num_layers)])
