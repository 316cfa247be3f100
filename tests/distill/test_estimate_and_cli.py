"""`--estimate` on a Llama-3-8B-shaped config (meta device), and the `distill` verb as a user runs it."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from salaconvert.cli import app
from salaconvert.distill.estimate import estimate_memory
from salaconvert.distill.recipe import load_recipe
from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.surgery.convert import hybrid_config, teacher_arch
from tiny import save_tiny_teacher

GB = 1e9


def llama3_8b_hybrid_config():
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        teacher = LlamaForCausalLM(config)
    return hybrid_config(teacher, LayerPlan(uniform_layer_types(32, "1:3")), teacher_arch(teacher))


def test_estimate_for_a_llama3_8b_shaped_hybrid():
    config = llama3_8b_hybrid_config()
    result = estimate_memory(config, load_recipe("halo"), stages=(1, 2))
    assert abs(result["params"]["teacher"] - 8.03e9) < 0.01e9  # Llama-3-8B has 8.03B parameters
    D, d, Hkv = 4096, 128, 8
    # converted attention: 24 Lightning (q, k, v, o, gate: 5·D², + q/k/o norms) and 8 sparse (q, o, gate, GQA k/v)
    n_train = 24 * (5 * D * D + 2 * d + D) + 8 * (3 * D * D + 2 * Hkv * d * D)
    for n in (1, 2):
        stage = result["stages"][n]
        assert stage["trainable"] == n_train
        assert stage["total"] == sum(stage["parts"].values())
        assert stage["parts"]["AdamW moments (fp32)"] == 8 * n_train
        assert stage["fits"], f"stage {n}: {stage['total'] / GB:.1f} GB"  # micro-batches 4 and 8 of 512 fit 80 GB
        assert 50 * GB < stage["total"] < 80 * GB
    # the whole batch of 64 × 512 in one forward does not fit, and the estimate says so
    big = estimate_memory(config, load_recipe("halo", ["stage1.micro_batch_size=64"]), stages=(1,))
    assert not big["stages"][1]["fits"]


runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    teacher = save_tiny_teacher(folder / "teacher")
    result = runner.invoke(app, ["convert", str(teacher), "--out", str(folder / "hybrid")])
    assert result.exit_code == 0, result.output
    return teacher, folder / "hybrid"


def test_distill_verb_end_to_end(converted, text_file, tmp_path):
    teacher, hybrid = converted
    out = tmp_path / "distilled"
    args = ["distill", str(hybrid), "--teacher", str(teacher), "--data", str(text_file), "--recipe", "debug/tiny",
            "--set", "stage2.steps=2", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["stages_done"] == [1, 2] and report["tokens"]["2"] == 2 * 4 * 32
    assert "Held-out perplexity" in result.output and "logits KL" in result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == json.loads((hybrid / "config.json").read_text())["layer_types"]
    sidecar = json.loads((out / "salaconvert.json").read_text())
    assert sidecar["distillation"]["stages_done"] == [1, 2] and sidecar["recipe"]["stage2"]["steps"] == 2
    assert (out / "recipe.yaml").is_file() and (out / "metrics.jsonl").is_file()
    again = runner.invoke(app, args)  # the output exists: refused, untouched
    assert again.exit_code == 2 and "already exists" in again.output


def test_estimate_verb_needs_only_the_checkpoint(converted):
    _, hybrid = converted
    result = runner.invoke(app, ["distill", str(hybrid), "--estimate", "--recipe", "debug/tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert "fits in 80 GB" in result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(data["stages"]) == {"1", "2"}


@pytest.mark.parametrize("extra, words", [
    (["--data", "/no/such.jsonl"], "no such file"),
    (["--data", "{text}", "--set", "stage1.lr=-1"], "lr must be > 0"),
    (["--data", "{text}", "--recipe", "nope"], "no such file"),
    ([], "missing --data"),
])
def test_bad_input_is_exit_2_one_line_and_nothing_written(converted, text_file, tmp_path, extra, words):
    teacher, hybrid = converted
    extra = [str(text_file) if a == "{text}" else a for a in extra]
    result = runner.invoke(app, ["distill", str(hybrid), "--teacher", str(teacher), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and result.output.strip().endswith(errors[0])  # one line, last
    assert not (tmp_path / "o").exists()


def test_stop_after_then_resume_from_the_command_line(converted, text_file, tmp_path):
    teacher, hybrid = converted
    out = tmp_path / "d"
    args = ["distill", str(hybrid), "--teacher", str(teacher), "--data", str(text_file), "--recipe", "debug/tiny",
            "--out", str(out)]
    stopped = runner.invoke(app, [*args, "--stop-after", "3"])
    assert stopped.exit_code == 0, stopped.output
    assert "--resume" in stopped.output and not out.exists()
    again = runner.invoke(app, args)  # an unfinished run is neither resumed nor clobbered silently
    assert again.exit_code == 2 and "unfinished run" in again.output
    changed = runner.invoke(app, [*args, "--resume", "--set", "stage2.lr=0.5"])
    assert changed.exit_code == 2 and "recipe differs" in changed.output
    resumed = runner.invoke(app, [*args, "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["stages_done"] == [1, 2]
    assert json.loads((out / "salaconvert.json").read_text())["distillation"]["tokens"] == {"1": 768, "2": 768}
