"""Distillation recipes (YAML) shipped with salaconvert as `salaconvert.recipes`; no code."""
