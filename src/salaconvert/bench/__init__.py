"""`salaconvert bench`: prefill latency, decode ms/token, cache bytes and peak memory against
context length, teacher and hybrid in the same run (SPEC §7)."""
from salaconvert.bench.run import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
