"""Graph decode on the CPU: the step a CUDA graph captures, run eagerly, equals plain eager decode.

A captured graph replays its kernels without running Python: whatever the step read from a
Python int (a cache length, a slice bound) stays at its capture-time value, and whatever Python
state it changed is not changed again. The tests run the captured function `GraphDecoder._forward`
as a replay would: the host bookkeeping (the layers' `length`) put back to its capture-time value
before every call, only the static inputs (`ids`, `position`) changed. The logits must still follow
eager decode step for step, across dense_len (24 in SMALL_SPARSE).
"""
import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from helpers import assert_close
from salaconvert.eval.forward import decode_step, prefill
from salaconvert.layer_selection import LayerPlan
from salaconvert.kernels.infllmv2 import compress_k
from salaconvert.models.cache import FP8, SparseAttentionCacheLayer, make_hybrid_cache, make_teacher_cache
from salaconvert.models.graph_decode import GraphDecoder, grouped_decode_attention
from salaconvert.surgery.convert import convert
from tiny import SMALL_SPARSE, tiny_hybrid, tiny_teacher

PROMPT, STEPS = 18, 14  # decode positions 18..31: dense below 24, sparse above, compressed windows complete
SHORT = 21, 6  # the interpreted Triton kernels are slow: positions 21..26 still cross dense_len and two windows


def _reference(model, ids, fresh_cache, prompt=PROMPT):
    """Eager decode after prefilling ids[:prompt]: the logits of every step, fed the rest of ids."""
    logits, cache = prefill(model, ids[:prompt], cache=fresh_cache)
    steps = [logits]
    for token in ids[prompt:].tolist():
        logits, cache = decode_step(model, token, cache)
        steps.append(logits)
    return steps


def _replayed(model, ids, cache, prompt=PROMPT):
    """The captured step called as a replay runs it: host bookkeeping frozen, only the static inputs set."""
    first, cache = prefill(model, ids[:prompt], cache=cache)
    decoder = GraphDecoder(model, cache, graph=False)
    steps = [first]
    with torch.inference_mode():
        for i, token in enumerate(ids[prompt:].tolist()):
            for layer in decoder.layers:
                layer.length = prompt
            decoder.ids.fill_(token)
            decoder.position.fill_(prompt + i)
            steps.append(decoder._forward()[0])
    return decoder, steps


HYBRIDS = {"sparse+lightning": ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"],
           "with a full-attention layer": ["sparse_attention", "linear_attention", "full_attention", "sparse_attention"]}


@pytest.mark.parametrize("plan,kernels,gqa", [(plan, "torch", False) for plan in HYBRIDS]
                         + [("sparse+lightning", "triton", False), ("sparse+lightning", "triton", True)])
