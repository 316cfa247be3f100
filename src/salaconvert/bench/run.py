"""`salaconvert bench` as a library function: speed and memory against context length, teacher
and hybrid in the same run, one model in memory at a time.

For each length L: prefill L random token ids (seeded; speed does not depend on the text) in
chunks sharing one cache, then decode `decode_tokens` tokens one at a time, greedily.
  prefill_s            wall time of the whole chunked prefill (synchronized on GPU)
  decode_ms_per_token  median over the decode steps
  cache_bytes          bytes of the actual cache tensors after prefill (K/V, Lightning states,
                       compressed keys), as allocated: a growable buffer counts its whole capacity
  peak_memory_bytes    GPU: torch.cuda.max_memory_allocated over prefill + decode (weights included)
  rss_bytes            CPU: the process's resident memory after decode; peak_rss_bytes is the
                       process's peak so far (monotone over the run, so only its growth is telling).
                       Models run one after the other in one process, so the second one's RSS
                       also holds what the allocator kept from the first
  decode               "cuda graph" or "eager": how the decode steps ran
  graph_capture_s      CUDA: seconds to warm up and capture the decode graph (not in the decode timings)
  prefill_compiles     Triton kernels compiled (or loaded from Triton's disk cache) inside the timed
                       prefill, with their seconds: a warm run lists none; any listed inflate prefill_s
On CUDA, decode replays a CUDA graph of the whole model's one-token step
(salaconvert.models.graph_decode), teacher and hybrid alike: their caches are reserved for the
whole run before prefill (the teacher's K/V allocated once instead of grown by concatenation), so
a step writes at a device position and the graph replays at every length. A teacher whose cache
cannot be reserved (sliding-window layers) decodes eagerly on its DynamicCache; its rows say so.
On the CPU decode is eager.
"""
import contextlib
import gc
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from salaconvert.errors import InputError
from salaconvert.eval.forward import DEFAULT_CHUNK, cache_nbytes, decode_step, prefill
from salaconvert.eval.run import check_out_dir, default_device, default_dtype
from salaconvert.models.cache import KV_DTYPES, reserved_cache
from salaconvert.models.graph_decode import GraphDecoder

CUDA_GRAPHS_USED = ("used: decode replays a CUDA graph of the whole model's one-token step, captured once per "
                    "length on a cache reserved for the whole run (a row's `decode` says eager where a cache "
                    "could not be reserved)")
CUDA_GRAPHS_UNUSED = "not used: a CPU run, decode is eager"


