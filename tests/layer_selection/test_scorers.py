"""Each scorer on a tiny model, determinism, the one-layer-swap machinery, probes and calibration data."""
import gzip
import json
import lzma
import math

import pytest
import torch

from helpers import assert_close
from salaconvert.errors import InputError
from salaconvert.layer_selection.align import align_layer, record_attention_io
from salaconvert.layer_selection.plan import select_layer_types
from salaconvert.layer_selection.probes import build_calibration, read_documents, recall_items
from salaconvert.layer_selection.scorers import ScoreContext, available_scorers, get_scorer
from salaconvert.layer_selection.scorers.swap import (decoder_layers, evaluate_swaps, lightning_candidates, recorded,
                                                      replayed, swapped)
from tiny import tiny_teacher, tiny_tokenizer

SEQ = 128
FAST = {"halo_steps": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ctx(teacher, tokenizer, seed=0, num_seqs=4, **options):
    docs, source = read_documents(None)
    cal = build_calibration(tokenizer, docs, source, SEQ, num_seqs, seed, spare_tokens=2 * SEQ)
    return ScoreContext(teacher, tokenizer, cal, teacher.config.num_hidden_layers, SEQ, seed, "1:3", True,
                        {**FAST, **options})


def test_registry_lists_the_scorers_and_rejects_unknown_names():
    assert {"uniform", "random", "entropy", "long_range", "retrieval", "kl", "halo"} <= set(available_scorers())
    with pytest.raises(InputError, match="method 'magic': unknown; choose one of"):
        get_scorer("magic")


@pytest.mark.parametrize("method", ["uniform", "random", "entropy", "long_range", "retrieval", "kl", "halo"])
def test_each_scorer_runs_on_a_tiny_model(method, tokenizer):
    teacher = tiny_teacher("qwen3", num_hidden_layers=6)  # QK-norm and a non-default head dim
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = get_scorer(method).fn(_ctx(teacher, tokenizer))
    assert len(result.scores) == 6 and all(math.isfinite(s) for s in result.scores)
    for name, column in result.columns.items():
        assert len(column) == 6, name
    json.dumps(result.details)  # goes into plan.extra as is
    if method == "halo":  # HALO's ratio score, from the probe values it reports
        R, C, eps = result.details["recall_logp"], [-x for x in result.details["nll"]], result.details["eps"]
        expected = [(max(R) - R[i]) / (max(C) - C[i] + eps) for i in range(6)]
        assert result.scores == pytest.approx(expected) and min(result.scores) >= 0
    # Scoring must leave the teacher exactly as it was: modules, attention backend and weights.
    assert teacher.config._attn_implementation == "sdpa"
    assert all(type(layer).__name__ == "Qwen3DecoderLayer" for layer in decoder_layers(teacher))
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("method", ["random", "kl", "retrieval"])
def test_same_seed_same_plan(method, tokenizer):
    teacher = tiny_teacher("llama", num_hidden_layers=8)
    plans = [select_layer_types(get_scorer(method).fn(_ctx(teacher, tokenizer, seed=s)).scores) for s in (1, 1)]
    assert plans[0] == plans[1]


def test_random_depends_on_the_seed():
    scores = [get_scorer("random").fn(ScoreContext(None, None, None, 30, 0, seed=s)).scores for s in (0, 1)]
    assert scores[0] != scores[1]


def test_replaying_earlier_layers_gives_the_same_logits(tokenizer):
    # The swap machinery skips layers before i by replaying their recorded outputs; that must not
    # change anything. Tolerance: same float32 ops on the same inputs, so only reassociation noise.
    teacher = tiny_teacher("qwen2")
    ids = torch.randint(3, 128, (2, 40))
    modules = lightning_candidates(teacher)
    outputs = []
    with torch.no_grad():
        with recorded(teacher, outputs):
            teacher(input_ids=ids, use_cache=False)
        for i in (1, 3):
            with swapped(teacher, i, modules[i]):
                full = teacher(input_ids=ids, use_cache=False).logits
                with replayed(teacher, i, outputs):
                    fast = teacher(input_ids=ids, use_cache=False).logits
            assert_close(fast, full, rtol=1e-6, what=f"layer {i} replayed")


def test_swapping_in_the_teachers_own_attention_changes_nothing(tokenizer):
    teacher = tiny_teacher("llama")
    own = {i: layer.self_attn for i, layer in enumerate(decoder_layers(teacher))}
    ctx = _ctx(teacher, tokenizer)
    ref, per = evaluate_swaps(ctx, own, ctx.calibration.ids_NT, recall_items(tokenizer, ctx.calibration, SEQ, 0))
    for i, m in per.items():
        assert m.kl < 1e-9 and abs(m.nll - ref.nll) < 1e-6 and abs(m.recall_logp - ref.recall_logp) < 1e-6, i


def test_recall_items_point_at_the_token_to_copy(tokenizer):
    docs, source = read_documents(None)
    cal = build_calibration(tokenizer, docs, source, 96, 2, 0, spare_tokens=192)
    items = recall_items(tokenizer, cal, 96, seed=0)
    assert {it.kind for it in items} == {"span", "passkey"} and len({it.depth for it in items}) == 5
    for it in items:
        assert it.ids_T.shape == (96,)
        assert all(it.ids_T[q + 1] == it.ids_T[s] and s < q for q, s in zip(it.query_pos, it.source_pos))
        assert it.query_pos[-1] == 94  # the answer ends the sequence


def test_stage1_alignment_moves_the_layer_toward_the_teacher(tokenizer):
    teacher = tiny_teacher("llama")
    ids = _ctx(teacher, tokenizer).calibration.ids_NT
    rec = record_attention_io(teacher, ids, batch_size=1)
    module = lightning_candidates(teacher)[2]
    weights = module.q_proj.weight.clone()
    _, report = align_layer(module, rec, 2, steps=30, lr=1e-2)
    assert report.rel_mse_after < 0.5 * report.rel_mse_before
    assert torch.equal(module.q_proj.weight, weights)  # trained a copy; the teacher's tensor is untouched


def test_calibration_reads_txt_jsonl_gz_xz_and_is_deterministic(tmp_path, tokenizer):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    lines = "".join(json.dumps({"text": f"Chapter {i}. " + text, "source": "x"}) + "\n" for i in range(5))
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    with lzma.open(tmp_path / "c.jsonl.xz", "wt") as f:
        f.write(lines)
    docs, source = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl.xz"])
    assert len(docs) == 11 and "a.txt" in source
    cals = [build_calibration(tokenizer, docs, source, SEQ, 3, seed, spare_tokens=SEQ) for seed in (0, 0, 1)]
    assert torch.equal(cals[0].ids_NT, cals[1].ids_NT) and cals[0].fingerprint == cals[1].fingerprint
    assert cals[0].fingerprint != cals[2].fingerprint


@pytest.mark.parametrize("name, content, message", [
    ("d.csv", "a,b", "expected .txt or .jsonl"),
    ("e.jsonl", '{"body": "x"}\n', "line 1 has no string field 'text'"),
    ("f.jsonl", "{broken\n", "cannot read it (JSONDecodeError"),
    ("g.jsonl.xz", "not xz", "cannot read it (LZMAError"),
])
def test_bad_calibration_files_fail_with_one_clear_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_documents([tmp_path / name])
    with pytest.raises(InputError, match="no such file"):
        read_documents([tmp_path / "missing.txt"])
