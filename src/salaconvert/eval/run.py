"""`salaconvert eval` as a library function: one quality report, teacher beside hybrid.

Everything that can be checked (tasks, lengths, depths, data, both models' paths, the output
directory, prompt lengths against the tokenizer) is checked before any weights load. The prompts
are built once from the checkpoint's tokenizer and given to both models, one model in memory at a time.
"""
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from salaconvert.errors import InputError
from salaconvert.eval.data import DEFAULT_HELDOUT_FRACTION, heldout_fraction_of, read_source, token_stream
from salaconvert.eval.forward import DEFAULT_CHUNK, greedy
from salaconvert.eval.lmeval import DEFAULT_TASKS as LM_TASKS
from salaconvert.eval.lmeval import run_lmeval
from salaconvert.eval.ppl import perplexity
from salaconvert.eval.retrieval import TASKS as RETRIEVAL_TASKS
from salaconvert.eval.retrieval import break_token_ids, build_case, passed

TASKS = ("ppl", *RETRIEVAL_TASKS, "lmeval")
DEFAULT_TASKS = ("ppl", *RETRIEVAL_TASKS, "lmeval")


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 1
    ppl_tokens: int = 8192  # held-out tokens scored at each length
    chunk: int = DEFAULT_CHUNK  # prefill chunk length
    lm_tasks: list[str] = field(default_factory=lambda: list(LM_TASKS))
    lm_limit: int | None = 200  # examples per lm-eval task
    time_budget_s: float | None = None  # per model: lengths not started by then are skipped
    heldout_fraction: float | None = None  # None: the checkpoint's distill recipe's, else 0.02 (see data.py)
    seed: int = 0

    def validate(self) -> "EvalSettings":
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InputError(f"--tasks: unknown task(s) {','.join(bad) or '(none given)'}; choose from {','.join(TASKS)}")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise InputError(f"--lengths: every length must be at least 2 tokens, got {self.lengths}")
        if not self.depths or any(not (0.0 <= d <= 1.0) or math.isnan(d) for d in self.depths):
            raise InputError(f"--depths: every depth must be between 0 and 1, got {self.depths}")
        if self.trials < 1 or self.ppl_tokens < 2 or self.chunk < 1:
            raise InputError("--trials, --ppl-tokens and --chunk must be positive")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InputError(f"--time-budget {self.time_budget_s}: must be positive")
        if self.heldout_fraction is not None and not 0 <= self.heldout_fraction < 1:
            raise InputError(f"--heldout-fraction {self.heldout_fraction}: must be in [0, 1)")
        self.lengths = sorted(set(self.lengths))
        self.depths = sorted(set(self.depths))
        return self


def check_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if not out.exists() and not out.parent.is_dir():
        raise InputError(f"--out {out}: its parent directory does not exist")
    return out


