"""On the device: a replayed CUDA graph decodes what eager decode does, for the hybrid (the Triton
decode kernels, across dense_len) and the teacher, and bench reports graph decode for both.

    TRITON_INTERPRET=0 PYTHONSAFEPATH=1 .venv/bin/pytest -m gpu tests/test_graph_decode_gpu.py -q
"""
import pytest
import torch
from transformers import DynamicCache

from helpers import assert_close
from salaconvert.bench.run import BenchSettings, bench_model
from salaconvert.eval.forward import decode_step, prefill
from salaconvert.models.cache import make_hybrid_cache, make_teacher_cache
from salaconvert.models.graph_decode import GraphDecoder
from tiny import GPU_SPARSE, tiny_hybrid, tiny_teacher

pytestmark = pytest.mark.gpu

PROMPT, STEPS = 36, 40  # positions 36..75: dense below dense_len = 48, block-sparse above
PLANS = {"hybrid": ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"],
         "hybrid with full attention": ["sparse_attention", "linear_attention", "full_attention", "sparse_attention"]}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _model(which: str, dtype):
    plan, _, gqa = which.partition(", lightning ")
    model = tiny_teacher("qwen3") if which == "teacher" else tiny_hybrid(PLANS[plan], sparse=GPU_SPARSE,
                                                                          lightning={"gqa": gqa == "gqa"})
    return model.to("cuda", dtype).eval()


def _greedy(model, prompt, graph: bool):
    """Greedy tokens and the logits that chose them, eager (growing cache) or replayed (reserved cache)."""
    hybrid = model.config.model_type == "sala_hybrid"
    if graph:
        cache = (make_hybrid_cache(model.config, reserve=PROMPT + STEPS, dtype=model.dtype, device="cuda") if hybrid
                 else make_teacher_cache(model.config, PROMPT + STEPS))
    else:
        cache = make_hybrid_cache(model.config) if hybrid else DynamicCache(config=model.config)
    logits, cache = prefill(model, prompt, cache=cache)
    decoder = GraphDecoder(model, cache) if graph else None
    if graph:
        assert decoder.graph is not None
    tokens, all_logits = [], [logits]
    for _ in range(STEPS):
        tokens.append(int(logits.argmax()))
        if graph:
            logits = decoder.step(tokens[-1])[0].clone()  # the graph's output buffer: the next replay overwrites it
        else:
            logits, cache = decode_step(model, tokens[-1], cache)
        all_logits.append(logits)
    return tokens, all_logits


@pytest.mark.parametrize("which", ["hybrid", "hybrid, lightning gqa", "hybrid with full attention", "teacher"])
def test_graph_replay_decodes_the_eager_greedy_tokens_and_logits(which):
    model = _model(which, torch.float32)
    prompt = torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(0))
    eager_tokens, eager_logits = _greedy(model, prompt, graph=False)
    graph_tokens, graph_logits = _greedy(model, prompt, graph=True)
    assert graph_tokens == eager_tokens
    # fp32 (TF32 dots in the Triton kernels); the graph's decode kernels split the capacity-sized
    # compressed-key buffer differently from eager's slice, and the teacher's grouped attention is
    # another SDPA kernel: the same math in another order.
    for i, (g, e) in enumerate(zip(graph_logits, eager_logits)):
        assert_close(g, e, rtol=1e-3, what=f"{which}: logits at position {PROMPT + i - 1}")


def test_bench_on_cuda_decodes_teacher_and_hybrid_through_graphs():
    settings = BenchSettings([64, 160], decode_tokens=4, chunk=48).validate()
    for which in ("teacher", "hybrid"):
        rows = bench_model(_model(which, torch.bfloat16), settings)["rows"]
        assert all(r.get("decode") == "cuda graph" and r["decode_ms_per_token"] > 0 for r in rows), rows
