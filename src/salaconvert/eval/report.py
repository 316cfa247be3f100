"""The eval report: rich tables, eval.json, and PNGs (retrieval heatmaps, teacher beside hybrid;
perplexity against length). Every file is written to a temporary name and renamed into place."""
import json
import os
from pathlib import Path

from salaconvert.eval.retrieval import TASKS as RETRIEVAL_TASKS

MODELS = ("teacher", "hybrid")


def atomic_write(path: Path, write) -> Path:
    """`write(tmp_path)` fills a temporary sibling, which then replaces `path` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(report: dict, out: Path, stem: str = "eval") -> dict:
    """eval.json plus eval_heatmaps.png and eval_ppl.png (when matplotlib is installed)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{stem}.json")}
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        files["png"] = "not written: matplotlib is not installed (pip install 'salaconvert[plot]')"
    else:
        if any(t in r for r in report["results"].values() for t in RETRIEVAL_TASKS):
            files["heatmaps"] = str(atomic_write(out / f"{stem}_heatmaps.png", lambda p: heatmaps(report, p)))
        if any(r.get("ppl") for r in report["results"].values()):
            files["ppl_plot"] = str(atomic_write(out / f"{stem}_ppl.png", lambda p: ppl_plot(report, p)))
    text = json.dumps({**report, "files": files}, indent=2, default=str) + "\n"
    atomic_write(out / f"{stem}.json", lambda p: p.write_text(text))
    return files


def heatmaps(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in report["results"]]
    tasks = [t for t in RETRIEVAL_TASKS if any(t in report["results"][m] for m in models)]
    fig, axes = plt.subplots(len(tasks), len(models), figsize=(4.2 * len(models) + 0.8, 3.2 * len(tasks)),
                             squeeze=False, constrained_layout=True)
    image = None
    for i, task in enumerate(tasks):
        for j, label in enumerate(models):
            ax, g = axes[i][j], report["results"][label].get(task)
            if g is None:
                ax.set_axis_off()
                continue
            acc = [[float("nan") if a is None else a for a in row] for row in g["accuracy"]]
            image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(g["lengths"])), [short_length(n) for n in g["lengths"]])
            ax.set_yticks(range(len(g["depths"])), [f"{d:.0%}" for d in g["depths"]])
            for y, row in enumerate(acc):
                for x, a in enumerate(row):
                    ax.text(x, y, "" if a != a else f"{a:.0%}", ha="center", va="center", fontsize=8)
            mean = "–" if g["mean"] is None else f"{g['mean']:.0%}"
            ax.set_title(f"{task} — {label} (mean {mean})", fontsize=10)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(f"{report['model']} vs teacher {report['teacher'] or '(none)'} — {report['device']}", fontsize=10)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def ppl_plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label in MODELS:
        ppl = report["results"].get(label, {}).get("ppl")
        if ppl:
            xs = sorted(int(n) for n in ppl)
            ax.plot(xs, [ppl[str(n)]["ppl"] for n in xs], marker="o", label=f"{label}: all tokens")
            ax.plot(xs, [ppl[str(n)]["ppl_last_quarter"] for n in xs], marker="x", linestyle="--",
                    label=f"{label}: last quarter")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"{report['model']} — {', '.join(d['name'] for d in report['data'])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def tables(report: dict) -> list:
    """Rich tables: perplexity by length; retrieval accuracy by task and length; lm-eval."""
    from rich.markup import escape
    from rich.table import Table

    results = report["results"]
    models = [m for m in MODELS if m in results]
    out = []
    if any("ppl" in results[m] for m in models):
        t = Table(title="Held-out perplexity (all tokens / last quarter of each window)")
        t.add_column("length", justify="right")
        for m in models:
            t.add_column(m, justify="right")
        for n in report["settings"]["lengths"]:
            cells = []
            for m in models:
                p = results[m].get("ppl", {}).get(str(n))
                cells.append(f"{p['ppl']:.2f} / {p['ppl_last_quarter']:.2f}" if p else "–")
            t.add_row(short_length(n), *cells)
        out.append(t)
    tasks = [task for task in RETRIEVAL_TASKS if any(task in results[m] for m in models)]
    if tasks:
        t = Table(title="Retrieval accuracy, mean over depths and trials")
        t.add_column("task")
        t.add_column("model")
        for n in report["settings"]["lengths"]:
            t.add_column(short_length(n), justify="right")
        t.add_column("mean", justify="right")
        for task in tasks:
            for m in models:
                g = results[m].get(task)
                if g is None:
                    continue
                cols = [[row[j] for row in g["accuracy"] if row[j] is not None] for j in range(len(g["lengths"]))]
                t.add_row(task, m, *[f"{sum(c) / len(c):.0%}" if c else "–" for c in cols],
                          "–" if g["mean"] is None else f"{g['mean']:.0%}")
        out.append(t)
    if any("lmeval" in results[m] for m in models):
        t = Table(title="lm-eval")
        t.add_column("model")
        t.add_column("result")
        for m in models:
            r = results[m].get("lmeval")
            if r is None:
                continue
            if r["status"] != "ok":
                t.add_row(m, f"[yellow]not run[/]: {escape(r['reason'])}")
                continue
            for task, metrics in r["results"].items():
                shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "stderr" not in k)
                t.add_row(m, f"{task}: {shown}")
        out.append(t)
    notes = [(m, n) for m in models for n in results[m].get("incomplete", [])]
    if notes:
        t = Table(title="Not measured (skipped or failed)")
        t.add_column("model")
        t.add_column("what")
        for m, n in notes[:12]:
            t.add_row(m, escape(n))
        if len(notes) > 12:
            t.add_row("…", f"{len(notes) - 12} more in the JSON")
        out.append(t)
    return out


def short_length(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
