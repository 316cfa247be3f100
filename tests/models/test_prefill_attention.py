"""Chunked prefill's attention: causal aligned to the last key, with no mask tensor, equals transformers' masked SDPA."""
import pytest
import torch

from helpers import assert_close
from salaconvert.eval.forward import prefill
from salaconvert.models import prefill_attention
from salaconvert.models.prefill_attention import chunk_causal_attention, lower_right_causal_sdpa
from tiny import tiny_hybrid, tiny_teacher


@pytest.mark.parametrize("T,S,Hq,Hkv", [(5, 5, 4, 4), (3, 11, 4, 2), (7, 20, 6, 2), (1, 9, 4, 1)])
def test_lower_right_causal_equals_the_explicit_reference(T, S, Hq, Hkv):
    g = torch.Generator().manual_seed(T * 100 + S)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    out, _ = lower_right_causal_sdpa(None, q, k, v, None)
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    scores = (q @ kk.transpose(-1, -2)) / 4.0
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    scores = scores.masked_fill(j > i + (S - T), float("-inf"))  # query i is token S − T + i
    ref = (scores.softmax(-1) @ vv).transpose(1, 2)
    assert out.shape == (2, T, Hq, 16)
    assert_close(out, ref, rtol=1e-6, what="lower-right causal attention")


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv", [(32, 8), (8, 8)])
def test_gpu_chunk_after_cached_keys_equals_the_explicit_reference(Hq, Hkv):
    """On the GPU the chunk case is two cuDNN calls on the K/V heads as they are (no repeat)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    T, S = 700, 3000
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, h, n, 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    out, _ = lower_right_causal_sdpa(None, q, k, v, None)
    kk, vv = (x.float().repeat_interleave(Hq // Hkv, 1) for x in (k, v))
    scores = (q.float() @ kk.transpose(-1, -2)) / 128 ** 0.5
    i, j = torch.arange(T, device="cuda")[:, None], torch.arange(S, device="cuda")[None, :]
    ref = (scores.masked_fill(j > i + (S - T), float("-inf")).softmax(-1) @ vv).transpose(1, 2)
    assert_close(out, ref, rtol=2e-2, what=f"chunk attention Hq={Hq} Hkv={Hkv}")


@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_chunked_prefill_logits_equal_one_full_forward(which):
    model = tiny_teacher("qwen3") if which == "teacher" else tiny_hybrid(
        ["full_attention", "linear_attention", "sparse_attention", "full_attention"], arch="qwen3")
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    chunks, calls = {}, []
    with torch.no_grad():
        full = model(ids[None]).logits[0].float()

    def spy(*args, **kwargs):
        calls.append(args[1].shape[2])  # the chunk's query length
        return lower_right_causal_sdpa(*args, **kwargs)

    prefill_attention.AttentionInterface.register(prefill_attention._ATTENTION, spy)
    try:
        prefill(model, ids, chunk=9, on_logits=lambda start, logits: chunks.__setitem__(start, logits))
    finally:
        prefill_attention.AttentionInterface.register(prefill_attention._ATTENTION, lower_right_causal_sdpa)
    got = torch.cat([chunks[s] for s in sorted(chunks)])
    assert_close(got, full, rtol=1e-5, what=f"{which}: chunked prefill logits")
    assert calls and set(calls) == {9, 4}  # every full-attention layer of every chunk went through it
    assert model.model.config._attn_implementation == "sdpa"  # switched back afterwards


def test_models_it_cannot_serve_keep_their_attention():
    windowed = tiny_teacher("mistral", sliding_window=8)
    with chunk_causal_attention(windowed):
        assert windowed.model.config._attn_implementation == "sdpa"
    eager = tiny_teacher("llama")
    eager.config._attn_implementation = "eager"
    with chunk_causal_attention(eager):
        assert eager.model.config._attn_implementation == "eager"


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,Hq,Hkv,dtype", [(300, 300, 8, 2, torch.bfloat16), (256, 1000, 8, 2, torch.bfloat16),
                                             (129, 4097, 4, 4, torch.bfloat16), (1, 777, 8, 1, torch.bfloat16),
                                             (1, 777, 8, 1, torch.float32), (100, 300, 4, 2, torch.float32)])
def test_chunk_attention_on_the_gpu_equals_the_fp32_reference(T, S, Hq, Hkv, dtype):
    """On a GPU the chunk case runs cuDNN twice and merges by log-sum-exp (Hopper, fp16/bf16) or
    SDPA with a lower-right bias (fp32 included): output against the fp32 masked reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(T + S)
    q, k, v = (torch.randn(1, h, n, 128, device="cuda", generator=g) for h, n in ((Hq, T), (Hkv, S), (Hkv, S)))
    out, _ = lower_right_causal_sdpa(None, *(x.to(dtype) for x in (q, k, v)), None)
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    mask = torch.ones(T, S, dtype=torch.bool, device="cuda").tril(S - T)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)
    assert_close(out.float(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-3, what=f"chunk attention ({dtype})")