def test_hybrid_captured_step_follows_eager_decode_across_dense_len(plan, kernels, gqa, monkeypatch):
    monkeypatch.setenv("SALACONVERT_KERNELS", kernels)  # triton: the decode kernels through the interpreter
    hybrid = tiny_hybrid(HYBRIDS[plan], lightning={"gqa": gqa})
    prompt, steps = SHORT if kernels == "triton" else (PROMPT, STEPS)
    ids = torch.randint(0, 128, (prompt + steps,), generator=torch.Generator().manual_seed(1))
    expected = _reference(hybrid, ids, make_hybrid_cache(hybrid.config), prompt)
    decoder, got = _replayed(hybrid, ids, make_hybrid_cache(hybrid.config, reserve=prompt + steps), prompt)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, rtol=1e-5, what=f"{plan}, {kernels} kernels: logits at position {prompt + i - 1}")

    # The compressed keys kept up with the keys written at the device positions.
    for layer in decoder.layers:
        if isinstance(layer, SparseAttentionCacheLayer):
            L = prompt + steps
            assert layer.seqlens.tolist() == [L]
            ks, st = SMALL_SPARSE["kernel_size"], SMALL_SPARSE["stride"]
            n = (L - ks) // st + 1
            assert_close(layer.kc[:, :n], compress_k(layer.keys[:, :L], ks, st), rtol=1e-6, what="compressed keys")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fp8_cache_replay_follows_eager_fp8_decode(kernels, monkeypatch):
    # sparse K/V stored in fp8: the captured step (token written at the device position, rounded
    # there) follows eager decode on an fp8 cache, and both differ from, yet stay near, the full-precision cache
    monkeypatch.setenv("SALACONVERT_KERNELS", kernels)
    hybrid = tiny_hybrid(HYBRIDS["sparse+lightning"])
    prompt, steps = SHORT
    ids = torch.randint(0, 128, (prompt + steps,), generator=torch.Generator().manual_seed(2))
    expected = _reference(hybrid, ids, make_hybrid_cache(hybrid.config, kv_dtype=FP8), prompt)
    _, got = _replayed(hybrid, ids, make_hybrid_cache(hybrid.config, reserve=prompt + steps, kv_dtype=FP8), prompt)
    plain = _reference(hybrid, ids, make_hybrid_cache(hybrid.config), prompt)
    for i, (g, e, p) in enumerate(zip(got, expected, plain)):
        assert_close(g, e, rtol=1e-5, what=f"{kernels} kernels, fp8 cache: logits at position {prompt + i - 1}")
        assert_close(g, p, rtol=0.1, what=f"fp8 vs full-precision cache at position {prompt + i - 1}")
    assert max(float((g - p).abs().max()) for g, p in zip(got, plain)) > 1e-4, "the fp8 cache rounded nothing"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_teacher_captured_step_follows_eager_decode(arch, monkeypatch):
    teacher = tiny_teacher(arch)
    ids = torch.randint(0, 128, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(2))
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "salaconvert_decode",
                        lambda *a, **kw: calls.append(1) or grouped_decode_attention(*a, **kw))
    expected = _reference(teacher, ids, DynamicCache(config=teacher.config))
    _, got = _replayed(teacher, ids, make_teacher_cache(teacher.config, PROMPT + STEPS))
    # fp32; one-token grouped attention over the masked reserve vs SDPA over the tokens so far.
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, rtol=1e-5, what=f"{arch} teacher: logits at position {PROMPT + i - 1}")
    assert len(calls) == STEPS * teacher.config.num_hidden_layers  # every step, every layer: no K/V repeat
    assert teacher.config._attn_implementation == "sdpa"  # the decode attention was only borrowed


