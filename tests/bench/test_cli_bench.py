"""`salaconvert bench` on a tiny hybrid beside its teacher: the report files exist and parse;
bad input → exit 2, one line."""
import json

import pytest

from tiny import save_tiny_teacher, tiny_tokenizer
from helpers import run_cli


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny teacher directory and its converted hybrid, whose sidecar names the teacher."""
    from salaconvert.io.checkpoint import save_checkpoint
    from salaconvert.io.load import load_model, resolve_source
    from salaconvert.layer_selection.plan import LayerPlan
    from salaconvert.surgery.convert import convert

    root = tmp_path_factory.mktemp("bench")
    teacher_dir = save_tiny_teacher(root / "teacher")
    plan = LayerPlan(["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"])
    hybrid = convert(load_model(resolve_source(str(teacher_dir))), plan)
    save_checkpoint(hybrid, tiny_tokenizer(), root / "hybrid", {"source": {"model": str(teacher_dir)}})
    return teacher_dir, root / "hybrid"


def test_bench_writes_json_markdown_and_plot(dirs, tmp_path):
    teacher_dir, hybrid_dir = dirs
    result = run_cli("bench", hybrid_dir, "--teacher", teacher_dir, "--lengths", "32,96", "--decode-tokens", "3", "--repeats", "2",
                  "--chunk", "64", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "not used" in report["cuda_graphs"]
    t, h = (report["results"][k]["rows"] for k in ("teacher", "hybrid"))
    assert [r["length"] for r in t] == [32, 96] == [r["length"] for r in h]
    for row in t + h:
        assert row["prefill_s"] > 0 and row["decode_ms_per_token"] > 0 and row["rss_bytes"] > 0
    # Teacher: K and V of 4 layers x 2 heads x 16 dims in float32 per token, exactly (DynamicCache).
    # Hybrid: at least the K/V of its two sparse layers plus two fixed 4-head 16x16 float32
    # Lightning states; its sparse cache is a growable buffer, so it may hold more (capacity).
    assert t[1]["cache_bytes"] == 96 * 4 * 2 * 2 * 16 * 4
    assert 96 * 2 * 2 * 2 * 16 * 4 + 2 * 4 * 16 * 16 * 4 <= h[1]["cache_bytes"] < t[1]["cache_bytes"]
    md = (tmp_path / "bench.md").read_text()
    assert "| teacher | 96 |" in md and "| hybrid | 32 |" in md
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args", [["--lengths", "12x"], ["--lengths", ""], ["--teacher", "/no/such/model"],
                                  ["--decode-tokens", "0"], ["--threads", "0"]])
def test_bad_input_exits_2_with_one_line(dirs, tmp_path, args):
    result = run_cli("bench", dirs[1], "--out", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_a_failing_length_is_recorded_and_the_others_still_run():
    import torch

    from salaconvert.bench.report import markdown
    from salaconvert.bench.run import BenchSettings, bench_model
    from salaconvert.models.cache import cache_argument
    from tiny import tiny_teacher

    class FailsPast64(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_teacher("llama")
            self.config = self.inner.config

        def forward(self, input_ids, past_key_values=None, **kw):
            seen = 0 if past_key_values is None else past_key_values.get_seq_length()
            if seen + input_ids.shape[1] > 64:
                raise RuntimeError("kernel said no")
            return self.inner(input_ids=input_ids, **{cache_argument(self.inner): past_key_values}, **kw)

    result = bench_model(FailsPast64(), BenchSettings([16, 96, 32], decode_tokens=2, chunk=32).validate())
    rows = {r["length"]: r for r in result["rows"]}
    assert "kernel said no" in rows[96]["error"] and rows[16]["prefill_s"] > 0 and rows[32]["prefill_s"] > 0
    report = {"model": "m", "teacher": None, "device": "cpu", "dtype": "float32", "date": "d",
              "settings": {"chunk": 32, "decode_tokens": 2, "repeats": 1}, "cuda_graphs": "no",
              "results": {"hybrid": result}, "versions": {"salaconvert": "0", "torch": "0", "transformers": "0"}}
    md = markdown(report)
    assert "| hybrid | 96 | failed |" in md and "kernel said no" in md
    assert "compiled kernels inside" not in md  # none on the CPU
    rows[32]["prefill_compiles"] = [["_select_scores_kernel", 1.25], ["_merge_kernel", 0.5]]
    assert "- hybrid at 32: 1.75 s (_merge_kernel, _select_scores_kernel)" in markdown(report)


def test_warm_sparse_path_compiles_the_sparse_path_at_every_selection_width(monkeypatch):
    # the Triton path (here through the interpreter): one prefill across dense_len, then a stage-1
    # call at every power-of-two row width up to the longest length and one stage-2 call where it
    # turns block-major; nothing on the torch path
    import salaconvert.kernels.infllmv2 as infllmv2
    from salaconvert.bench import run as bench_run
    from salaconvert.kernels.infllmv2 import parallel
    from tiny import GPU_SPARSE, tiny_hybrid

    widths, prefills = [], []
    real_select, real_measure = infllmv2.infllmv2_select, bench_run.measure
    monkeypatch.setattr(infllmv2, "infllmv2_select",
                        lambda q, k, **kw: widths.append((q.shape[1], k.shape[1])) or real_select(q, k, **kw))
    monkeypatch.setattr(bench_run, "measure", lambda m, n, s: prefills.append((n, s.chunk)) or real_measure(m, n, s))
    hybrid = tiny_hybrid(["sparse_attention"] + ["linear_attention"] * 3, sparse=GPU_SPARSE)  # dense_len 48
    monkeypatch.setenv("SALACONVERT_KERNELS", "torch")
    bench_run.warm_sparse_path(hybrid, 200, 64)
    assert widths == [] and prefills == []
    monkeypatch.setenv("SALACONVERT_KERNELS", "triton")
    bench_run.warm_sparse_path(hybrid, 40, 64)  # no length past dense_len
    assert widths == [] and prefills == []
    attns = []
    real_attn = infllmv2.infllmv2_attn
    monkeypatch.setattr(infllmv2, "infllmv2_attn",
                        lambda q, k, v, **kw: attns.append((q.shape[1], k.shape[1])) or real_attn(q, k, v, **kw))
    monkeypatch.setattr(parallel, "BY_BLOCK_MIN_KEYS", 100)
    monkeypatch.setattr(bench_run, "WARM_QUERIES", 128)
    bench_run.warm_sparse_path(hybrid, 200, 64)
    assert prefills == [(200, 64)]
    assert widths == [(96, 96), (128, 192), (128, 200)]  # (queries, keys): at most WARM_QUERIES
    assert attns == [(100, 100)]  # stage 2's block-major part (by_block.py) at the length where it starts


def test_warm_queries_fill_the_tallest_tile_of_every_stage():
    # each tile height is a kernel of its own, and a tile holds at most the call's queries: the
    # warm-up's calls must reach the heights a long chunk's tiles have, at every group size
    from salaconvert.bench.run import WARM_QUERIES
    from salaconvert.kernels.infllmv2 import parallel, select
    from salaconvert.kernels.infllmv2.layout import next_pow2

    for G in (1, 2, 3, 4, 8, 16):
        GP = next_pow2(G)
        for tokens in (parallel.ATTN_TOKENS, max(1, parallel.FORCED_ROWS // GP)):
            assert parallel._tile_tokens(G, WARM_QUERIES, tokens) == parallel._tile_tokens(G, 1 << 20, tokens)
        assert next_pow2(WARM_QUERIES) >= select.SELECT_ROWS // GP


def test_triton_compiles_lists_what_triton_compiles_inside_and_puts_the_hooks_back():
    from types import SimpleNamespace

    from triton import knobs

    from salaconvert.bench.run import triton_compiles

    before = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    hook = dict(key="k", repr="", compile={}, is_manual_warmup=False, already_compiled=False)  # knobs.JITHook
    with triton_compiles() as found:
        assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_demo_kernel"), **hook) is False  # compile goes on
        knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name="_demo_kernel"), **hook)
    assert [name for name, _ in found] == ["_demo_kernel"] and found[0][1] >= 0
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
