"""What the InfLLM-V2 selection kernels compile to on an H100, without an H100.

    python benchmarks/sass_stats.py [--out DIR]   # on any machine with Triton: no GPU needed

Compiles stage 1's scoring kernel (`select._select_scores_kernel`, groups 16 and 4, d = 128,
bf16, the SPEC's 64/32/16 windows and the current knobs), the radix top-k at 2048 blocks and
stage 2's forward, dq and dk/dv kernels (`parallel`, 96 blocks, groups 16 and 4) and the
block-major inference forward's partial and merge kernels (`by_block`) for sm90 on the CPU: `triton.compile` with a `GPUTarget`, then the `cuobjdump`, `nvdisasm` and `ptxas` that ship
in Triton's wheel. Reports per kernel: registers, spill stack, shared memory, whether ptxas
serialised its wgmmas (its C7515 note: one instruction outside the wgmma pipeline that writes an
accumulator makes every wgmma of the kernel wait for the previous one), and for every
loop of the SASS (a backward branch) its instruction count per thread and the commonest opcodes,
so a change to a kernel can be judged by what it issues before any GPU time is spent. The
launch-time specialisations that matter (16-byte divisibility of pointers and strides) are given
as the runtime would give them. Reading with Triton 3.6 (`results/sass_stats-sm90.json`): the
scoring kernel's unmasked loops issue 230 (pass 1) and 350 (pass 2) instructions per thread per
64-key step, 90 registers, no spills; before the sixth session's rewrite, 257 + 590 and 165.
Stage 2's forward and dq kernels had their wgmmas serialised (C7515) until the seventh session
merged their two block loops into one; since the eighth session's per-program K/V offsets and
eager rescale the forward issues 502 instructions per thread per block step at group 16 (590
before). The dk/dv kernel spilled 152-192 bytes on 4 warps; on 8 (the
default since run 24) it holds 250-255 registers and spills at most 16 bytes. The block-major
merge kernel (ninth session) holds 183 / 203 registers at groups 4 / 16 on its 8 warps, so one
program per SM, and issues 496 instructions per thread per merged partial, much of it the
[rows × d] rescale of the accumulator; a pass over the partials' log-sum-exps first (then no
rescale: 294 instructions) measured slower on the GPU (notes-infllmv2.md, runs 46-50). The
partials' kernel issued 1,104 instructions per 64-row step at group 4 before the thirteenth
session dropped its masks on whole blocks and its per-element division (646, at its 168-register cap).
The radix top-k's counting pass issued 83 instructions per thread at 2,048 scores (a compare, a select
and bit-packing per key) before the fourteenth session's offset passes (62: a subtraction and a
shift-add); the forced walk, 639 per 64-key step on 64 rows before its two-block steps (852 per
128-key step on 128 rows, masks included, of which 236 only run on the steps that need masks).
"""
import argparse
import collections
import inspect
import json
import os
import re
import subprocess
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from salaconvert.kernels.infllmv2 import by_block, parallel, select  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# arguments the launcher specialises as multiples of 16 at the benchmark shapes
DIVISIBLE = {"stride_qt", "stride_kct", "stride_knt", "stride_st", "NBMAX", "row0", "NB", "stride_s", "stride_o",
             "stride_kt", "stride_it", "U", "Hq"}


def compile_sm90(fn, types: dict, constants: dict, num_warps: int, num_stages: int = 3, maxnreg: int | None = None):
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in DIVISIBLE}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=SM90, options=options)


def sass_report(kernel, work: Path, name: str) -> dict:
    cubin = work / f"{name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    sass = subprocess.run([BIN / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    ptx = work / f"{name}.ptx"
    ptx.write_text(kernel.asm["ptx"])
    ptxas = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", ptx, "-o", work / f"{name}.ptxas.cubin"],
                           capture_output=True, text=True)
    return {"registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": kernel.metadata.shared, "wgmma_serialized": "C7515" in ptxas.stdout + ptxas.stderr,
            "loops": _loops(sass)}


