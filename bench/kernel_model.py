"""Performance evidence without a GPU, from the compiled sm_90a code: the compiled loops and an estimated
H100 time per configuration.

Compiles every kernel at its default launch config (bench/aot_report.py's specs) and a plain
FlashAttention-style forward written here for comparison, then reads the SASS (``cuobjdump -sass``):
per kernel registers, spills, shared memory, CTAs per SM on an H100, and for each loop (a backward
branch) the instructions per iteration with the tensor-core (HMMA/HGMMA) and MUFU counts.

Then, per configuration of bench/perf_model.py (char-LM B 1 and 4, LRA N 64k, w 128 / r 64 / N 32k; fp16,
no padding), each launch of the forward and backward is replayed (bench/replay.py: grid, loop iterations per
program, bytes, tensor-core FLOPs) against its compiled loops, turned into a time with perf_model's fixed
H100 constants, and compared with FlashAttention-2/-3 full attention and with the physical limit. The plain
forward's estimate at the FlashAttention-3 paper's benchmark shape is printed beside the paper's measured
Triton rate: the model's calibration.

    python bench/kernel_model.py [--dtypes fp16,bf16] [--dims 64,128] [--dump DIR] [--json] [--configs ...]

``--dump DIR`` writes each kernel's SASS as ``DIR/<label>_sm_90a_<dtype>_D<D>.sass``. ``--json`` prints the
per-configuration figures as one JSON list.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_model.py compiles kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import perf_model  # noqa: E402
import replay  # noqa: E402
import torch  # noqa: E402
from aot_report import CUOBJDUMP, TL_TYPES, compile_kernel, kernel_specs, resource_usage  # noqa: E402
from ls_kernels.config import LSConfig  # noqa: E402
from ls_kernels.triton_backend.args import block_d  # noqa: E402
from ls_kernels.triton_backend import projection as prj  # noqa: E402
from ls_kernels.triton_backend.launch import NARROW_BLOCK_N, bwd_config, fwd_config  # noqa: E402

ARCH = 90
# H100 (sm_90): per SM
REGISTERS_PER_SM = 65536
REGISTER_ALLOC_UNIT = 256  # registers per warp are allocated in units of this many
SHARED_PER_SM = 228 * 1024
MAX_CTAS_PER_SM = 32
MAX_WARPS_PER_SM = 64
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"BRA(?:\.[A-Z.]+)?\s+(0x[0-9a-f]+)")


@triton.jit
def _plain_fwd_kernel(Q, K, V, O, N, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A plain FlashAttention-style forward (Q, K, V, O contiguous (B * H, N, HEAD_DIM), N a multiple of the
    tiles, no masks): the yardstick for the long-short loops' instructions per iteration."""
    start_m = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1).to(tl.int64) * N * HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])  # [BLOCK_M, HEAD_DIM]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])  # [BLOCK_N, HEAD_DIM]
        v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def plain_spec(dtype, D, window_span=0, dq_tiles=False):
    """(label, fn, types, constexprs, warps, stages) of the plain forward at the long-short forward's tiles
    (for windows of window_span keys), or with dq_tiles at the dQ kernel's (the yardstick of its loops)."""
    if dq_tiles:
        tiles, label = bwd_config(D, dtype, gpu_tiles=True)["dq"], "_plain_fwd_kernel[dq]"
    else:
        tiles = fwd_config(D, dtype, gpu_tiles=True, window_span=window_span)
        label = "_plain_fwd_kernel" if window_span == 0 else "_plain_fwd_kernel[narrow]"
    t = TL_TYPES[dtype]
    return (label, _plain_fwd_kernel, {"Q": t, "K": t, "V": t, "O": t},
            dict(HEAD_DIM=block_d(D), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n), tiles.num_warps, tiles.num_stages)


def plain_specs(dtype, D):
    """plain_spec at the default tiles, and at the narrow tiles of small windows and the dQ kernel's tiles
    where they differ."""
    specs = [plain_spec(dtype, D), plain_spec(dtype, D, window_span=NARROW_BLOCK_N),
             plain_spec(dtype, D, dq_tiles=True)]
    return [x for i, x in enumerate(specs) if all(x[3:] != y[3:] for y in specs[:i])]


