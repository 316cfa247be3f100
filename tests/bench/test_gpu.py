"""On the device: bench and eval's forward paths on a tiny hybrid whose sparse layers go sparse at
short lengths, so the Triton kernels (prefill in chunks, decode) run under the measurements."""
import pytest
import torch

from helpers import assert_close
from salaconvert.bench.run import BenchSettings, bench_model
from salaconvert.eval.forward import token_nll
from salaconvert.layer_selection.plan import LayerPlan
from salaconvert.surgery.convert import convert
from tiny import GPU_SPARSE, tiny_teacher

pytestmark = pytest.mark.gpu


@pytest.fixture
def hybrid():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    types = ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    return convert(tiny_teacher("llama"), LayerPlan(types), sparse=GPU_SPARSE).to("cuda", torch.bfloat16).eval()


def test_bench_on_cuda_reports_peak_memory_and_growing_cache(hybrid):
    result = bench_model(hybrid, BenchSettings([64, 256], decode_tokens=4, chunk=48, repeats=2).validate())
    small, large = result["rows"]
    assert all("error" not in r for r in result["rows"]), result["rows"]
    assert large["peak_memory_bytes"] > 0 and large["cache_bytes"] > small["cache_bytes"]
    assert large["decode_ms_per_token"] > 0
    assert large["prefill_compiles"] == [], "the warm-up left kernels to compile inside a timed prefill"


def test_triton_compiles_sees_a_real_compile():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import random

    import triton
    import triton.language as tl

    from salaconvert.bench.run import triton_compiles

    @triton.jit
    def _fill(x, V: tl.constexpr):
        tl.store(x + tl.arange(0, 16), tl.full([16], V, tl.float32))

    x = torch.empty(16, device="cuda")
    value = random.randrange(1 << 20)  # a variant no earlier run has built
    with triton_compiles() as found:
        _fill[(1,)](x, V=value)
        _fill[(1,)](x, V=value)  # built once
    assert [name.split(".")[-1] for name, _ in found] == ["_fill"] and (x == value).all()


def test_chunked_token_loss_equals_one_pass_on_cuda(hybrid):
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))
    # bf16 activations, and chunking changes the order of the Lightning and sparse reductions.
    assert_close(token_nll(hybrid, ids, chunk=64), token_nll(hybrid, ids, chunk=200), rtol=2e-2,
                 what="chunked vs one-pass token loss (bf16, CUDA)")
