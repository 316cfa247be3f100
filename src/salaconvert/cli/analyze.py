"""`salaconvert analyze MODEL [--method kl] [--ratio 1:3] [--out plan.json] [--plot plan.png]`"""
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salaconvert.cli.common import MODEL_HELP, err, out, quiet_transformers, user_errors

METHODS = "halo, kl, entropy, long_range, retrieval, uniform, random"


def analyze(
    model: Annotated[str, typer.Argument(help=f"The teacher: {MODEL_HELP}.", show_default=False)],
    method: Annotated[str, typer.Option(help=f"Scorer: {METHODS}. entropy, long_range and retrieval take a few "
                                             "minutes on a CPU, kl several; halo aligns every layer and wants a GPU.")] = "entropy",
    data: Annotated[list[Path] | None, typer.Option(help="Calibration text: .txt or .jsonl (field 'text'), optionally "
                                                         ".gz/.xz; repeatable. Default: Python's pydoc_data.topics prose.")] = None,
    ratio: Annotated[str, typer.Option(help="S:L, sparse to linear layers.")] = "1:3",
    first_last: Annotated[bool, typer.Option(help="SALA's rule: the first and last layers are always sparse.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for data order, probes and the random baseline.")] = 0,
    seq_len: Annotated[int, typer.Option(help="Probe length in tokens (capped at what the model supports).")] = 512,
    num_seqs: Annotated[int | None, typer.Option(help="Calibration sequences (default: per method).")] = None,
    halo_steps: Annotated[int, typer.Option(help="halo: stage-1 alignment steps per layer.")] = 100,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write the layer plan (JSON) here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the scores, chosen layers marked (needs matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")] = False,
):
    """Score every attention layer of MODEL and choose which keep softmax (sparse) attention.

    Higher score = keep softmax. The first and last layers are kept by SALA's rule; the best-scoring
    others fill the ratio. The plan feeds `salaconvert convert MODEL --plan plan.json`.
    """
    quiet_transformers()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from salaconvert.analyze import analyze_model

    with user_errors(), Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"analyze ({method})", total=None)

        def step(what):
            bar.update(task, description=f"analyze: {what}", total=None, completed=0)

        def progress(what, done, total):
            bar.update(task, description=f"analyze ({method}): {what}", total=total, completed=done)

        report = analyze_model(model, method=method, data=[str(p) for p in data] if data else None, ratio=ratio,
                               seed=seed, first_last=first_last, seq_len=seq_len, num_seqs=num_seqs, device=device,
                               options={"halo_steps": halo_steps}, out=out_path, plot=plot, step=step, progress=progress)
    print_table(report, model)
    if as_json:
        out.print_json(json.dumps(report["plan"].to_dict()))


def print_table(report: dict, model: str) -> None:
    plan = report["plan"]
    rows = report["rows"]
    extra_cols = [k for k in rows[0] if k not in ("layer", "score", "rank", "type")]
    table = Table(title=f"Layer scores of {model} ({plan.method}, higher = keep softmax)")
    for name in ("layer", "score", "rank", *extra_cols, "type"):
        table.add_column(name, justify="left" if name == "type" else "right")
    forced = {0, len(rows) - 1} if plan.extra.get("first_last") else set()
    for r in rows:
        kind = "[bold cyan]sparse[/]" if r["type"] == "sparse_attention" else "linear"
        if r["layer"] in forced:
            kind += " [dim](first/last)[/]"
        table.add_row(str(r["layer"]), _num(r["score"]), str(r["rank"]), *(_num(r[c]) for c in extra_cols), kind)
    err.print(table)
    written = [p for p in (report["out"], report["plot"]) if p]
    err.print(f"{report['summary']}; {report['seconds']:.1f}s" + (f"; wrote {', '.join(written)}" if written else ""),
              highlight=False, soft_wrap=True)


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)
