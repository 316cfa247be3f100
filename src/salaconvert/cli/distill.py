"""`salaconvert distill DIR --teacher MODEL --data PATH... [--recipe R] --out OUT`"""
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salaconvert.cli.common import MODEL_HELP, err, human_bytes, human_count, out, quiet_transformers, user_errors


class StageChoice(str, Enum):
    one = "1"
    two = "2"
    three = "3"
    all = "all"


def distill(
    checkpoint: Annotated[Path, typer.Argument(help="A hybrid checkpoint written by `salaconvert convert`.", show_default=False)],
    teacher: Annotated[str | None, typer.Option(help=f"The model it was converted from: {MODEL_HELP}.", show_default=False)] = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="Training text, repeatable: .txt / .jsonl (field 'text') / .parquet, optionally .gz/.xz; "
             "an HF dataset saved to disk; or a folder of such files.", show_default=False)] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Directory to write the distilled checkpoint to.")] = None,
    recipe: Annotated[str | None, typer.Option(help="A recipe YAML file or a name in recipes/ (e.g. halo, halo-stage1, debug/demo-cpu). Default: halo.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe field, repeatable: --set stage2.lr=3e-5.")] = None,
    stage: Annotated[StageChoice, typer.Option(help="Run one stage, or all the stages the recipe enables.")] = StageChoice.all,
    resume: Annotated[bool, typer.Option(help="Continue the run saved in OUT.run/ where it stopped.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out (and an unfinished run in OUT.run/) if they exist.")] = False,
    estimate: Annotated[bool, typer.Option(help="Only print the GPU memory each stage needs, then exit.")] = False,
    stop_after: Annotated[int | None, typer.Option(min=1, help="Checkpoint and stop after this many steps (resume later with --resume).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
):
    """HALO distillation of a converted hybrid from its teacher; resumable.

    Stage 1 trains only the new attention modules to reproduce the teacher's attention outputs;
    stage 2 minimises the forward KL between teacher and student logits at every position; stage
    3 (off by default) fine-tunes on long sequences. Runs under `accelerate launch` unchanged.
    """
    quiet_transformers()
    from salaconvert.distill.recipe import load_recipe

    with user_errors():
        r = load_recipe(recipe, set_ or [])
        if estimate:
            _print_estimate(checkpoint, r, stage.value, as_json)
            return
        missing = [name for name, v in (("--teacher", teacher), ("--data", data), ("--out", out_dir)) if not v]
        if missing:
            from salaconvert.errors import InputError

            raise InputError(f"missing {', '.join(missing)} (needed unless --estimate)")
        from salaconvert.distill.run import distill as run

        step = lambda what: err.print(f"[dim]distill: {what}…[/]")  # noqa: E731 (training has its own bars)
        report = run(checkpoint, teacher, [str(d) for d in data], out_dir, recipe=r, stages=stage.value, resume=resume,
                     overwrite=overwrite, stop_after=stop_after, progress=_progress(), step=step)
    if not report.get("main_process", True):
        return  # under `accelerate launch`, the main process reports
    print_report(report)
    if as_json:
        out.print_json(json.dumps(report, default=str))


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[tps]} tok/s"), TextColumn("loss {task.fields[loss]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err)


def print_report(report: dict) -> None:
    table = Table(title=f"Distillation of {report['checkpoint']}")
    peaks = report.get("peak_memory_bytes_per_stage") or {}
    cols = ("stage", "steps", "tokens", "loss first", "loss last (mean of 10)", "time", "tokens/s")
    for col in cols + (("peak GPU memory",) if peaks else ()):
        table.add_column(col, justify="right")
    names = {"1": "1 attention MSE", "2": "2 logits KL", "3": "3 long-context CE"}
    for key, loss in report["losses"].items():
        secs = report["train_seconds"].get(key, 0.0)
        tokens = report["tokens"].get(key, 0)
        peak = (human_bytes(peaks[key]) if key in peaks else "–",) if peaks else ()
        table.add_row(names[key], str(loss["steps"]), human_count(tokens), f"{loss['first']:.4g}",
                      f"{loss['last']:.4g} ({loss['mean_last']:.4g})", f"{secs:.1f}s", f"{tokens / max(secs, 1e-9):,.0f}",
                      *peak)
    err.print(table)
    ppl = report.get("perplexity") or {}
    if ppl:
        p = Table(title=f"Held-out perplexity ({report['documents']['heldout']} documents, "
                        f"{human_count(report['documents']['heldout_tokens'])} tokens)")
        for col in ("teacher", "hybrid before", "hybrid after"):
            p.add_column(col, justify="right")
        p.add_row(*(f"{ppl[k]:.2f}" if k in ppl else "–" for k in ("teacher", "student_before", "student_after")))
        err.print(p)
    if report.get("stopped"):
        err.print(f"[yellow]stopped after the requested steps; continue with --resume (state in {report['run_dir']})[/]")
    else:
        extra = f", peak GPU memory {human_bytes(report['peak_memory_bytes'])}" if "peak_memory_bytes" in report else ""
        err.print(f"wrote [bold]{report['out']}[/] in {report['seconds']:.1f}s{extra}; "
                  f"{human_bytes(report['shared_frozen_bytes'])} of frozen weights shared with the teacher")


def _print_estimate(checkpoint: Path, recipe, stage: str, as_json: bool) -> None:
    from salaconvert.distill.estimate import estimate_memory
    from salaconvert.errors import InputError
    from salaconvert.io.load import load_config, resolve_source
    from salaconvert.models import SalaHybridConfig

    if not (checkpoint / "config.json").is_file():
        raise InputError(f"{checkpoint}: no config.json (expected a hybrid checkpoint)")
    config = load_config(resolve_source(str(checkpoint)))
    if not isinstance(config, SalaHybridConfig):
        raise InputError(f"{checkpoint}: model_type is {config.model_type!r}, not a salaconvert hybrid")
    stages = [n for n in (1, 2, 3) if recipe.stage(n).enabled] if stage == "all" else [int(stage)]
    ckpt = recipe.runtime.gradient_checkpointing != "off"
    result = estimate_memory(config, recipe, stages, bf16=recipe.runtime.precision != "fp32", gradient_checkpointing=ckpt)
    print_estimate(result, str(checkpoint))
    if as_json:
        out.print_json(json.dumps(result, default=str))


def print_estimate(result: dict, what: str) -> None:
    stages = result["stages"]
    table = Table(title=f"GPU memory per process for {what} "
                        f"({human_count(result['params']['student'])} parameters)")
    table.add_column("")
    for n, s in stages.items():
        table.add_column(f"stage {n} (micro-batch {s['micro_batch']}×{s['seq_len']})", justify="right")
    rows = list(dict.fromkeys(k for s in stages.values() for k in s["parts"]))
    for row in rows:
        table.add_row(row, *(human_bytes(s["parts"][row]) if row in s["parts"] else "–" for s in stages.values()))
    table.add_row("[bold]total", *(f"[bold]{human_bytes(s['total'])}" for s in stages.values()))
    table.add_row("fits in 80 GB", *("[green]yes" if s["fits"] else "[red]no" for s in stages.values()))
    err.print(table)
