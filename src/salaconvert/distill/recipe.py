"""Distillation recipes: YAML files validated by dataclasses, overridable with `--set key=value`.

The dataclass defaults *are* the published HALO settings (recipes/halo.yaml spells them out and a
test checks the two agree), so a wheel without the recipes/ folder still has them. A recipe is a
path to a YAML file or the name of one in the source tree's recipes/ ("halo", "debug/tiny").
"""
import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from salaconvert.errors import InputError

RECIPES_DIR = Path(str(importlib.resources.files("salaconvert.recipes")))  # recipes/ of the repository, shipped in the wheel
TRAINABLE = ("converted", "attention", "all")


@dataclass
class Stage:
    """One training stage. The budget is `tokens` (rounded up to whole steps) unless `steps` is set."""
    enabled: bool = True
    tokens: int = 0
    steps: int | None = None
    seq_len: int = 512
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward; gradient accumulation fills the rest
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    # converted: only the replaced attention modules; attention: every layer's attention; all: everything
    trainable: str = "converted"
    kl_chunk: int = 512  # stage 2: positions per chunk of the KL (bounded logits memory)
    max_seconds: float | None = None  # end the stage early after this much training time (schedule unchanged)
    temperature: float = 1.0  # stage 2

    def num_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return -(-self.tokens // (self.batch_size * self.seq_len))


def _stage1() -> Stage:
    # HALO stage 1: attention-output alignment, sequences of 512, AdamW lr 1e-3 cosine, ~320M tokens.
    # Micro-batches of 4 (stage 2: 8; gradient accumulation to 64) are a memory choice, not HALO's: they keep an
    # 8B model's stage within 80 GB (see --estimate).
    return Stage(tokens=320_000_000, seq_len=512, batch_size=64, micro_batch_size=4, lr=1e-3)


def _stage2() -> Stage:
    # HALO stage 2: end-to-end forward KL, lr 1e-4. HALO's 2.3B tokens minus stage 1, split evenly
    # between stages 2 and 3 (our reading; the paper gives the total). Only the converted layers
    # train by default, which keeps an 8B model on one 80 GB card (see --estimate).
    return Stage(tokens=1_000_000_000, seq_len=512, batch_size=64, micro_batch_size=8, lr=1e-4, min_lr_ratio=0.1, warmup_steps=100)


def _stage3() -> Stage:
    # Optional long-context cross-entropy fine-tune (SPEC §5.3), 16K tokens a sequence.
    return Stage(enabled=False, tokens=1_000_000_000, seq_len=16384, batch_size=8, micro_batch_size=1, lr=2e-5,
                 trainable="all")


@dataclass
class Data:
    text_field: str = "text"  # the field of .jsonl records and the column of parquet / HF datasets
    heldout_fraction: float = 0.02  # of documents, chosen by a hash of each document's text
    eval_seq_len: int = 512
    eval_tokens: int = 262_144  # held-out tokens scored for perplexity (at most)
    shuffle: bool = True


@dataclass
class Runtime:
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: str = "auto"  # auto (on for GPU) | on | off
    # torch.compile of every decoder layer in stages 2 and 3 (teacher's too): fuses the norms, gates
    # and MLP elementwise chains that otherwise dominate a small model's step; costs ~20 s at start.
    compile: str = "auto"  # auto (on for GPU) | on | off
    checkpoint_every: int = 500  # steps between resumable checkpoints (0: only at the end of a stage)
    log_every: int = 10  # steps between metrics lines
    eval: bool = True  # held-out perplexity of teacher and student before and after
    # CPU only: torch's intra-op threads for the run (None: torch's default). 1 is much faster on
    # cores shared with other jobs: no thread waits at every op for a descheduled sibling.
    cpu_threads: int | None = None


@dataclass
class Recipe:
    name: str = "halo"
    seed: int = 0
    stage1: Stage = field(default_factory=_stage1)
    stage2: Stage = field(default_factory=_stage2)
    stage3: Stage = field(default_factory=_stage3)
    data: Data = field(default_factory=Data)
    runtime: Runtime = field(default_factory=Runtime)

    def stage(self, n: int) -> Stage:
        return getattr(self, f"stage{n}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Recipe":
        for n in (1, 2, 3):
            s, where = self.stage(n), f"stage{n}"
            _check(s.trainable in TRAINABLE, f"{where}.trainable={s.trainable!r}: expected one of {list(TRAINABLE)}")
            _check(s.schedule in ("cosine", "constant"), f"{where}.schedule={s.schedule!r}: expected cosine or constant")
            _check(s.seq_len >= 2 and s.batch_size >= 1, f"{where}: seq_len must be ≥ 2 and batch_size ≥ 1")
            _check(s.tokens >= 0 and (s.steps is None or s.steps >= 0), f"{where}: tokens and steps must be ≥ 0")
            mb = s.micro_batch_size
            _check(mb is None or (mb >= 1 and s.batch_size % mb == 0),
                   f"{where}.micro_batch_size={mb}: must divide batch_size={s.batch_size}")
            _check(s.lr > 0 and 0 <= s.min_lr_ratio <= 1, f"{where}: lr must be > 0 and min_lr_ratio in [0, 1]")
            _check(s.kl_chunk >= 1 and s.temperature > 0, f"{where}: kl_chunk must be ≥ 1 and temperature > 0")
        _check(0 <= self.data.heldout_fraction < 1, "data.heldout_fraction: must be in [0, 1)")
        _check(self.runtime.cpu_threads is None or self.runtime.cpu_threads >= 1, "runtime.cpu_threads: must be ≥ 1")
        _check(self.runtime.precision in ("auto", "bf16", "fp32"), "runtime.precision: expected auto, bf16 or fp32")
        _check(self.runtime.gradient_checkpointing in ("auto", "on", "off"),
               "runtime.gradient_checkpointing: expected auto, on or off")
        _check(self.runtime.compile in ("auto", "on", "off"), "runtime.compile: expected auto, on or off")
        return self


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(f"recipe: {message}")


def from_dict(cls, data: dict, where: str = "recipe", base=None):
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type.

    Fields that `data` leaves out keep `base`'s values (default: `cls()`); nested sections start
    from the parent's own default, so a recipe file only overrides the HALO settings it names.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    base = cls() if base is None else base
    values = {}
    for name, f in known.items():
        if name not in data:
            continue
        hint = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, data[name], f"{where}.{name}", base=getattr(base, name))
        else:
            values[name] = _coerce(data[name], hint, f"{where}.{name}")
    return dataclasses.replace(base, **values)


def _coerce(value, hint, where: str):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, str):
            return value
        if t is str and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
            return "on" if value else "off"
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise InputError(f"{where}: expected {names}, got {value!r}")


def find_recipe(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{spec}.yaml"
    if path.suffix not in (".yaml", ".yml") and named.is_file():
        return named
    raise InputError(f"recipe {spec!r}: no such file (names are looked up in {RECIPES_DIR})")


def load_recipe(spec: str | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """The recipe at `spec` (path or name; None: the built-in HALO defaults) with `key=value` overrides."""
    data = {}
    if spec is not None:
        path = find_recipe(spec)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        data.setdefault("name", path.stem if path.parent == RECIPES_DIR else str(path))
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--set {item!r}: expected key=value, e.g. stage2.lr=3e-5")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return from_dict(Recipe, data).validate()
