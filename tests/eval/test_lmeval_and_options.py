"""The lm-eval adapter with lm-eval absent, failing offline, and present (a stand-in module); list options."""
import sys
import types

import pytest

from salaconvert.errors import InputError
from salaconvert.eval import lmeval
from salaconvert.eval.options import parse_floats, parse_lengths, parse_names


def test_lmeval_absent_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(lmeval.importlib.util, "find_spec", lambda name: None)
    r = lmeval.run_lmeval(object(), object(), ["arc_easy"])
    assert r["status"] == "skipped" and "not installed" in r["reason"]


def _fake_lm_eval(monkeypatch, simple_evaluate):
    pkg = types.ModuleType("lm_eval")
    pkg.simple_evaluate = simple_evaluate
    models, hf = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, batch_size, backend: ("wrapped", pretrained)
    for name, mod in (("lm_eval", pkg), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(lmeval, "lmeval_available", lambda: None)


def test_lmeval_runs_the_loaded_model_and_keeps_numeric_metrics(monkeypatch):
    seen = {}

    def simple_evaluate(model, tasks, limit):
        seen.update(model=model, tasks=tasks, limit=limit)
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01}}}

    _fake_lm_eval(monkeypatch, simple_evaluate)
    model = object()
    r = lmeval.run_lmeval(model, object(), ["arc_easy"], limit=10)
    assert seen == {"model": ("wrapped", model), "tasks": ["arc_easy"], "limit": 10}
    assert r == {"status": "ok", "tasks": ["arc_easy"], "limit": 10,
                 "results": {"arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.01}}}


def test_lmeval_without_task_data_is_skipped_not_a_crash(monkeypatch):
    def simple_evaluate(model, tasks, limit):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    _fake_lm_eval(monkeypatch, simple_evaluate)
    r = lmeval.run_lmeval(object(), object(), ["arc_easy"])
    assert r["status"] == "skipped" and "ConnectionError" in r["reason"] and "cache" in r["reason"]


def test_lmeval_with_a_missing_dependency_names_it(monkeypatch):
    def simple_evaluate(model, tasks, limit):
        raise ModuleNotFoundError("No module named 'dill'", name="dill")

    _fake_lm_eval(monkeypatch, simple_evaluate)
    r = lmeval.run_lmeval(object(), object(), ["arc_easy"])
    assert r["status"] == "skipped" and "'dill'" in r["reason"] and "salaconvert[eval]" in r["reason"]


def test_list_options_parse_and_reject():
    assert parse_lengths("2K, 512,1k,512") == [512, 1024, 2048]
    assert parse_floats("0,50%,1", "--depths") == [0.0, 0.5, 1.0]
    assert parse_names("ppl,niah,ppl", "--tasks", ("ppl", "niah")) == ["ppl", "niah"]
    for bad in ("0", "1.5K", "-4", "", "K"):
        with pytest.raises(InputError, match="--lengths"):
            parse_lengths(bad)
    with pytest.raises(InputError, match="outside"):
        parse_floats("1.2", "--depths")


def test_held_out_documents_are_distills_held_out_documents(tmp_path):
    import hashlib
    import json

    from salaconvert.eval.data import heldout_fraction_of, read_source

    texts = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    key = lambda t: int.from_bytes(hashlib.sha1(t.encode()).digest()[:8], "big")  # noqa: E731
    expected = {t for t in texts if key(t) < int(0.1 * 2**64)}
    source = read_source(str(path), 0.1)
    assert set(source.documents) == expected and 10 < len(expected) < 60
    assert set(read_source(str(path), 0.05).documents) <= expected  # a smaller fraction: a subset
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "salaconvert.json").write_text(json.dumps({"recipe": {"data": {"heldout_fraction": 0.03}}}))
    assert heldout_fraction_of(str(tmp_path / "ckpt")) == 0.03 and heldout_fraction_of(str(tmp_path)) is None
