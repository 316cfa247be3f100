"""Perplexity against a hand computation, and retrieval cases found by a model that copies."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from salaconvert.eval.data import read_source, token_stream
from salaconvert.eval.forward import cache_nbytes, prefill, token_nll
from salaconvert.eval.ppl import perplexity
from salaconvert.eval.retrieval import TASKS, break_token_ids, build_case, passed
from salaconvert.eval.run import EvalSettings, evaluate_model, prepare
from tiny import tiny_teacher, tiny_tokenizer


def test_perplexity_is_exp_of_mean_token_loss_by_hand():
    model = tiny_teacher("llama")
    stream = torch.randint(3, 128, (96,), generator=torch.Generator().manual_seed(1)).tolist()
    # Two windows of 48, each in chunks of 20 (so chunk edges fall inside windows).
    got = perplexity(model, stream, length=48, tokens=96, chunk=20)
    losses = []
    for w in (stream[:48], stream[48:96]):
        ids = torch.tensor([w])
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        losses.append(-logp.gather(1, ids[0, 1:, None])[:, 0])
    by_hand = torch.cat(losses)
    assert got["predicted_tokens"] == 94 and got["windows"] == 2
    # float32 logits summed over 94 tokens: agreement to ~1e-6 relative.
    assert math.isclose(got["ppl"], math.exp(by_hand.mean().item()), rel_tol=1e-5)
    tail = torch.cat([loss[-(47 // 4):] for loss in losses])
    assert math.isclose(got["ppl_last_quarter"], math.exp(tail.mean().item()), rel_tol=1e-5)


def test_chunked_token_loss_equals_one_pass_on_the_hybrid():
    from salaconvert.layer_selection.plan import LayerPlan
    from salaconvert.surgery.convert import convert
    from tiny import SMALL_SPARSE

    types = ["linear_attention", "sparse_attention", "linear_attention", "full_attention"]
    hybrid = convert(tiny_teacher("llama"), LayerPlan(types), sparse=SMALL_SPARSE).eval()
    ids = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(2))
    whole, chunked = token_nll(hybrid, ids, chunk=40), token_nll(hybrid, ids, chunk=12)
    # Chunked prefill with a carried cache is the same computation, reordered: float32 roundoff only.
    assert_close(chunked, whole, rtol=1e-4, what="chunked vs one-pass token loss")
    _, cache = prefill(hybrid, ids, chunk=12)
    assert cache_nbytes(cache) > 0


def test_cache_bytes_are_those_of_the_kv_tensors():
    model = tiny_teacher("llama")  # 4 layers, 2 KV heads of 16, float32
    _, cache = prefill(model, list(range(3, 53)), chunk=16)
    assert cache_nbytes(cache) == 4 * 2 * 50 * 2 * 16 * 4


@pytest.fixture(scope="module")
def haystack():
    tok = tiny_tokenizer()
    stream, _ = token_stream([read_source("pydoc")], tok, 4096)
    return tok, stream, break_token_ids(tok, stream)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_needle_sits_at_its_depth_and_the_prompt_has_the_length(haystack, depth):
    tok, stream, breaks = haystack
    case = build_case("niah_single", 900, depth, 0, stream, tok, breaks)
    assert len(case.ids) == 900
    intro, hay = case.extra["intro_tokens"], case.extra["haystack_tokens"]
    # The needle may move back up to 32 tokens to the end of a sentence.
    assert -32 <= (case.needle_at - intro) - round(depth * hay) <= 0
    assert case.value in tok.decode(case.ids[case.needle_at:case.needle_at + 60]).replace(" ", "")


def test_a_copying_model_finds_every_needle_and_a_constant_one_none(haystack, copy_model):
    tok, _, _ = haystack
    settings = EvalSettings(tasks=list(TASKS), lengths=[600, 900], depths=[0.0, 0.5, 1.0], trials=2)
    prepared = prepare(tok, settings, ["pydoc"])
    good = evaluate_model(copy_model(128), tok, prepared, settings)
    bad = evaluate_model(copy_model(128, copies=False), tok, prepared, settings)
    for task in TASKS:
        assert good[task]["mean"] == 1.0, [c for c in good[task]["cases"] if not c["passed"]][:2]
        assert good[task]["accuracy"] == [[1.0, 1.0]] * 3
        assert bad[task]["mean"] == 0.0
    values = {c["value"] for c in good["niah_multi"]["cases"]}
    assert len(values) == len(good["niah_multi"]["cases"])  # every case has its own value


def test_answers_are_matched_on_their_digits():
    assert passed(" 12345. Remember", "12345") and passed("1 2 3 4 5", "12345")
    assert not passed("The key is 54321", "12345") and not passed("", "12345")


def test_a_failing_length_is_recorded_and_a_passed_deadline_skips_the_rest(haystack, copy_model, tmp_path):
    import time

    from salaconvert.eval.report import tables, write_report

    class FailsPast700(copy_model):
        def forward(self, input_ids, past_key_values=None, **kw):
            seen = 0 if past_key_values is None else past_key_values.numel()
            if seen + input_ids.shape[1] > 700:
                raise RuntimeError("kernel said no")
            return super().forward(input_ids, past_key_values, **kw)

    tok, _, _ = haystack
    settings = EvalSettings(tasks=["ppl", "passkey"], lengths=[600, 900], depths=[0.5], ppl_tokens=900)
    prepared = prepare(tok, settings, ["pydoc"])
    r = evaluate_model(FailsPast700(128), tok, prepared, settings)
    assert r["passkey"]["accuracy"] == [[1.0, None]] and r["passkey"]["mean"] == 1.0
    assert "kernel said no" in r["passkey"]["cases"][1]["error"]
    assert list(r["ppl"]) == ["600"] and any("ppl 900" in n for n in r["incomplete"])

    late = evaluate_model(copy_model(128), tok, prepared, settings, deadline=time.monotonic() - 1)
    assert late["ppl"] == {} and late["passkey"]["mean"] is None and len(late["incomplete"]) == 4
    report = {"model": "m", "teacher": None, "device": "cpu", "data": prepared["data"], "results": {"hybrid": late},
              "settings": {"lengths": settings.lengths}}
    assert len(tables(report)) == 3  # perplexity, retrieval, not measured: all render
    write_report(report, tmp_path)
    assert (tmp_path / "eval_heatmaps.png").exists()