def sass(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loops(text):
    """[{start, end, instructions, tensor, mufu}] per loop, a branch to an earlier address (cuobjdump prints
    branch targets as addresses), in code order (the forward and dQ kernels: projected vectors, then window). An iteration counts the instructions from the loop's head
    to its back branch; the spin `BRA` to itself at a kernel's end is not a loop."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.search, text.splitlines()) if m]
    found = []
    for addr, ins in code:
        words = ins.split()
        op = words[1] if words[0].startswith("@") else words[0]
        target = _TARGET.search(ins)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            ops = [(i.split()[1] if i.startswith("@") else i.split()[0]) for a, i in code if start <= a <= addr]
            found.append(dict(start=start, end=addr, instructions=len(ops),
                              tensor=sum(o.startswith(("HMMA", "HGMMA")) for o in ops),
                              mufu=sum(o.startswith("MUFU") for o in ops)))
    return sorted(found, key=lambda x: x["start"])


def ctas_per_sm(registers, warps, shared):
    per_warp = -(-registers * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
    by_regs = REGISTERS_PER_SM // (per_warp * warps)
    by_shared = SHARED_PER_SM // shared if shared else MAX_CTAS_PER_SM
    return min(by_regs, by_shared, MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // warps)


def kernel_rows(dtypes, dims, dump=None):
    rows = []
    for dtype in dtypes:
        for D in dims:
            for label, fn, types, const, warps, stages in [*kernel_specs(dtype, D), *plain_specs(dtype, D)]:
                compiled = compile_kernel(fn, types, const, warps, stages, ARCH)
                regs, spills = resource_usage(compiled)
                text = sass(compiled)
                name = f"{label}_sm_90a_{TL_TYPES[dtype]}_D{D}"
                if dump:
                    with open(os.path.join(dump, name + ".sass"), "w") as f:
                        f.write(text)
                rows.append(dict(kernel=label, dtype=TL_TYPES[dtype], D=D, registers=regs, spills=spills,
                                 shared=compiled.metadata.shared, warps=warps, stages=stages,
                                 ctas_per_sm=ctas_per_sm(regs, warps, compiled.metadata.shared),
                                 loops=loops(text)))
    return rows


# ------------------------------------------------------------------------------------- per configuration

# the FlashAttention-3 paper's benchmark shape for head dim 64: 16k tokens, hidden 2048
PLAIN_SHAPE = dict(batch=1, heads=32, seqlen=16384)


def _own_counts(found):
    """Dynamic instructions per iteration of each loop: a loop holding another counts its own body only."""
    own = []
    for i, lp in enumerate(found):
        inner = [x for x in found if x is not lp and lp["start"] <= x["start"] and x["end"] <= lp["end"]]
        own.append(lp["instructions"] - sum(x["instructions"] for x in inner))
    return own


def _instructions(text):
    return sum(1 for line in text.splitlines() if _INSTRUCTION.search(line) and " NOP" not in line)


def _spec(label, dtype, D, run_const, pc):
    """(fn, types, constexprs, warps, stages) of a replayed launch: the aot_report spec without padding, with
    the launch's tiles and the configuration's flags."""
    base = label.split("[")[0]
    for spec_label, fn, types, const, warps, stages in kernel_specs(dtype, D, pad=False):
        if spec_label == label or (spec_label.split("[")[0] == base == "_proj_bwd_kernel"):
            const = dict(const, **run_const)
            if base == "_proj_bwd_kernel":
                const["HAS_LN"] = pc.project_after_ln  # it normalises what the projection read
            if base == "_ls_bwd_dkv_kernel":
                const["SRC_MODE"] = 1 if pc.project_after_ln else 2
            if base == "_proj_bwd_kernel":
                _, _, warps, const["PRECISION"] = prj.proj_bwd_config(pc.dim, pc.rank,
                                                                       pc.chunk if pc.causal else pc.seqlen, dtype)
            return fn, types, const, warps, stages
    raise KeyError(label)


def _launch(run, compiled, text, warps):
    found = loops(text)
    outer = [x for x in found if not any(y is not x and y["start"] <= x["start"] and x["end"] <= y["end"]
                                         for y in found)]
    if len(run.loops) == 1 and len(found) == 2 and len(outer) == 2:
        # ptxas unrolled the loop: a main loop over several iterations, then a remainder loop over one; an
        # iteration costs the remainder's body
        found = found[1:]
    if len(found) != len(run.loops):
        raise RuntimeError(f"{run.label}: {len(found)} loops in the SASS, the replay expects {run.loops}")
    own = np.array(_own_counts(found), dtype=np.float64)
    outside = _instructions(text) - sum(x["instructions"] for x in outer)
    per_program = outside + run.iters @ own if len(own) else np.full(len(run.iters), float(outside))
    iter_totals = run.iters.sum(axis=0) if len(own) else np.zeros(0)
    programs = len(run.iters)
    launch = perf_model.Launch(
        name=run.label, warps=warps, ctas=programs, warp_instructions=warps * float(per_program.sum()),
        longest_cta_warp_instructions=float(per_program.max()),
        tensor_flops=float(iter_totals @ np.array(run.loop_flops, dtype=np.float64)) if len(own) else 0.0,
        dram_bytes=float(run.dram_bytes),
        l2_bytes=float(iter_totals @ np.array(run.loop_bytes, dtype=np.float64)) + programs * run.program_bytes,
        extra=dict(run.extra, loops=run.loops, loop_instructions=[int(x) for x in own],
                   load_balance=perf_model.load_balance(per_program)))
    return launch


def config_rows(names):
    """perf_model.summarize of each named configuration, with tile efficiency and per-kernel loops."""
    results, cache = [], {}
    for name in names:
        pc = perf_model.CONFIGS[name]
        dtype = perf_model.DTYPES[pc.dtype]
        launches = {"forward": [], "backward": []}
        issued = 0
        for run in replay.runs(pc):
            fn, types, const, warps, stages = _spec(run.label, dtype, pc.dim, run.const, pc)
            key = (run.label, tuple(sorted(const.items())), warps)
            if key not in cache:
                compiled = compile_kernel(fn, types, const, warps, stages, ARCH)
                cache[key] = (compiled, sass(compiled))
            launches[run.pass_name].append(_launch(run, *cache[key], warps))
            issued += run.extra.get("issued_scores", 0)
        useful = sum(perf_model.useful_pairs(pc))
        results.append(perf_model.summarize(pc, launches["forward"], launches["backward"],
                                            perf_model.glue_bytes(pc),
                                            extra=dict(useful_scores=useful, issued_scores=int(issued),
                                                       tile_efficiency=useful / issued)))
    return results


def plain_calibration(dtype=torch.float16, D=64):
    """The plain forward's estimate at PLAIN_SHAPE beside the FlashAttention-3 paper's Triton rate."""
    label, fn, types, const, warps, stages = plain_spec(dtype, D)
    compiled = compile_kernel(fn, types, const, warps, stages, ARCH)
    text = sass(compiled)
    (body,) = loops(text)
    N, BM, BN = PLAIN_SHAPE["seqlen"], const["BLOCK_M"], const["BLOCK_N"]
    programs = (N // BM) * PLAIN_SHAPE["heads"] * PLAIN_SHAPE["batch"]
    per_program = _instructions(text) - body["instructions"] + (N // BN) * body["instructions"]
    es = dtype.itemsize
    flops = 4 * N * N * D * PLAIN_SHAPE["heads"] * PLAIN_SHAPE["batch"]
    launch = perf_model.Launch(
        name=label, warps=warps, ctas=programs, warp_instructions=warps * programs * per_program,
        longest_cta_warp_instructions=per_program, tensor_flops=flops,
        dram_bytes=4 * N * D * es * PLAIN_SHAPE["heads"], l2_bytes=programs * (N // BN) * 2 * BN * D * es)
    return dict(perf_model.plain_calibration(launch, flops), loop_instructions=body["instructions"])


def print_config_tables(results, calibration):
    print(perf_model.constants_table())
    print(f"\nCalibration: the plain FlashAttention-style forward (fp16, D 64, N 16384, 32 heads) estimated at "
          f"{calibration['model_tflops']:.0f} TFLOP/s ({calibration['bound']}-bound), the FlashAttention-3 "
          f"paper's measured Triton forward {calibration['paper_triton_tflops']:.0f} TFLOP/s (ratio "
          f"{calibration['ratio']:.2f})\n")
    print("| config | fwd ms | bwd ms | speedup vs FA2 | speedup vs FA3 | physical-limit speedup | % of limit | "
          "tile efficiency | glue / min bytes fwd, bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['time_fwd_s'] * 1e3:.3f} | {r['time_bwd_s'] * 1e3:.3f} | "
              f"{r['speedup_fa2']:.1f}x | {r['speedup_fa3']:.1f}x | {r['limit_speedup']:.1f}x | "
              f"{r['pct_physical_limit']:.0f}% | {r['tile_efficiency']:.0%} | "
              f"{r['glue_bytes_ratio']['forward']:.3f}, {r['glue_bytes_ratio']['backward']:.3f} |")
    print("\nPer kernel: estimated us (bound), loop instructions per iteration, load balance (longest program over "
          "the mean), GB through DRAM and L2, tensor TFLOP\n")
    print("| config | pass | kernel | programs | us | bound | loops | balance | DRAM GB | L2 GB | tensor TFLOP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for k in r["kernels"]:
            print(f"| {r['config']} | {k['pass']} | {k['name']} | {k['ctas']} | {k['time_s'] * 1e6:.1f} | "
                  f"{k['bound']} | {', '.join(map(str, k['loop_instructions'])) or 'none'} | "
                  f"{k['load_balance']:.2f} | {k['dram_s'] * perf_model.DRAM_RATE / 1e9:.3f} | "
                  f"{k['l2_s'] * perf_model.L2_BYTES / 1e9:.3f} | {k['tensor_s'] * perf_model.TENSOR_RATE / 1e12:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated from fp16, bf16, fp32 (default fp16,bf16)")
    ap.add_argument("--dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--dump", metavar="DIR", help="write each kernel's SASS to DIR")
    ap.add_argument("--json", action="store_true", help="print the per-configuration figures as one JSON list")
    ap.add_argument("--configs", default=",".join(perf_model.CONFIGS),
                    help=f"comma-separated from {', '.join(perf_model.CONFIGS)} (default all)")
    a = ap.parse_args(argv)
    names = {v: k for k, v in TL_TYPES.items()}
    try:
        dtypes = [names[x] for x in a.dtypes.split(",")]
        dims = [int(x) for x in a.dims.split(",")]
    except (KeyError, ValueError):
        ap.error(f"--dtypes from {sorted(names)} and integer --dims, got {a.dtypes!r} and {a.dims!r}")
    configs = [c for c in a.configs.split(",") if c]
    if not set(configs) <= set(perf_model.CONFIGS):
        ap.error(f"--configs from {sorted(perf_model.CONFIGS)}, got {a.configs!r}")
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
    results = config_rows(configs)
    calibration = plain_calibration()
    for r in results:  # the yardstick at the tiles of the configuration's forward
        pc = perf_model.CONFIGS[r["config"]]
        span = LSConfig(window=pc.window, causal=pc.causal, chunk=pc.chunk, rank=pc.rank, scale=1.0).window_span
        _, fn, types, const, warps, stages = plain_spec(perf_model.DTYPES[pc.dtype], pc.dim, window_span=span)
        (body,) = loops(sass(compile_kernel(fn, types, const, warps, stages, ARCH)))
        r["plain_loop_instructions"] = body["instructions"]
        _, fn, types, const, warps, stages = plain_spec(perf_model.DTYPES[pc.dtype], pc.dim, dq_tiles=True)
        (body,) = loops(sass(compile_kernel(fn, types, const, warps, stages, ARCH)))
        r["plain_dq_loop_instructions"] = body["instructions"]  # the yardstick of the dQ kernel's loops
    rows = kernel_rows(dtypes, dims, a.dump) if a.dump or not a.json else []
    if a.json:
        print(json.dumps(results, default=lambda x: x.item()))  # numpy scalars as Python numbers
        return
    print("Compiled for sm_90a at the default launch configs; loops: instructions per iteration "
          "(tensor-core, MUFU), in code order\n")
    print("| kernel | dtype | D | registers | spills | shared | warps | stages | CTAs/SM | loops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        body = ", ".join(f"{x['instructions']} ({x['tensor']}, {x['mufu']})" for x in r["loops"]) or "none"
        print(f"| {r['kernel']} | {r['dtype']} | {r['D']} | {r['registers']} | {r['spills']} | {r['shared']} | "
              f"{r['warps']} | {r['stages']} | {r['ctas_per_sm']} | {body} |")
    print()
    print_config_tables(results, calibration)


if __name__ == "__main__":
    sys.exit(main())
