"""HALO distillation (SPEC §5): stage 1 aligns each new attention module's output with the
teacher's, stage 2 minimises the forward KL of the logits, stage 3 optionally fine-tunes on long
text. `distill()` is the library function behind `salaconvert distill`."""
from salaconvert.distill.recipe import Recipe, Stage, load_recipe
from salaconvert.distill.run import distill

__all__ = ["Recipe", "Stage", "distill", "load_recipe"]
