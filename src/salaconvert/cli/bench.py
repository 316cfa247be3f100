"""`salaconvert bench DIR [--teacher MODEL]`"""
import json
from pathlib import Path
from typing import Annotated

import typer

from salaconvert.cli.common import KV_CACHE_HELP, MODEL_HELP, DType, KVCache, err, out, steps, user_errors
from salaconvert.cli.eval import sidecar_teacher
from salaconvert.errors import InputError


def bench(
    model: Annotated[str, typer.Argument(help=f"A hybrid checkpoint directory (or any MODEL: {MODEL_HELP}).", show_default=False)],
    teacher: Annotated[str | None, typer.Option(help="Benchmark this teacher in the same run (default: the teacher named in DIR's salaconvert.json).", show_default=False)] = None,
    no_teacher: Annotated[bool, typer.Option("--no-teacher", help="Benchmark DIR alone.")] = False,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated (K = 1024).")] = "1K,2K,4K",
    decode_tokens: Annotated[int, typer.Option(help="Decode steps timed after each prefill.")] = 16,
    repeats: Annotated[int, typer.Option(help="Runs per length; the last is reported (the first may include kernel compiles).")] = 1,
    chunk: Annotated[int, typer.Option(help="Prefill chunk length: longer inputs go through the model in chunks sharing one cache.")] = 4096,
    time_budget: Annotated[float | None, typer.Option(help="Seconds per model; lengths not started by then are skipped (shortest first).", show_default=False)] = None,
    dtype: Annotated[DType, typer.Option(help="Weight dtype (auto: bfloat16 on GPU, float32 on CPU).")] = DType.auto,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda when available).", show_default=False)] = None,
    kv_cache: Annotated[KVCache, typer.Option(help=KV_CACHE_HELP)] = KVCache.auto,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice); 1 is often fastest on a busy machine.", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for bench.json, bench.md and bench.png.")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
):
    """Speed and memory against context length, teacher beside hybrid.

    Chunked prefill latency, decode ms/token, cache bytes (measured from the cache tensors) and peak
    memory (GPU) or RSS (CPU). Writes bench.json, bench.md and bench.png to --out.
    """
    from salaconvert.eval.options import parse_lengths

    with user_errors():
        if threads is not None:
            import torch

            if threads < 1:
                raise InputError(f"--threads {threads}: must be at least 1")
            torch.set_num_threads(threads)
        from salaconvert.bench.report import COMPILED, compiled_in_prefill, table
        from salaconvert.bench.run import BenchSettings, run_bench
        from salaconvert.eval.run import default_teacher
        from salaconvert.io.load import resolve_source

        settings = BenchSettings(parse_lengths(lengths), decode_tokens, chunk, repeats, time_budget_s=time_budget,
                                 kv_cache=kv_cache.value).validate()
        if teacher is None and not no_teacher:
            teacher = sidecar_teacher(model, default_teacher, resolve_source)
        with steps("bench") as step:
            report = run_bench(model, None if no_teacher else teacher, settings, out_dir, dtype.value, device, step)
    err.print(table(report))
    for line in compiled_in_prefill(report):
        err.print(f"[yellow]{COMPILED}: {line}[/]", highlight=False)
    err.print(f"[dim]CUDA graphs: {report['cuda_graphs']}[/]")
    err.print(f"wrote {', '.join(str(v) for v in report['files'].values())} in {report['seconds']:.1f}s", highlight=False)
    if as_json:
        out.print_json(json.dumps(report, default=str))
