"""`salaconvert eval` as a user meets it: a real run on a tiny hybrid beside its teacher, and
bad input → exit 2, one line."""
import json

import pytest

from tiny import save_tiny_teacher, tiny_tokenizer
from helpers import run_cli


def make_hybrid(root):
    """A tiny teacher directory and its converted hybrid, whose sidecar names the teacher."""
    from salaconvert.io.checkpoint import save_checkpoint
    from salaconvert.io.load import load_model, resolve_source
    from salaconvert.layer_selection.plan import LayerPlan
    from salaconvert.surgery.convert import convert

    teacher_dir = save_tiny_teacher(root / "teacher")
    plan = LayerPlan(["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"])
    hybrid = convert(load_model(resolve_source(str(teacher_dir))), plan)
    save_checkpoint(hybrid, tiny_tokenizer(), root / "hybrid", {"source": {"model": str(teacher_dir)}})
    return teacher_dir, root / "hybrid"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_hybrid(tmp_path_factory.mktemp("eval"))


def test_eval_writes_json_and_heatmaps_teacher_beside_hybrid(dirs, tmp_path):
    teacher_dir, hybrid_dir = dirs
    out = tmp_path / "report"
    result = run_cli("eval", hybrid_dir, "--tasks", "ppl,passkey,lmeval", "--lengths", "400", "--depths", "0.5",
                  "--ppl-tokens", "400", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["teacher"] == str(teacher_dir)  # taken from the checkpoint's salaconvert.json
    for label in ("teacher", "hybrid"):
        r = report["results"][label]
        assert r["ppl"]["400"]["predicted_tokens"] == 399 and r["ppl"]["400"]["ppl"] > 1
        assert r["passkey"]["accuracy"] == [[r["passkey"]["mean"]]] and len(r["passkey"]["cases"]) == 1
        assert r["lmeval"]["status"] in ("ok", "skipped") and (r["lmeval"]["status"] == "ok" or r["lmeval"]["reason"])
    for png in ("eval_heatmaps.png", "eval_ppl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout[result.stdout.index("{"):])["model"] == str(hybrid_dir)
    assert "Held-out perplexity" in result.output and "passkey" in result.output


@pytest.mark.parametrize("case", ["tasks", "lengths", "depths", "too short", "model", "teacher", "data", "out", "trials",
                                  "threads", "lm-limit"])
def test_bad_input_exits_2_with_one_line(case, dirs, tmp_path):
    teacher_dir, hybrid_dir = dirs
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    args = {
        "tasks": ["--tasks", "ppl,bogus"],
        "lengths": ["--lengths", "1K,0"],
        "depths": ["--depths", "0,1.5"],
        "too short": ["--tasks", "passkey", "--lengths", "64"],
        "model": [],
        "teacher": ["--teacher", tmp_path / "no-teacher"],
        "data": ["--data", tmp_path / "missing.jsonl.xz"],
        "out": ["--out", a_file],
        "trials": ["--trials", "0"],
        "threads": ["--threads", "0"],
        "lm-limit": ["--lm-limit", "-1"],
    }[case]
    model = tmp_path / "no-model" if case == "model" else hybrid_dir
    result = run_cli("eval", model, "--out", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (tmp_path / "o").exists()


def test_a_missing_sidecar_teacher_is_a_warning_and_the_model_runs_alone(dirs, tmp_path):
    import shutil

    hybrid = tmp_path / "moved-hybrid"
    shutil.copytree(dirs[1], hybrid)
    (hybrid / "salaconvert.json").write_text(json.dumps({"source": {"model": str(tmp_path / "gone")}}))
    result = run_cli("eval", hybrid, "--tasks", "ppl", "--lengths", "16", "--ppl-tokens", "32", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "gone" in result.output
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert report["teacher"] is None and list(report["results"]) == ["hybrid"]
