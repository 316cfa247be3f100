"""The bench report: bench.json, bench.md (one table, teacher beside hybrid), bench.png (four
panels against context length) and the rich table; files are written atomically."""
import json
from pathlib import Path

from salaconvert.eval.report import MODELS, atomic_write, short_length
from salaconvert.units import human_bytes

# (key, heading, format) of the per-length columns, in table order.
COLUMNS = (
    ("prefill_s", "prefill s", "{:.3f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:,.0f}"),
    ("decode_ms_per_token", "decode ms/tok", "{:.2f}"),
    ("cache_bytes", "cache", None),
    ("peak_memory_bytes", "peak GPU mem", None),
    ("rss_bytes", "RSS", None),
)


def _cell(row: dict, key: str, fmt: str | None) -> str:
    if "error" in row or "skipped" in row:
        return "failed" if "error" in row else "skipped"
    if key not in row:
        return "–"
    return fmt.format(row[key]) if fmt else human_bytes(row[key])


def _columns(report: dict) -> list:
    present = {k for r in report["results"].values() for row in r["rows"] for k in row}
    return [c for c in COLUMNS if c[0] in present]


COMPILED = "Triton compiled kernels inside these timed prefills (their prefill s includes it)"


def compiled_in_prefill(report: dict) -> list[str]:
    """One line per row whose timed prefill included Triton compiles: where, how long, which kernels."""
    return [f"{label} at {short_length(row['length'])}: {sum(s for _, s in row['prefill_compiles']):.2f} s "
            f"({', '.join(sorted({name for name, _ in row['prefill_compiles']}))})"
            for label in (m for m in MODELS if m in report["results"])
            for row in report["results"][label]["rows"] if row.get("prefill_compiles")]


def markdown(report: dict) -> str:
    cols = _columns(report)
    lines = [f"# bench: {report['model']}" + (f" vs teacher {report['teacher']}" if report["teacher"] else ""),
             "", f"{report['device']}, {report['dtype']}, {report['date']}; chunked prefill of "
             f"{report['settings']['chunk']} tokens; {report['settings']['decode_tokens']} decode steps "
             f"(median); the last of {report['settings'].get('repeats', 1)} run(s) per length; CUDA graphs: "
             f"{report['cuda_graphs']}.", "",
             "| model | length | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for label in (m for m in MODELS if m in report["results"]):
        for row in report["results"][label]["rows"]:
            lines.append(f"| {label} | {short_length(row['length'])} | " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " |")
    notes = [f"- {label} at {short_length(row['length'])}: {row.get('error') or row.get('skipped')}"
             for label in (m for m in MODELS if m in report["results"])
             for row in report["results"][label]["rows"] if "error" in row or "skipped" in row]
    if notes:
        lines += ["", "Not measured:", *notes]
    compiled = compiled_in_prefill(report)
    if compiled:
        lines += ["", COMPILED + ":", *(f"- {c}" for c in compiled)]
    eager = [f"- {label} at {short_length(row['length'])}" for label in (m for m in MODELS if m in report["results"])
             for row in report["results"][label]["rows"] if row.get("decode") == "eager"]
    if eager and report["cuda_graphs"].startswith("used"):
        lines += ["", "Decoded eagerly (no CUDA graph: the cache could not be reserved):", *eager]
    v = report["versions"]
    lines += ["", f"salaconvert {v['salaconvert']}, torch {v['torch']}, transformers {v['transformers']}."]
    return "\n".join(lines) + "\n"


def table(report: dict):
    from rich.table import Table

    t = Table(title=f"bench on {report['device']} ({report['dtype']})")
    t.add_column("model")
    t.add_column("length", justify="right")
    cols = _columns(report)
    for _, heading, _ in cols:
        t.add_column(heading, justify="right")
    for label in (m for m in MODELS if m in report["results"]):
        for row in report["results"][label]["rows"]:
            t.add_row(label, short_length(row["length"]), *[_cell(row, k, f) for k, _, f in cols])
    return t


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    memory_key = "peak_memory_bytes" if any("peak_memory_bytes" in row for r in report["results"].values()
                                            for row in r["rows"]) else "rss_bytes"
    panels = (("prefill_s", "prefill latency (s)", 1), ("decode_ms_per_token", "decode (ms/token)", 1),
              ("cache_bytes", "cache (MiB)", 2 ** 20),
              (memory_key, "peak GPU memory (MiB)" if memory_key == "peak_memory_bytes" else "process RSS (MiB)", 2 ** 20))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for label in (m for m in MODELS if m in report["results"]):
            rows = [r for r in report["results"][label]["rows"] if key in r]
            ax.plot([r["length"] for r in rows], [r[key] / scale for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} — {report['device']}, {report['dtype']}", fontsize=10)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, stem: str = "bench") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        files["png"] = "not written: matplotlib is not installed (pip install 'salaconvert[plot]')"
    else:
        files["png"] = str(atomic_write(out / f"{stem}.png", lambda p: plot(report, p)))
    atomic_write(out / f"{stem}.md", lambda p: p.write_text(markdown(report)))
    text = json.dumps({**report, "files": files}, indent=2, default=str) + "\n"
    atomic_write(out / f"{stem}.json", lambda p: p.write_text(text))
    return files
