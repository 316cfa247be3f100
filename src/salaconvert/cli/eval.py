"""`salaconvert eval DIR [--teacher MODEL]`"""
import json
from pathlib import Path
from typing import Annotated

import typer

from salaconvert.cli.common import MODEL_HELP, DType, err, out, steps, user_errors
from salaconvert.errors import InputError

TASK_NAMES = ("ppl", "passkey", "niah", "niah_single", "niah_multi", "lmeval")


def eval_cmd(
    model: Annotated[str, typer.Argument(help=f"A hybrid checkpoint directory (or any MODEL: {MODEL_HELP}).", show_default=False)],
    teacher: Annotated[str | None, typer.Option(help="Evaluate this teacher beside it (default: the teacher named in DIR's salaconvert.json).", show_default=False)] = None,
    no_teacher: Annotated[bool, typer.Option("--no-teacher", help="Evaluate DIR alone.")] = False,
    data: Annotated[list[str] | None, typer.Option(help="Text to evaluate on (its held-out documents, see --heldout-fraction): .jsonl/.txt/.parquet files (optionally .gz/.xz) or folders as distill reads them, or 'pydoc' (Python's pydoc_data.topics). Repeatable.", show_default="pydoc")] = None,
    heldout_fraction: Annotated[float | None, typer.Option(help="Documents of --data held out for eval: those whose text's SHA-1 falls below this fraction (distill's rule). Default: DIR's distill recipe's, else 0.02.", show_default=False)] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated: ppl, passkey, niah (= niah_single,niah_multi), niah_single, niah_multi, lmeval.")] = "ppl,passkey,niah,lmeval",
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated (K = 1024).")] = "1K,2K,4K",
    depths: Annotated[str, typer.Option(help="Needle depths in the haystack, 0 (start) to 1 (end), comma-separated.")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option(help="Retrieval cases per (length, depth) cell, each with its own haystack and value.")] = 1,
    ppl_tokens: Annotated[int, typer.Option(help="Held-out tokens scored at each length.")] = 8192,
    chunk: Annotated[int, typer.Option(help="Prefill chunk length: longer inputs go through the model in chunks sharing one cache.")] = 4096,
    lm_tasks: Annotated[str, typer.Option(help="lm-eval task names (with --tasks lmeval).")] = "arc_easy,hellaswag",
    lm_limit: Annotated[int, typer.Option(help="Examples per lm-eval task (0: all).")] = 200,
    time_budget: Annotated[float | None, typer.Option(help="Seconds per model; lengths not started by then are skipped (shortest lengths run first).", show_default=False)] = None,
    dtype: Annotated[DType, typer.Option(help="Weight dtype (auto: bfloat16 on GPU, float32 on CPU).")] = DType.auto,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda when available).", show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice); 1 is often fastest on a busy machine.", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for eval.json and the PNGs.")] = Path("."),
    seed: Annotated[int, typer.Option(help="Seed of the haystack offsets, keys and values.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
):
    """Quality of a checkpoint beside its teacher: perplexity, passkey/needle retrieval, lm-eval.

    Held-out perplexity at several lengths; passkey and needle-in-a-haystack (single and multi-key)
    retrieval over lengths x depths on real text; lm-eval tasks when lm-eval and their data are
    installed. Writes eval.json, eval_heatmaps.png and eval_ppl.png to --out.
    """
    from salaconvert.eval.options import parse_floats, parse_lengths, parse_names

    with user_errors():
        if threads is not None:
            import torch

            if threads < 1:
                raise InputError(f"--threads {threads}: must be at least 1")
            torch.set_num_threads(threads)
        names = parse_names(tasks, "--tasks", TASK_NAMES)
        expanded = [t for n in names for t in (("niah_single", "niah_multi") if n == "niah" else (n,))]
        from salaconvert.eval.report import tables
        from salaconvert.eval.run import EvalSettings, default_teacher, run_eval
        from salaconvert.io.load import resolve_source

        if lm_limit < 0:
            raise InputError(f"--lm-limit {lm_limit}: must be 0 (all) or more")
        settings = EvalSettings(tasks=list(dict.fromkeys(expanded)), lengths=parse_lengths(lengths),
                                depths=parse_floats(depths, "--depths"), trials=trials, ppl_tokens=ppl_tokens,
                                chunk=chunk, lm_tasks=parse_names(lm_tasks, "--lm-tasks"),
                                lm_limit=lm_limit or None, heldout_fraction=heldout_fraction, time_budget_s=time_budget, seed=seed).validate()
        if teacher is None and not no_teacher:
            teacher = sidecar_teacher(model, default_teacher, resolve_source)
        with steps("eval") as step:
            report = run_eval(model, None if no_teacher else teacher, data, settings, out_dir, dtype.value, device, step)
    for table in tables(report):
        err.print(table)
    err.print(f"wrote {', '.join(str(v) for v in report['files'].values())} in {report['seconds']:.1f}s", highlight=False)
    if as_json:
        out.print_json(json.dumps(report, default=str))


def sidecar_teacher(model: str, default_teacher, resolve_source) -> str | None:
    teacher = default_teacher(model)
    if teacher is None:
        return None
    try:
        resolve_source(teacher)
    except InputError as e:
        err.print(f"[yellow]warning:[/] not evaluating the teacher named in {model}/salaconvert.json: {e}", highlight=False)
        return None
    return teacher