def test_grouped_decode_attention_equals_masked_attention_over_repeated_kv():
    B, Hq, Hkv, S, d = 2, 6, 2, 11, 8
    q, k, v = torch.randn(B, Hq, 1, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    mask = (torch.arange(S) <= 6).view(1, 1, 1, S)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
    got, _ = grouped_decode_attention(None, q, k, v, mask, scaling=0.3)
    assert_close(got, expected.transpose(1, 2), rtol=1e-6, what="grouped decode attention")


@pytest.mark.parametrize("which", ["hybrid", "teacher"])
def test_step_keeps_the_bookkeeping_and_eager_decode_continues_after_close(which):
    model = tiny_hybrid(HYBRIDS["with a full-attention layer"]) if which == "hybrid" else tiny_teacher("qwen2")
    ids = torch.randint(0, 128, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(3))
    fresh = make_hybrid_cache(model.config) if which == "hybrid" else DynamicCache(config=model.config)
    expected = _reference(model, ids, fresh)
    reserved = (make_hybrid_cache(model.config, reserve=PROMPT + STEPS) if which == "hybrid"
                else make_teacher_cache(model.config, PROMPT + STEPS))
    logits, cache = prefill(model, ids[:PROMPT], cache=reserved)
    decoder = GraphDecoder(model, cache)  # on the CPU: no graph, the same forward
    assert decoder.graph is None
    for i, token in enumerate(ids[PROMPT:PROMPT + STEPS - 1].tolist()):
        logits = decoder.step(token)[0]
        assert_close(logits, expected[i + 1], rtol=1e-5, what=f"{which}: step {i}")
        assert cache.get_seq_length() == decoder.length == PROMPT + i + 1
    decoder.close()
    logits, cache = decode_step(model, int(ids[PROMPT + STEPS - 1]), cache)  # eager, on the same cache
    assert_close(logits, expected[STEPS], rtol=1e-5, what=f"{which}: eager step after graph decode")
    assert cache.get_seq_length() == PROMPT + STEPS
    with pytest.raises(ValueError, match="cache full"):
        GraphDecoder(model, cache).step(0)


def test_decoder_refuses_a_cache_it_cannot_drive():
    teacher = tiny_teacher("llama")
    _, cache = prefill(teacher, torch.arange(5))  # a DynamicCache: grows, so no graph
    with pytest.raises(ValueError, match="cannot drive"):
        GraphDecoder(teacher, cache)
    with pytest.raises(ValueError, match="full-attention layers only"):
        make_teacher_cache(tiny_teacher("mistral", sliding_window=4).config, 8)
    windowed = convert(tiny_teacher("mistral", sliding_window=4), LayerPlan(HYBRIDS["with a full-attention layer"]),
                       sparse=SMALL_SPARSE)
    _, cache = prefill(windowed, torch.arange(5), cache=make_hybrid_cache(windowed.config, reserve=8))
    with pytest.raises(ValueError, match="sliding window"):
        GraphDecoder(windowed, cache)


def test_bench_report_lists_rows_decoded_without_a_graph_on_a_graph_run():
    from salaconvert.bench.report import markdown
    from salaconvert.bench.run import CUDA_GRAPHS_USED

    row = {"prefill_s": 1.0, "prefill_tokens_per_s": 1.0, "decode_ms_per_token": 1.0, "cache_bytes": 1}
    report = {"model": "m", "teacher": "t", "device": "cuda", "dtype": "bfloat16", "date": "d",
              "settings": {"chunk": 32, "decode_tokens": 2, "repeats": 1}, "cuda_graphs": CUDA_GRAPHS_USED,
              "results": {"teacher": {"rows": [{"length": 64, "decode": "eager", **row}]},
                          "hybrid": {"rows": [{"length": 64, "decode": "cuda graph", **row}]}},
              "versions": {"salaconvert": "0", "torch": "0", "transformers": "0"}}
    md = markdown(report)
    assert "CUDA graphs: used" in md
    listed = md.split("Decoded eagerly")[1].split("\n\n")[0].splitlines()[1:]
    assert listed == ["- teacher at 64"]


@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_generate_through_the_decoder_equals_transformers_generate(which):
    from salaconvert.generate import generate_text
    from tiny import tiny_tokenizer

    model = tiny_teacher("llama") if which == "teacher" else tiny_hybrid(
        ["sparse_attention", "linear_attention", "full_attention", "linear_attention"])
    tok = tiny_tokenizer()
    prompt = "The quick brown fox jumps over the lazy dog, twice."  # past dense_len: the sparse path decodes
    ours = generate_text(model, tok, prompt, max_new_tokens=12, graph_decode=True)
    ref = generate_text(model, tok, prompt, max_new_tokens=12, graph_decode=False)
    assert ours["decode"] == "decoder step, eager" and ref["decode"] == "transformers"
    assert ours["new_tokens"] == ref["new_tokens"] == 12
    assert ours["text"] == ref["text"]


def test_generate_stops_after_end_of_sequence_as_transformers_does():
    from salaconvert.generate import generate_text
    from tiny import tiny_tokenizer

    model, tok = tiny_hybrid(["sparse_attention", "linear_attention", "full_attention", "linear_attention"]), tiny_tokenizer()
    prompt = tok("abc", return_tensors="pt")["input_ids"]
    free = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    model.generation_config.eos_token_id = free[2]  # now the third new token ends the sequence ...
    expected = free.index(free[2]) + 1  # ... or an earlier one, if it came already
    for graph in (True, False):
        stopped = generate_text(model, tok, "abc", max_new_tokens=6, graph_decode=graph)
        assert stopped["new_tokens"] == expected < 6, (graph, stopped, free)
