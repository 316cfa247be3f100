"""`salaconvert convert MODEL --ratio 1:3 --out DIR`"""
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salaconvert.cli.common import MODEL_HELP, DType, err, human_bytes, human_count, out, steps, user_errors


def convert(
    model: Annotated[str, typer.Argument(help=f"The teacher: {MODEL_HELP}.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the hybrid checkpoint to.")],
    ratio: Annotated[str, typer.Option(help="S:L, sparse to linear layers; sparse layers are spread evenly.")] = "1:3",
    plan: Annotated[Path | None, typer.Option(help="A layer plan (JSON, e.g. from `salaconvert analyze`); overrides --ratio.")] = None,
    first_last: Annotated[bool, typer.Option(help="SALA's rule: the first and last layers are always sparse.")] = True,
    dense_len: Annotated[int, typer.Option(help="Sparse layers attend densely while the context is at most this long.")] = 8192,
    sparse_rope: Annotated[bool, typer.Option(help="Keep the rotary embedding in sparse layers (default: NoPE).")] = False,
    coarse_norm: Annotated[bool, typer.Option(
        help="Sparse layers take the block selection's softmax normaliser from the 4x coarser key pool (the "
             "paper's approximation: a cheaper selection that picks somewhat different blocks).")] = False,
    lightning_gqa: Annotated[bool, typer.Option(
        help="Lightning layers keep the teacher's K/V heads, shared by each group of query heads (default: "
             "repeated per query head, HALO's GQA→MHA). Smaller and faster; every query head keeps its own state.")] = False,
    dtype: Annotated[DType, typer.Option(help="Weight dtype of the written checkpoint.")] = DType.auto,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
):
    """Build a hybrid from MODEL's weights and write it as a Hugging Face checkpoint.

    About 1 in 4 attention layers keep softmax attention in InfLLM-V2 sparse form, the rest become
    Lightning linear attention. The result loads with AutoModelForCausalLM after `import
    salaconvert`; it needs `salaconvert distill` before its text is good.
    """
    from salaconvert.convert import convert_model

    with user_errors(), steps("convert") as step:
        report = convert_model(model, out_dir, ratio=ratio, plan=str(plan) if plan else None, first_last=first_last,
                               dtype=dtype.value, overwrite=overwrite,
                               sparse={"dense_len": dense_len, "rope": sparse_rope, "coarse_norm": coarse_norm},
                               lightning={"gqa": lightning_gqa}, step=step)
    print_report(report)
    if as_json:
        out.print_json(json.dumps(report))


def print_report(report: dict) -> None:
    short = {"sparse_attention": "[bold cyan]sparse[/]", "linear_attention": "linear", "full_attention": "[bold]full[/]"}
    types = report["layer_types"]
    layers = Table(title=f"Layer map of {report['model']} ({report['architecture']})", show_header=True)
    layers.add_column("layers")
    layers.add_column("type")
    start = 0
    for i in range(1, len(types) + 1):  # runs of equal type, one row each
        if i == len(types) or types[i] != types[start]:
            span = f"{start}" if i - 1 == start else f"{start}–{i - 1}"
            layers.add_row(span, short[types[start]])
            start = i
    err.print(layers)

    p, c = report["params"], report["cache_bytes_per_token"]
    table = Table(title="Conversion report")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("hybrid", justify="right")
    table.add_row("parameters", human_count(p["teacher"]), human_count(p["hybrid"]))
    table.add_row(f"KV cache per token ({report['dtype']})", human_bytes(c["teacher"]), human_bytes(c["hybrid"]))
    table.add_row("fixed linear state", "–", human_bytes(report["linear_state_bytes"]))
    n = report["counts"]
    table.add_row("layers sparse / linear / full", "–",
                  f"{n['sparse_attention']} / {n['linear_attention']} / {n['full_attention']}")
    s = report["seconds"]
    table.add_row("time (load / convert / save)", "–", f"{s['load']:.1f}s / {s['convert']:.1f}s / {s['save']:.1f}s")
    err.print(table)
    err.print(f"wrote [bold]{report['out']}[/] in {s['total']:.1f}s. "
              "[yellow]Not distilled yet: the new layers are untrained, so expect poor text until "
              "`salaconvert distill`.[/]")