@dataclass
class BenchSettings:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    decode_tokens: int = 16
    chunk: int = DEFAULT_CHUNK
    repeats: int = 1  # runs per length; the last is reported
    seed: int = 0
    time_budget_s: float | None = None  # per model: lengths not started by then are skipped
    kv_cache: str = "auto"  # a hybrid's sparse K/V storage: "auto" (the model's dtype) or "fp8" (models.cache)

    def validate(self) -> "BenchSettings":
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise InputError(f"--lengths: every length must be a positive token count, got {self.lengths}")
        if self.decode_tokens < 1 or self.chunk < 1 or self.repeats < 1:
            raise InputError("--decode-tokens, --chunk and --repeats must be positive")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise InputError(f"--time-budget {self.time_budget_s}: must be positive")
        if self.kv_cache not in KV_DTYPES:
            raise InputError(f"--kv-cache {self.kv_cache}: choose one of {', '.join(KV_DTYPES)}")
        self.lengths = sorted(set(self.lengths))
        return self


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure(model, length: int, settings: BenchSettings) -> dict:
    """One prefill + decode at `length`; see the module docstring for the fields."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(settings.seed + length)
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=gen)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    graph = device.type == "cuda"
    try:
        cache = _reserved_cache(model, length + settings.decode_tokens, graph, KV_DTYPES[settings.kv_cache])
    except ValueError:  # a teacher whose layers cannot be reserved: eager decode on its own cache
        cache, graph = None, False
    _sync(device)
    with triton_compiles() as compiles:
        t0 = time.perf_counter()
        logits, cache = prefill(model, ids, settings.chunk, cache=cache)
        _sync(device)
        prefill_s = time.perf_counter() - t0
    cache_after_prefill = cache_nbytes(cache)
    row = {"length": length, "prefill_s": prefill_s, "prefill_tokens_per_s": length / prefill_s,
           "decode": "cuda graph" if graph else "eager", "prefill_compiles": compiles}
    if graph:
        t = time.perf_counter()
        decoder = GraphDecoder(model, cache)
        _sync(device)
        row["graph_capture_s"] = time.perf_counter() - t
        step = decoder.step
    else:
        def step(token):
            nonlocal cache
            logits, cache = decode_step(model, token, cache)
            return logits
    steps = []
    token = int(logits.argmax())
    for _ in range(settings.decode_tokens):
        t = time.perf_counter()
        token = int(step(token).argmax())  # .item() synchronizes, so the step is fully timed
        steps.append(time.perf_counter() - t)
    row.update({
        "decode_ms_per_token": statistics.median(steps) * 1e3,
        "decode_ms_mean": statistics.fmean(steps) * 1e3,
        "cache_bytes": cache_after_prefill,
        "cache_bytes_after_decode": cache_nbytes(cache),
    })
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        row["rss_bytes"] = rss_bytes()
        row["peak_rss_bytes"] = peak_rss_bytes()
    del cache
    return row


@contextlib.contextmanager
def triton_compiles():
    """For the duration, the list of [kernel name, seconds] of every Triton compile (a kernel
    variant this process had not built yet, from scratch or from Triton's disk cache)."""
    from triton import knobs

    found, started = [], []

    def before(**_):
        started.append(time.perf_counter())
        return False  # True would skip the compile

    def after(*, fn, **_):
        found.append([fn.name, round(time.perf_counter() - started.pop(), 3)])

    saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        yield found
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved


def _reserved_cache(model, tokens: int, graph: bool = False, kv_dtype=None):
    """A cache with room for the whole run of `tokens`: a hybrid's always (sparse K/V in kv_dtype),
    a teacher's for graph decode (raises ValueError where it cannot be reserved); None otherwise
    (the teacher makes its own)."""
    hybrid = getattr(model.config, "model_type", None) == "sala_hybrid"
    if not graph and not hybrid:
        return None
    return reserved_cache(model, tokens, kv_dtype if hybrid else None)


# Queries of warm_sparse_path's kernel calls: at least the tallest tile of any stage at any group
# (select.SELECT_ROWS, parallel.FORCED_ROWS: 128 tokens at group 1).
WARM_QUERIES = 256


def warm_sparse_path(model, max_len: int, chunk: int, kv_cache: str = "auto") -> None:
    """Compile a hybrid's sparse-attention kernels before anything is timed.

    Past `dense_len` the sparse layers run InfLLM-V2's stages 1 and 2, compiled on first use, and
    stage 1's top-k holds a whole row of block scores in registers, so each power-of-two row width
    is a kernel of its own that a chunked prefill meets at every doubling of its prefix. Left cold,
    those compiles land inside timed prefills (about 4 s of a 256K one on an H100). So: one short
    prefill across `dense_len`, then a selection at every width up to `max_len`, and one attention
    at the length where stage 2 turns block-major (parallel.BY_BLOCK_MIN_KEYS), both with
    WARM_QUERIES queries: a tile never holds more tokens than the call has queries, and each tile
    height is a kernel of its own (16 queries left the 8B hybrid's forced walk, 32 tokens a tile,
    to compile inside its timed 32K prefill: 1.3 s on an H100, long_context run 58).
    Nothing for a teacher, off the Triton path, or when no length passes `dense_len`.
    """
    from salaconvert.kernels.dispatch import use_triton
    from salaconvert.kernels.infllmv2 import infllmv2_attn, infllmv2_select, parallel
    from salaconvert.layers.sparse import KERNEL_KEYS

    cfg = model.config
    p = next(model.parameters())
    if "sparse_attention" not in (getattr(cfg, "layer_types", None) or []) or not use_triton(p):
        return
    dense_len = cfg.sparse["dense_len"]
    if max_len <= dense_len:
        return
    n = min(2 * dense_len + 1024, max_len)
    measure(model, n, BenchSettings([n], 2, min(chunk, n // 2), kv_cache=kv_cache))
    kw = {name: cfg.sparse[name] for name in KERNEL_KEYS}

    def rand(tokens, heads):
        return torch.randn(1, tokens, heads, cfg.head_dim, device=p.device, dtype=p.dtype)

    width = 2 * dense_len
    while width < 2 * max_len:
        keys = min(width, max_len)
        infllmv2_select(rand(min(WARM_QUERIES, keys), cfg.num_attention_heads), rand(keys, cfg.num_key_value_heads),
                        **kw)
        width *= 2
    if max_len >= max(parallel.BY_BLOCK_MIN_KEYS, dense_len + 1):
        keys = max(parallel.BY_BLOCK_MIN_KEYS, dense_len + 1)
        k = rand(keys, cfg.num_key_value_heads)
        with torch.no_grad():
            infllmv2_attn(rand(min(WARM_QUERIES, keys), cfg.num_attention_heads), k, k, **kw)


def bench_model(model, settings: BenchSettings, step=lambda what: None) -> dict:
    """Every length on one loaded model, shortest first. Lengths past the first out-of-memory, or
    not started within the time budget, are skipped; a length that fails otherwise (a kernel
    error) is recorded with its error and the others still run."""
    device = next(model.parameters()).device
    deadline = time.monotonic() + settings.time_budget_s if settings.time_budget_s else None
    step("warm-up")
    measure(model, min(settings.chunk, settings.lengths[0]), BenchSettings([1], 2, settings.chunk, seed=settings.seed))
    warm_sparse_path(model, max(settings.lengths), settings.chunk, settings.kv_cache)
    rows, failed = [], None
    for n in settings.lengths:
        if failed or (deadline is not None and time.monotonic() > deadline):
            rows.append({"length": n, "skipped": f"after out of memory at {failed}" if failed else "time budget"})
            continue
        step(f"{n} tokens")
        try:
            for _ in range(settings.repeats):
                row = measure(model, n, settings)
            rows.append(row)
        except torch.OutOfMemoryError:
            failed = n
            rows.append({"length": n, "error": "out of memory"})
        except Exception as e:  # noqa: BLE001  (recorded in the report; the other lengths still run)
            rows.append({"length": n, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"})
        if "error" in rows[-1]:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    weights = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return {"rows": rows, "weight_bytes": weights, "cache_per_token": _config_cache(model)}


def _config_cache(model) -> dict | None:
    """The hybrid config's own cache arithmetic, to check the measured bytes against."""
    cfg = model.config
    if not hasattr(cfg, "cache_bytes_per_token"):
        return None
    return cfg.cache_bytes_per_token(next(model.parameters()).element_size())


def run_bench(model: str, teacher: str | None = None, settings: BenchSettings | None = None,
              out: str | Path = ".", dtype: str = "auto", device: str | None = None, step=lambda what: None) -> dict:
    """Benchmark `model` (and `teacher`) and write bench.json, bench.md and bench.png to `out`."""
    from salaconvert.bench.report import write_report
    from salaconvert.eval.run import _device_name, _versions
    from salaconvert.io.load import load_model, resolve_source

    t0 = time.perf_counter()
    settings = (settings or BenchSettings()).validate()
    out = check_out_dir(out)
    device = default_device(device)
    dtype = default_dtype(dtype, device)
    step("checking input")
    runs = [("teacher", resolve_source(teacher))] if teacher else []
    runs.append(("hybrid", resolve_source(model)))
    results = {}
    for label, source in runs:
        step(f"loading {label}")
        m = load_model(source, dtype, device)
        results[label] = bench_model(m, settings, lambda what, lb=label: step(f"{lb}: {what}"))
        del m
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report = {
        "model": model, "teacher": teacher, "device": _device_name(device), "dtype": dtype,
        "settings": asdict(settings), "results": results,
        "cuda_graphs": CUDA_GRAPHS_USED if device.startswith("cuda") else CUDA_GRAPHS_UNUSED,
        "versions": _versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.perf_counter() - t0,
    }
    step("writing report")
    report["files"] = write_report(report, out)
    return report
