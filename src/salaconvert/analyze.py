"""`salaconvert analyze` as a library function: MODEL + calibration text → per-layer scores → LayerPlan.

Everything that can be checked (ratio, method, data files, output paths, matplotlib for --plot)
is checked before the model is loaded. The plan and the plot are written to temporary files and
renamed into place, so a failed run leaves neither half-written.
"""
import os
import tempfile
import time
from pathlib import Path

import torch

from salaconvert.errors import InputError
from salaconvert.layer_selection.plan import SPARSE, LayerPlan, num_sparse, parse_ratio, score_ranks, select_layer_types
from salaconvert.layer_selection.scorers import ScoreContext, get_scorer

# Calibration sequences per method at the default length: sized so every proxy finishes on two
# busy CPU cores within a few minutes for a 135M model (halo is meant for the GPU).
DEFAULT_SEQS = {"entropy": 4, "long_range": 4, "retrieval": 1, "kl": 1, "halo": 8}


def check_output_path(path, what: str, suffix: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise InputError(f"{what} {path}: expected a {suffix} file name")
    if not path.parent.is_dir():
        raise InputError(f"{what} {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path}: is a directory")
    return path


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def analyze_model(model: str, method: str = "entropy", data: list[str] | None = None, ratio: str = "1:3", seed: int = 0,
                  first_last: bool = True, seq_len: int = 512, num_seqs: int | None = None, dtype: str = "auto",
                  device: str | None = None, options: dict | None = None, out: str | Path | None = None,
                  plot: str | Path | None = None, step=lambda what: None, progress=lambda what, done, total: None) -> dict:
    """Score every layer of MODEL with `method` and choose the sparse layers. Returns the report:
    `plan` (LayerPlan), `rows` (one dict per layer), `summary` (one line), `seconds`, paths written."""
    from salaconvert.io.load import load_config, load_model, load_tokenizer, resolve_source
    from salaconvert.layer_selection.probes import build_calibration, read_documents, support_len

    t0 = time.perf_counter()
    step("checking input")
    parse_ratio(ratio)
    scorer = get_scorer(method)
    out, plot = check_output_path(out, "--out", ".json"), check_output_path(plot, "--plot", ".png")
    if plot is not None:
        require_matplotlib()
    if num_seqs is not None and num_seqs < 1:
        raise InputError(f"--num-seqs {num_seqs}: must be at least 1")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    source = resolve_source(model)
    config = load_config(source)
    if config.model_type == "sala_hybrid":
        raise InputError(f"{model}: already a salaconvert hybrid; analyze its teacher")
    num_layers = config.num_hidden_layers
    if num_layers < 2:
        raise InputError(f"{model}: {num_layers} layer(s); layer selection needs at least 2")
    docs = data_source = teacher = tokenizer = calibration = None
    if scorer.needs_model:
        docs, data_source = read_documents(data)
        seq_len = support_len(config, seq_len)
        step("loading model")
        from salaconvert.convert import check_teacher

        check_teacher(source)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        teacher = load_model(source, dtype, device=device)
        tokenizer = load_tokenizer(source)
        step("tokenising calibration text")
        n = num_seqs if num_seqs is not None else DEFAULT_SEQS.get(method, 4)
        # Spare tokens beyond the packed sequences are the recall probes' haystacks.
        calibration = build_calibration(tokenizer, docs, data_source, seq_len, n, seed, spare_tokens=2 * seq_len)
    t_load = time.perf_counter()

    step(f"scoring layers ({method})")
    options = {"batch_size": 8 if device and device.startswith("cuda") else 2, **(options or {})}
    ctx = ScoreContext(teacher, tokenizer, calibration, num_layers, seq_len, seed, ratio, first_last, options, progress)
    try:
        result = scorer.fn(ctx)
    except FloatingPointError as e:
        raise InputError(str(e)) from None
    scores = [float(s) for s in result.scores]
    types = select_layer_types(scores, ratio, first_last)
    t_score = time.perf_counter()

    plan = LayerPlan(
        layer_types=types, scores=scores, method=method, seed=seed, ratio=ratio,
        model_fingerprint=_fingerprint(teacher), data_fingerprint=calibration.fingerprint if calibration else None,
        extra={"model": model, "data": data_source, "seq_len": seq_len if teacher is not None else None,
               "num_seqs": int(calibration.ids_NT.shape[0]) if calibration else None, "first_last": first_last,
               "columns": result.columns, "details": result.details, "options": _jsonable(options or {}),
               "seconds": {"load": t_load - t0, "score": t_score - t_load}},
    ).validate(num_layers)
    ranks = score_ranks(scores)
    rows = [{"layer": i, "score": scores[i], "rank": ranks[i], "type": types[i],
             **{name: col[i] for name, col in result.columns.items()}} for i in range(num_layers)]
    kept = [i for i, t in enumerate(types) if t == SPARSE]
    summary = (f"{method}: keep {len(kept)} of {num_layers} layers sparse {kept} "
               f"(ratio {ratio}{', first/last forced' if first_last else ''}), {num_layers - len(kept)} linear")
    if plot is not None:
        step("plotting")
        write_plot(plan, plot, title=f"{model}: {method} layer scores")
    if out is not None:
        plan.save(out)
    return {"plan": plan, "rows": rows, "summary": summary, "num_sparse": num_sparse(num_layers, ratio, first_last),
            "seconds": time.perf_counter() - t0, "out": str(out) if out else None, "plot": str(plot) if plot else None}


def _fingerprint(teacher) -> str | None:
    if teacher is None:
        return None
    from salaconvert.convert import fingerprint

    return fingerprint(teacher)


def _jsonable(d: dict) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v) for k, v in d.items()}


def write_plot(plan: LayerPlan, path: str | Path, title: str = "layer scores") -> None:
    """Bar chart of the scores, sparse layers highlighted (first/last forced ones hatched)."""
    plt = require_matplotlib()
    path = Path(path)
    n = len(plan.layer_types)
    scores = plan.scores or [0.0] * n
    sparse = [t == SPARSE for t in plan.layer_types]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 3.6))
    colors = ["tab:orange" if s else "tab:blue" for s in sparse]
    ax.bar(range(n), scores, color=colors)
    if plan.extra.get("first_last"):
        for i in (0, n - 1):
            ax.bar(i, scores[i], color="none", edgecolor="black", hatch="//", linewidth=0)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"score ({plan.method})")
    ax.set_xticks(range(n))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:orange", label="sparse (softmax kept)"), Patch(color="tab:blue", label="linear")]
    if plan.extra.get("first_last"):
        handles.append(Patch(facecolor="tab:orange", edgecolor="black", hatch="//", label="first/last (always sparse)"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
