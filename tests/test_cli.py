"""The CLI as a user meets it: real runs on tiny local models, and bad input → exit 2, one line, nothing written."""
import json
import os

import pytest
import torch

from helpers import run_cli


def test_convert_writes_a_checkpoint_and_report(teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    result = run_cli("convert", teacher_dir, "--out", out, "--ratio", "1:3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["layer_types"] == ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    assert report["params"]["hybrid"] > report["params"]["teacher"]  # gates and repeated K/V rows are new
    assert report["cache_bytes_per_token"]["hybrid"] < report["cache_bytes_per_token"]["teacher"]
    assert json.loads(result.stdout[result.stdout.index("{"):])["counts"]["sparse_attention"] == 2
    assert (out / "tokenizer.json").exists()

    info = run_cli("info", out, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout[info.stdout.index("{"):])["layer_types"] == report["layer_types"]

    gen = run_cli("generate", out, "hello", "--max-new-tokens", "5", "--teacher", teacher_dir)
    assert gen.exit_code == 0, gen.output
    assert "teacher" in gen.output and "tokens/s" in gen.output
    fp8 = run_cli("generate", out, "hello", "--max-new-tokens", "5", "--kv-cache", "fp8")
    assert fp8.exit_code == 0 and "5 tokens" in fp8.output, fp8.output
    not_hybrid = run_cli("generate", teacher_dir, "hello", "--kv-cache", "fp8")
    assert not_hybrid.exit_code == 2 and "not a hybrid" in not_hybrid.output, not_hybrid.output
    if not torch.cuda.is_available():
        no_gpu = run_cli("generate", out, "hello", "--device", "cuda")
        assert no_gpu.exit_code == 2 and "CUDA is not available" in no_gpu.output


def test_convert_lightning_gqa_and_coarse_norm_reach_the_config(teacher_dir, tmp_path):
    reports = {}
    for flag in ("--no-lightning-gqa", "--lightning-gqa"):
        out = tmp_path / flag
        result = run_cli("convert", teacher_dir, "--out", out, "--ratio", "1:3", flag, "--coarse-norm")
        assert result.exit_code == 0, result.output
        reports[flag] = json.loads((out / "conversion_report.json").read_text())
    config = json.loads((tmp_path / "--lightning-gqa" / "config.json").read_text())
    assert config["lightning"]["gqa"] is True and config["sparse"]["coarse_norm"] is True
    assert reports["--lightning-gqa"]["params"]["hybrid"] < reports["--no-lightning-gqa"]["params"]["hybrid"]
    gen = run_cli("generate", tmp_path / "--lightning-gqa", "hello", "--max-new-tokens", "4")
    assert gen.exit_code == 0 and "4 tokens" in gen.output, gen.output


@pytest.mark.parametrize("field,value,says", [("sparse", {"kernel_size": 40}, "kernel_size 40"),
                                               ("layer_types", ["sparse_attention", "bogus", "linear_attention",
                                                                "linear_attention"], "unknown type")])
def test_a_hybrid_config_the_kernels_cannot_run_exits_2(field, value, says, teacher_dir, tmp_path):
    out = tmp_path / "hybrid"
    assert run_cli("convert", teacher_dir, "--out", out, "--ratio", "1:3").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config[field] = {**config[field], **value} if isinstance(value, dict) else value
    (out / "config.json").write_text(json.dumps(config))
    result = run_cli("info", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output


def test_convert_uses_a_plan_file_exactly(teacher_dir, tmp_path):
    plan = tmp_path / "plan.json"
    types = ["linear_attention", "sparse_attention", "full_attention", "linear_attention"]
    plan.write_text(json.dumps({"layer_types": types, "method": "manual"}))
    result = run_cli("convert", teacher_dir, "--out", tmp_path / "h", "--plan", plan)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "h" / "config.json").read_text())["layer_types"] == types


def _bad_plan(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layer_types": ["sparse_attention"] * 3}))
    return plan


@pytest.mark.parametrize("case", ["missing path", "non-decoder", "ratio abc", "ratio 0:4", "plan length", "out exists"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, teacher_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = {
        "missing path": [tmp_path / "no-such-model", "--out", out],
        "non-decoder": [_bert_dir(tmp_path), "--out", out],
        "ratio abc": [teacher_dir, "--out", out, "--ratio", "abc"],
        "ratio 0:4": [teacher_dir, "--out", out, "--ratio", "0:4"],
        "plan length": [teacher_dir, "--out", out, "--plan", _bad_plan(tmp_path)],
        "out exists": [teacher_dir, "--out", work],
    }[case]
    before = sorted(os.listdir(work))
    result = run_cli("convert", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert sorted(os.listdir(work)) == before


def _bert_dir(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(folder)
    return folder


def test_help_explains_each_verb():
    for verb in ("convert", "generate", "info"):
        result = run_cli(verb, "--help")
        assert result.exit_code == 0 and "Usage" in result.output
    assert "--ratio" in run_cli("convert", "--help").output
