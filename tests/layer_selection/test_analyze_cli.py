"""`salaconvert analyze` as a user meets it: table, plan, plot, summary; the plan drives `convert --plan`
exactly; bad input exits 2 with one line and writes nothing."""
import json
import os

import pytest

from salaconvert.layer_selection import LayerPlan
from helpers import run_cli


def test_analyze_writes_plan_plot_and_summary_and_convert_follows_the_plan(teacher_dir, tmp_path):
    plan_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = run_cli("analyze", teacher_dir, "--method", "kl", "--seq-len", "96", "--ratio", "1:1",
                  "--out", plan_path, "--plot", png, "--json")
    assert result.exit_code == 0, result.output
    plan = LayerPlan.load(plan_path).validate(4)
    assert plan.method == "kl" and plan.ratio == "1:1" and plan.seed == 0
    assert plan.model_fingerprint and plan.data_fingerprint and plan.extra["data"] == "pydoc_data.topics"
    assert plan.layer_types[0] == plan.layer_types[-1] == "sparse_attention"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Layer scores of" in result.output and "keep 2 of 4 layers sparse" in result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["layer_types"] == plan.layer_types

    # Put a non-uniform choice in the file: convert must use it as is, not re-derive anything.
    types = ["sparse_attention", "sparse_attention", "linear_attention", "full_attention"]
    LayerPlan(types, scores=plan.scores, method=plan.method, ratio="1:3").save(plan_path)
    out = tmp_path / "hybrid"
    converted = run_cli("convert", teacher_dir, "--plan", plan_path, "--out", out, "--ratio", "1:3")
    assert converted.exit_code == 0, converted.output
    assert json.loads((out / "config.json").read_text())["layer_types"] == types
    assert json.loads((out / "salaconvert.json").read_text())["plan"]["layer_types"] == types


def test_help_lists_the_options():
    result = run_cli("analyze", "--help")
    assert result.exit_code == 0
    for option in ("--method", "--data", "--ratio", "--seed", "--out", "--plot"):
        assert option in result.output


@pytest.mark.parametrize("case", ["ratio", "method", "data", "out dir", "plot suffix", "model", "seq len", "halo seqs"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, teacher_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    plan = work / "plan.json"
    args = {
        "ratio": ["--ratio", "3"],
        "method": ["--method", "magic"],
        "data": ["--data", tmp_path / "missing.jsonl.xz"],
        "out dir": ["--out", tmp_path / "nowhere" / "plan.json"],
        "plot suffix": ["--plot", work / "plan.jpg"],
        "model": ["--method", "uniform"],
        "seq len": ["--seq-len", "8"],
        "halo seqs": ["--method", "halo", "--num-seqs", "1", "--seq-len", "96", "--plot", work / "plan.png"],  # fails mid-run
    }[case]
    model = tmp_path / "no-such-model" if case == "model" else teacher_dir
    result = run_cli("analyze", model, "--out", plan, *args) if case != "out dir" else run_cli("analyze", model, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert os.listdir(work) == []


def test_plot_without_matplotlib_is_a_clear_error_before_any_work(teacher_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = run_cli("analyze", teacher_dir, "--plot", tmp_path / "p.png", "--out", tmp_path / "p.json")
    assert result.exit_code == 2
    assert "--plot needs matplotlib" in result.output and "(pip install matplotlib)" in result.output
    assert list(tmp_path.iterdir()) == []