def default_device(device: str | None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(dtype: str, device: str) -> str:
    return ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype


def prepare(tokenizer, settings: EvalSettings, data: list[str]) -> dict:
    """The held-out stream for perplexity and every retrieval case, in token ids."""
    fraction = DEFAULT_HELDOUT_FRACTION if settings.heldout_fraction is None else settings.heldout_fraction
    sources = [read_source(d, fraction) for d in data]
    need = max(settings.lengths) * 2 + 1024
    if "ppl" in settings.tasks:
        need = max(need, settings.ppl_tokens + max(settings.lengths))
    stream, repeated = token_stream(sources, tokenizer, need)
    cases = []
    retrieval = [t for t in settings.tasks if t in RETRIEVAL_TASKS]
    if retrieval:
        breaks = break_token_ids(tokenizer, stream)
        for task in retrieval:
            for length in settings.lengths:
                for depth in settings.depths:
                    for trial in range(settings.trials):
                        cases.append(build_case(task, length, depth, trial, stream, tokenizer, breaks, settings.seed))
    return {"stream": stream, "cases": cases,
            "data": [{"name": s.name, "documents": len(s.documents), "held_out": s.held_out} for s in sources],
            "text_repeated": repeated}


def evaluate_model(model, tokenizer, prepared: dict, settings: EvalSettings, step=lambda what: None,
                   deadline: float | None = None) -> dict:
    """Every task of `settings` on one loaded model, shortest length first across all tasks, so that
    a `deadline` (time.monotonic()) cuts off the longest lengths, never a whole task.

    A case that fails (out of memory, a kernel error) is recorded with its error and the run goes
    on: one bad length must not cost the results of the others. Skipped and failed cases count as
    neither passed nor failed.
    """
    result, t0 = {}, time.perf_counter()
    retrieval = [t for t in settings.tasks if t in RETRIEVAL_TASKS]
    rows = {task: [] for task in retrieval}
    ppl, notes = {}, []
    for length in settings.lengths:
        late = deadline is not None and time.monotonic() > deadline
        if "ppl" in settings.tasks:
            step(f"perplexity at {length}")
            ppl[str(length)] = _guarded(lambda: perplexity(model, prepared["stream"], length, settings.ppl_tokens,
                                                           settings.chunk), late, notes, f"ppl {length}")
        for case in (c for c in prepared["cases"] if c.length == length):
            step(f"{case.task} {length} tokens, depth {case.depth:g}")
            row = {"length": length, "depth": case.depth, "trial": case.trial, "value": case.value,
                   "needle_at": case.needle_at}
            new = _guarded(lambda: greedy(model, case.ids, case.max_new_tokens, settings.chunk), late, notes,
                           f"{case.task} {length} depth {case.depth:g}")
            if isinstance(new, list):
                answer = tokenizer.decode(new, skip_special_tokens=True)
                row.update(answer=answer, passed=passed(answer, case.value))
            else:
                row.update(new)
            rows[case.task].append(row)
    if "ppl" in settings.tasks:
        result["ppl"] = {n: r for n, r in ppl.items() if "ppl" in r}
    for task in retrieval:
        result[task] = grid(rows[task], settings)
    if "lmeval" in settings.tasks:
        step("lm-eval")
        result["lmeval"] = run_lmeval(model, tokenizer, settings.lm_tasks, settings.lm_limit)
    if notes:
        result["incomplete"] = notes
    result["seconds"] = time.perf_counter() - t0
    return result


def _guarded(work, late: bool, notes: list[str], what: str):
    """work(), or {"skipped": why} / {"error": what went wrong} (also appended to `notes`)."""
    if late:
        notes.append(f"{what}: skipped (time budget)")
        return {"skipped": "time budget"}
    try:
        return work()
    except Exception as e:  # noqa: BLE001  (recorded in the report; see evaluate_model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        notes.append(f"{what}: {message}")
        return {"error": message}


def grid(rows: list[dict], settings: EvalSettings) -> dict:
    """Accuracy per (depth, length) cell: accuracy[i][j] is depth i at length j."""
    acc = [[None] * len(settings.lengths) for _ in settings.depths]
    done = [r for r in rows if "passed" in r]
    for i, d in enumerate(settings.depths):
        for j, n in enumerate(settings.lengths):
            cell = [r["passed"] for r in done if r["depth"] == d and r["length"] == n]
            acc[i][j] = sum(cell) / len(cell) if cell else None
    return {"lengths": settings.lengths, "depths": settings.depths, "accuracy": acc,
            "mean": sum(r["passed"] for r in done) / len(done) if done else None, "cases": rows}


def default_teacher(model_dir: str) -> str | None:
    """The teacher named in a checkpoint's salaconvert.json, if it has one."""
    from salaconvert.io.checkpoint import read_sidecar

    path = Path(model_dir)
    return read_sidecar(path).get("source", {}).get("model") if path.is_dir() else None


def run_eval(model: str, teacher: str | None = None, data: list[str] | None = None,
             settings: EvalSettings | None = None, out: str | Path = ".", dtype: str = "auto",
             device: str | None = None, step=lambda what: None) -> dict:
    """Evaluate `model` (and `teacher`, if given) and write eval.json and the PNGs to `out`."""
    from salaconvert.eval.report import write_report
    from salaconvert.io.load import load_config, load_model, load_tokenizer, resolve_source

    t0 = time.perf_counter()
    settings = (settings or EvalSettings()).validate()
    data = list(data or ["pydoc"])
    if settings.heldout_fraction is None:
        recipe_fraction = heldout_fraction_of(model)
        settings.heldout_fraction = DEFAULT_HELDOUT_FRACTION if recipe_fraction is None else recipe_fraction
    out = check_out_dir(out)
    device = default_device(device)
    dtype = default_dtype(dtype, device)
    step("checking input")
    runs = [("teacher", resolve_source(teacher))] if teacher else []
    runs.append(("hybrid", resolve_source(model)))
    if teacher:
        vocab = {spec: load_config(source).vocab_size for spec, source in ((teacher, runs[0][1]), (model, runs[1][1]))}
        if len(set(vocab.values())) > 1:
            raise InputError(f"the teacher and the model have different vocabularies ({vocab}); they cannot share prompts")
    tokenizer = load_tokenizer(runs[-1][1], required=False) or load_tokenizer(runs[0][1])
    step("building prompts")
    prepared = prepare(tokenizer, settings, data)
    results = {}
    for label, source in runs:
        step(f"loading {label}")
        m = load_model(source, dtype, device)
        deadline = time.monotonic() + settings.time_budget_s if settings.time_budget_s else None
        results[label] = evaluate_model(m, tokenizer, prepared, settings, lambda what, lb=label: step(f"{lb}: {what}"),
                                        deadline)
        del m
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report = {
        "model": model, "teacher": teacher, "device": _device_name(device), "dtype": dtype,
        "data": prepared["data"], "text_repeated": prepared["text_repeated"], "settings": asdict(settings), "results": results,
        "versions": _versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.perf_counter() - t0,
    }
    step("writing report")
    report["files"] = write_report(report, out)
    return report


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def _versions() -> dict:
    import transformers

    from salaconvert import __version__

    return {"salaconvert": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