def _loops(sass: str) -> list[dict]:
    """Each backward branch's body: instructions per thread per trip and the commonest opcodes."""
    code, labels, pending = [], {}, None
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if ins:
            addr = int(ins.group(1), 16)
            if pending:
                labels[pending], pending = addr, None
            code.append((addr, ins.group(2).strip()))
    loops = []
    for addr, text in code:
        target = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", text)
        if target and labels.get(target.group(1), addr + 1) < addr:
            body = [t for a, t in code if labels[target.group(1)] <= a <= addr]
            ops = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0] for t in body)
            loops.append({"instructions": len(body), "top": dict(ops.most_common(8))})
    return loops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write DIR/sass_stats-sm90.json")
    args = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "salaconvert-sass"
    work.mkdir(parents=True, exist_ok=True)
    ptrs = {"q": "*bf16", "kc": "*bf16", "kn": "*bf16", "scores": "*fp32", "tile_n": "*i32", "tile_i": "*i32",
            "q_start": "*i64", "kc_start": "*i64", "kn_start": "*i64", "seq_Tq": "*i32", "seq_Tk": "*i32",
            "seq_Tc": "*i32", "seq_Tn": "*i32", "scale_log2": "fp32"}
    R, E = select.pool_shape(64, 32, 16)
    report = {"triton": triton.__version__, "target": "sm90",
              "knobs": {k: getattr(select, k) for k in ("SELECT_BC", "SELECT_ROWS", "SELECT_WARPS", "SELECT_STAGES")}}
    for G in (16, 4):
        GP = triton.next_power_of_2(G)
        BT = max(1, select.SELECT_ROWS // GP)
        constants = dict(G=G, GP=GP, BT=BT, D=128, BC=select.SELECT_BC, R=R, E=E, BS=64, KS=32, ST=16, NKS=32, NST=16,
                         INIT=1, LOCAL=32, HALF=select.row_order(GP, BT * GP))
        kernel = compile_sm90(select._select_scores_kernel, ptrs, constants, select.SELECT_WARPS, select.SELECT_STAGES)
        report[f"select_scores_G{G}"] = sass_report(kernel, work, f"select_G{G}")
    radix = compile_sm90(select._radix_topk_kernel, {"scores": "*fp32", "out": "*i32"}, dict(R=1, BLOCK=2048),
                         num_warps=min(select.RADIX_WARPS_MAX, 2048 // (32 * select.RADIX_PER_THREAD)))
    report["radix_topk_2048"] = sass_report(radix, work, "radix")
    attn = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "lse": "*fp32", "idx": "*i32", "tile_n": "*i32",
            "tile_i": "*i32", "q_start": "*i64", "k_start": "*i64", "seq_Tq": "*i32", "seq_Tk": "*i32",
            "u_blk": "*i32", "u_bits": "*i32", "u_len": "*i32", "scale_log2": "fp32"}
    grads = {"do": "*bf16", "dq": "*bf16", "dk": "*fp32", "dv": "*fp32", "delta": "*fp32", "scale": "fp32",
             "tok_list": "*i32", "seg_h": "*i32", "seg_n": "*i32", "seg_b": "*i32", "seg_lo": "*i64", "seg_hi": "*i64"}
    for G in (16, 4):
        GP = triton.next_power_of_2(G)
        BT = min(16, max(1, parallel.ATTN_ROWS // GP))
        shape = dict(G=G, GP=GP, BT=BT, D=128, BS=64, K=96)
        kernel = compile_sm90(parallel._fwd_kernel, attn, dict(shape, FORCED=False, INIT=0, LOCAL=0),
                              parallel.ATTN_WARPS, parallel.ATTN_STAGES)
        report[f"stage2_fwd_G{G}"] = sass_report(kernel, work, f"fwd_G{G}")
        forced = dict(shape, BT=max(1, parallel.FORCED_ROWS // GP), K=1, FORCED=True, INIT=1, LOCAL=32,
                      W=max(parallel.FORCED_KEYS, 64))
        kernel = compile_sm90(parallel._fwd_kernel, attn, forced, parallel.FORCED_WARPS, parallel.ATTN_STAGES)
        report[f"stage2_forced_G{G}"] = sass_report(kernel, work, f"forced_G{G}")
        kernel = compile_sm90(parallel._dq_kernel, {**attn, **grads}, shape, parallel.DQ_WARPS, parallel.DQ_STAGES)
        report[f"stage2_dq_G{G}"] = sass_report(kernel, work, f"dq_G{G}")
        kernel = compile_sm90(parallel._dkv_kernel, {**attn, **grads},
                              dict(G=G, GP=GP, BT=max(1, parallel.DKV_ROWS // GP), D=128, BS=64),
                              parallel.DKV_WARPS, parallel.DKV_STAGES)
        report[f"stage2_dkv_G{G}"] = sass_report(kernel, work, f"dkv_G{G}")
        parts = {"part_o": "*bf16", "part_lse": "*fp32", "slot": "*i64"}
        kernel = compile_sm90(by_block._partial_kernel, {**attn, **grads, **parts},
                              dict(G=G, GP=GP, BT=max(1, by_block.ROWS // GP), D=128, BS=64),
                              by_block.WARPS, by_block.STAGES, by_block.PARTIAL_MAXNREG)
        report[f"stage2_by_block_partial_G{G}"] = sass_report(kernel, work, f"partial_G{G}")
        kernel = compile_sm90(by_block._merge_kernel, {**attn, **parts},
                              dict(G=G, GP=GP, BT=max(1, by_block.MERGE_ROWS // GP), D=128, K=96),
                              by_block.MERGE_WARPS, by_block.MERGE_STAGES)
        report[f"stage2_by_block_merge_G{G}"] = sass_report(kernel, work, f"merge_G{G}")
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sass_stats-sm90.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
