"""`salaconvert info DIR`"""
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salaconvert.cli.common import err, human_bytes, out, user_errors


def info(
    checkpoint: Annotated[Path, typer.Argument(help="A hybrid checkpoint directory written by salaconvert.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the information as JSON on stdout.")] = False,
):
    """Show a hybrid checkpoint's layer map, sizes and provenance, without loading its weights."""
    from salaconvert.info import checkpoint_info

    with user_errors():
        data = checkpoint_info(checkpoint)
    table = Table(title=f"{checkpoint}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("source model", str(data["source"].get("model", "?")))
    table.add_row("architecture", data["architecture"])
    table.add_row("layers", " ".join({"sparse_attention": "S", "linear_attention": "L", "full_attention": "F"}[t]
                                     for t in data["layer_types"]))
    table.add_row("sparse / linear / full", " / ".join(str(data["counts"][k]) for k in ("sparse_attention", "linear_attention", "full_attention")))
    table.add_row("plan method", str(data["plan_method"]))
    table.add_row("weights on disk", human_bytes(data["weight_bytes"]))
    table.add_row("KV cache per token (bf16)", f"{human_bytes(data['cache_bytes_per_token']['hybrid'])} "
                  f"(teacher {human_bytes(data['cache_bytes_per_token']['teacher'])})")
    table.add_row("fixed linear state", human_bytes(data["linear_state_bytes"]))
    table.add_row("distillation", data["distillation"])
    table.add_row("salaconvert version", str(data["version"]))
    err.print(table)
    if as_json:
        out.print_json(json.dumps(data))
