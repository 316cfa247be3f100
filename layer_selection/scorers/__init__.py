"""Scorer registry: each scorer gives every layer a score, higher meaning "keep softmax attention".

A scorer is a function `(ctx: ScoreContext) -> ScoreResult`, registered under a name with
`register_scorer`. `get_scorer(name)` looks one up; the names are what `analyze --method` takes.
Turning scores into a plan (ratio, SALA's first/last rule) is common code in `plan.py`, so every
scorer is held to the same rules.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from salaconvert.layer_selection.plan import PlanError


@dataclass
class ScoreContext:
    """What a scorer may use. `teacher` is a loaded causal LM in eval mode (never modified)."""
    teacher: torch.nn.Module
    tokenizer: object
    calibration: object  # probes.Calibration: packed real text
    num_layers: int
    seq_len: int
    seed: int = 0
    ratio: str = "1:3"
    first_last: bool = True
    options: dict = field(default_factory=dict)  # scorer-specific settings (e.g. halo_steps)
    progress: Callable[[str, int, int], None] = lambda what, done, total: None
    cache: dict = field(default_factory=dict)  # results shared between scorers in one run

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device


@dataclass
class ScoreResult:
    scores: list[float]
    details: dict = field(default_factory=dict)  # per-layer extras shown in the table / kept in plan.extra
    columns: dict[str, list[float]] = field(default_factory=dict)  # extra per-layer columns for the table


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[ScoreContext], ScoreResult]
    summary: str
    kind: str  # "baseline" | "proxy" | "halo"
    needs_model: bool = True


_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, summary: str, kind: str = "proxy", needs_model: bool = True):
    """Decorator: register `fn(ctx) -> ScoreResult` as the scorer `name`."""
    def wrap(fn):
        _SCORERS[name] = Scorer(name, fn, summary, kind, needs_model)
        return fn
    return wrap


def get_scorer(name: str) -> Scorer:
    _load_builtin()
    if name not in _SCORERS:
        raise PlanError(f"method {name!r}: unknown; choose one of {', '.join(available_scorers())}")
    return _SCORERS[name]


def available_scorers() -> list[str]:
    _load_builtin()
    return list(_SCORERS)


def _load_builtin() -> None:
    from salaconvert.layer_selection.scorers import attention, baselines, halo, swap  # noqa: F401
