"""`LayerPlan`: which attention each layer gets, why, and from what; plus the ratio rules of SPEC §2.

A ratio `S:L` means round(N·S/(S+L)) sparse layers out of N. With SALA's rule (on by default) the
first and last layers are always sparse and count toward that number, so at least two are.
"""
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from salaconvert.errors import InputError

LINEAR, SPARSE, FULL = "linear_attention", "sparse_attention", "full_attention"
LAYER_TYPES = (LINEAR, SPARSE, FULL)


class PlanError(InputError):
    """A plan that cannot be used; the message names the field."""


def parse_ratio(text: str) -> tuple[int, int]:
    """'1:3' → (1, 3): S sparse layers for every L linear ones, both positive integers."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise PlanError(f"ratio {text!r}: expected S:L with two positive integers, e.g. 1:3")
    s, l = (int(p) for p in parts)
    if s < 1 or l < 1:
        raise PlanError(f"ratio {text!r}: both parts must be at least 1 (S sparse : L linear)")
    return s, l


def num_sparse(num_layers: int, ratio: str, first_last: bool = True) -> int:
    s, l = parse_ratio(ratio)
    n = math.floor(num_layers * s / (s + l) + 0.5)  # round half up, not to even
    n = max(n, 2 if first_last else 1)
    return min(n, num_layers)


def uniform_layer_types(num_layers: int, ratio: str = "1:3", first_last: bool = True) -> list[str]:
    """Sparse layers spread evenly; with `first_last`, the spread runs from the first layer to the last."""
    n = num_sparse(num_layers, ratio, first_last)
    if first_last and n >= 2:
        picks = {round(i * (num_layers - 1) / (n - 1)) for i in range(n)}
    else:
        picks = {math.floor((i + 0.5) * num_layers / n) for i in range(n)}
    return [SPARSE if i in picks else LINEAR for i in range(num_layers)]


def select_layer_types(scores: list[float], ratio: str = "1:3", first_last: bool = True) -> list[str]:
    """The highest-scoring layers stay sparse, the rest become linear.

    With `first_last` the first and last layers are sparse whatever their scores and count toward
    the ratio; the remaining sparse slots go to the best-scoring middle layers. Ties go to the lower
    index, so the choice is deterministic.
    """
    n_layers = len(scores)
    n = num_sparse(n_layers, ratio, first_last)
    forced = {0, n_layers - 1} if first_last else set()
    rest = sorted((i for i in range(n_layers) if i not in forced), key=lambda i: (-scores[i], i))
    picks = forced | set(rest[: max(0, n - len(forced))])
    return [SPARSE if i in picks else LINEAR for i in range(n_layers)]


def score_ranks(scores: list[float]) -> list[int]:
    """Rank of each layer by score, 1 = highest (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = [0] * len(scores)
    for rank, i in enumerate(order, 1):
        ranks[i] = rank
    return ranks


_OPTIONAL_STR = ("method", "model_fingerprint", "data_fingerprint")


@dataclass
class LayerPlan:
    layer_types: list[str]
    scores: list[float] | None = None  # per layer; higher means "keep softmax"
    method: str = "uniform"
    seed: int | None = None
    ratio: str | None = None
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)  # scorer-specific details (probe values, timings)

    def validate(self, num_layers: int | None = None) -> "LayerPlan":
        if not isinstance(self.layer_types, list) or not self.layer_types:
            raise PlanError("layer_types: must be a non-empty list")
        bad = sorted({repr(t) if not isinstance(t, str) else t for t in self.layer_types
                      if not isinstance(t, str) or t not in LAYER_TYPES})
        if bad:
            raise PlanError(f"layer_types: unknown type(s) {bad}; expected one of {list(LAYER_TYPES)}")
        if num_layers is not None and len(self.layer_types) != num_layers:
            raise PlanError(f"layer_types: {len(self.layer_types)} entries, but the model has {num_layers} layers")
        if all(t == LINEAR for t in self.layer_types):
            raise PlanError("layer_types: every layer is linear; keep at least one softmax (sparse or full) layer")
        if self.scores is not None:
            if len(self.scores) != len(self.layer_types):
                raise PlanError(f"scores: {len(self.scores)} entries for {len(self.layer_types)} layers")
            if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in self.scores):
                raise PlanError("scores: every score must be a finite number")
        if self.ratio is not None:
            parse_ratio(self.ratio)
        for name in _OPTIONAL_STR:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PlanError(f"{name}: expected a string, got {type(value).__name__}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise PlanError(f"seed: expected an integer or null, got {self.seed!r}")
        if not isinstance(self.extra, dict):
            raise PlanError(f"extra: expected an object, got {type(self.extra).__name__}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LayerPlan":
        if not isinstance(data, dict):
            raise PlanError("plan: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"plan: unknown field(s) {unknown}")
        if "layer_types" not in data:
            raise PlanError("layer_types: missing")
        return cls(**data).validate()

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON; a temporary file renamed into place, so never half-written."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "LayerPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan {path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"plan {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)
