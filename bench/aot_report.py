"""Ahead-of-time compile every Triton kernel of ls_kernels for real GPU targets, no GPU needed.

Prints kernel / target / dtype / D / registers / spills / shared memory for the
default launch config of each kernel, compiled for sm_80 (A100) and sm_90a
(H100). Registers and spills come from ``cuobjdump -res-usage`` on the cubin
(spills = the local memory (LOCAL) and stack (STACK) bytes per thread), shared
memory from the compiled kernel's metadata.

    python bench/aot_report.py            # markdown table
    python bench/aot_report.py --json     # one JSON object per row

Runs without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_report.py compiles kernels: run it without TRITON_INTERPRET=1")

from ls_kernels.config import HALF_DTYPES  # noqa: E402
from ls_kernels.triton_backend import launch  # noqa: E402
from ls_kernels.triton_backend import decode as dec  # noqa: E402
from ls_kernels.triton_backend import projection as prj  # noqa: E402
from ls_kernels.triton_backend.args import HOPPER, block_d  # noqa: E402
from ls_kernels.triton_backend.kernels import backward as bwd_kernels  # noqa: E402
from ls_kernels.triton_backend.kernels import decode as dec_kernels  # noqa: E402
from ls_kernels.triton_backend.kernels import forward as fwd_kernels  # noqa: E402
from ls_kernels.triton_backend.kernels import prepass as prepass_kernels  # noqa: E402
from ls_kernels.triton_backend.kernels import projection as prj_kernels  # noqa: E402
from ls_kernels.triton_backend.kernels import vision as vision_kernels  # noqa: E402
from ls_kernels.config import LS2DConfig  # noqa: E402
from ls_kernels.triton_backend import vision  # noqa: E402

# the official vision windows (w 7 at 224 px, w 8 at 384 px) take the same tiles: 13 and 16 neighbourhood
# columns in 16 slots
VISION_WINDOW = 8

TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _acc(dtype):
    return "fp64" if dtype == torch.float64 else "fp32"


def _split_types(dtype, acc):
    """Pointer types of the projection backward's dKraw, dVraw (RawGrads): a high and a low part in fp16/bf16,
    else the accumulation dtype."""
    part = TL_TYPES[dtype] if dtype in HALF_DTYPES else acc
    return {name: part for name in ("DK_HI", "DK_LO", "DV_HI", "DV_LO")}


def kernel_specs(dtype, D, pad=True, arch=HOPPER):
    """(label, jit fn, {pointer arg: type}, {constexpr: value}, num_warps, num_stages) at the default configs
    of compute capability arch, with padding (pad) or without."""
    t, acc = TL_TYPES[dtype], _acc(dtype)
    fp64 = dtype == torch.float64
    BLOCK_D = block_d(D)
    specs = []
    BLOCK_M, BLOCK_N, warps, stages = launch.fwd_config(D, dtype, gpu_tiles=True)
    bwd = launch.bwd_config(D, dtype, gpu_tiles=True, arch=arch)
    rows = launch.ROWS_PER_PROGRAM
    types = {"K": t, "V": t, "PAD": "i8", "LNW": acc, "LNB": acc, "SCALARS": acc, "KN": t, "VN": t, "LN_STATS": acc}
    const = dict(HEAD_DIM=D, HAS_PAD=pad, BLOCK_N=rows, BLOCK_D=BLOCK_D)
    specs.append(("_ln_local_kernel", prepass_kernels._ln_local_kernel, types, const, 4, 1))
    types = {"O": t, "O_RES": t, "DO": t, "PAD": "i8", "DELTA": acc}
    const = dict(HEAD_DIM=D, HAS_PAD=pad, HAS_RES=True, BLOCK_M=rows, BLOCK_D=BLOCK_D)
    specs.append(("_ls_bwd_delta_kernel", bwd_kernels._ls_bwd_delta_kernel, types, const, 4, 1))
    for causal in (False, True):
        mode = "causal" if causal else "bidir"
        flags = dict(HEAD_DIM=D, CAUSAL=causal, IS_FP64=fp64, PRECISION="ieee", BLOCK_D=BLOCK_D, HAS_PAD=pad)
        types = {"Q": t, "K": t, "V": t, "O": t, "O_RES": t, "KG": t, "VG": t, "GVIS": "i8", "PAD": "i8",
                 "SCALARS": acc, "LSE": acc}
        const = dict(flags, HAS_LOCAL=True, HAS_GLOBAL=True, STORE_RES=True,
                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_N)
        specs.append((f"_ls_fwd_kernel[{mode}]", fwd_kernels._ls_fwd_kernel, types, const, warps, stages))
        narrow = launch.fwd_config(D, dtype, gpu_tiles=True, window_span=launch.NARROW_BLOCK_N)
        if narrow.block_n != BLOCK_N:  # small windows' tiles
            const = dict(const, BLOCK_M=narrow.block_m, BLOCK_N=narrow.block_n, BLOCK_G=narrow.block_n)
            specs.append((f"_ls_fwd_kernel[{mode},narrow]", fwd_kernels._ls_fwd_kernel, types, const,
                          narrow.num_warps, narrow.num_stages))

        bm, bn, w, st = bwd["dq"]
        types = {"Q": t, "K": t, "V": t, "KG": t, "VG": t, "GVIS": "i8", "PAD": "i8", "SCALARS": acc, "DO": t,
                 "LSE": acc, "DELTA": acc, "DQ": t}
        const = dict(flags, HAS_LOCAL=True, HAS_GLOBAL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bn)
        specs.append((f"_ls_bwd_dq_kernel[{mode}]", bwd_kernels._ls_bwd_dq_kernel, types, const, w, st))

        bm, bn, w, st = bwd["dkv"]
        types = {"Q": t, "K": t, "V": t, "PAD": "i8", "LNW": acc, "LNB": acc, "SCALARS": acc, "DO": t, "LSE": acc,
                 "DELTA": acc, "DK_SRC": t, "DV_SRC": t, "DK": t, "DV": t, "KN": t, "VN": t, "LN_STATS": acc,
                 "DLNW_PART": acc, "DLNB_PART": acc, "PROJ": t, "COL_LSE": acc, "COL_DOT": acc, "DPROJ": t,
                 **_split_types(dtype, acc)}
        # the projection backward inside where it runs there (its tiles at r = 32), else its gradients read
        _, br, _, precision = prj.proj_bwd_config(D, r=32, seg_len=4096, dtype=dtype)
        const = dict(flags, HAS_LOCAL=True, SRC_MODE=1, PROJ_BWD=prj.runs_in_kernel(causal, D, True), HAS_LN=True,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, PROJ_PRECISION=precision, SPLIT=dtype in HALF_DTYPES)
        specs.append((f"_ls_bwd_dkv_kernel[{mode}]", bwd_kernels._ls_bwd_dkv_kernel, types, const, w, st))

        bm, bn, w, st = bwd["dkv_global"]
        types = {"Q": t, "KG": t, "VG": t, "GVIS": "i8", "PAD": "i8", "SCALARS": acc, "DO": t, "LSE": acc,
                 "DELTA": acc, "O": t, "O_RES": t, "DKG_PART": acc, "DVG_PART": acc}
        # bidirectional: delta computed here where it fits (one block of r = 32 vectors); causal: read
        const = dict(flags, DELTA_HERE=not causal and launch.delta_fits(D, dtype), HAS_RES=dtype in HALF_DTYPES,
                     BLOCK_M=bm, BLOCK_G=bn)
        specs.append((f"_ls_bwd_dkv_global_kernel[{mode}]", bwd_kernels._ls_bwd_dkv_global_kernel, types, const, w, st))
    types = {"DKG_PART": acc, "DVG_PART": acc, "KRAW": acc, "VRAW": acc, "LNW": acc, "SCALARS": acc, "DK_RAW": acc,
             "DV_RAW": acc, "COL_DOT": acc, "DLNW_PART": acc, "DLNB_PART": acc, **_split_types(dtype, acc)}
    const = dict(HEAD_DIM=D, HAS_LN=True, HAS_COL_DOT=True, SPLIT=dtype in HALF_DTYPES, BLOCK_G=launch.COMBINE_ROWS,
                 BLOCK_D=BLOCK_D)
    specs.append(("_ls_bwd_dkv_global_combine_kernel", bwd_kernels._ls_bwd_dkv_global_combine_kernel, types, const,
                  4, 1))

    BLOCK_N, BLOCK_R = prj.proj_config(D, r=32)
    flags = dict(HEAD_DIM=D, HAS_LN=True, BLOCK_D=BLOCK_D)
    types = {"P": t, "K": t, "V": t, "PAD": "i8", "LNW": acc, "LNB": acc, "SCALARS": acc, "PART_M": acc,
             "PART_Z": acc, "PART_K": acc, "PART_V": acc, "KG": t, "VG": t, "KRAW": acc, "VRAW": acc, "COL_LSE": acc,
             "LNLW": acc, "LNLB": acc, "KN": t, "VN": t, "LN_STATS": acc}
    for final in (False, True):  # bidirectional segments; causal chunks (whole groups); both with the LN_L pre-pass
        const = dict(flags, HAS_PAD=pad, IS_FP64=fp64, PRECISION=prj.PRECISION, FINAL=final, BLOCK_N=BLOCK_N,
                     BLOCK_R=BLOCK_R, LN_SRC=prj_kernels.LN_SRC_PROJECT_NORMED)
        specs.append((f"_proj_partial_kernel[{'final' if final else 'segment'}]", prj_kernels._proj_partial_kernel,
                      types, const, 4, 1))
    types = {"PART_M": acc, "PART_Z": acc, "PART_K": acc, "PART_V": acc, "LNW": acc, "LNB": acc,
             "SCALARS": acc, "KG": t, "VG": t, "KRAW": acc, "VRAW": acc, "COL_LSE": acc}
    specs.append(("_proj_combine_kernel", prj_kernels._proj_combine_kernel, types,
                  dict(flags, BLOCK_R=prj.COMBINE_BLOCK_R), prj.COMBINE_WARPS, 1))
    types = {"P": t, "K": t, "V": t, "PAD": "i8", "LNW": acc, "LNB": acc, "SCALARS": acc, "COL_LSE": acc,
             "COL_DOT": acc, "DP": t, "DK_SRC": t, "DV_SRC": t, **_split_types(dtype, acc)}
    for seg_len in sorted({4096, 16}):  # causal chunks of 16, long bidirectional segments
        bn, br, w, precision = prj.proj_bwd_config(D, r=32, seg_len=seg_len, dtype=dtype)
        const = dict(flags, HAS_PAD=pad, IS_FP64=fp64, PRECISION=precision, SPLIT=dtype in HALF_DTYPES, BLOCK_N=bn,
                     BLOCK_R=br)
        specs.append((f"_proj_bwd_kernel[seg={seg_len}]", prj_kernels._proj_bwd_kernel, types, const, w, 1))
    specs += vision_specs(dtype, D, pad)
    types = {"Q": t, "KN": t, "VN": t, "WK": t, "WV": t, "KG": t, "VG": t, "LENGTHS": "i64", "REAL": "i8",
             "SCALARS": acc, "O_PART": acc, "LSE_PART": acc}
    const = dict(HAS_WINDOW=True, HEAD_DIM=D, IS_FP64=fp64, BLOCK_N=dec.decode_block_n(D, gpu_tiles=True), BLOCK_D=BLOCK_D)
    specs.append(("_decode_split_kernel", dec_kernels._decode_split_kernel, types, const, 4, 1))
    types = {"O_PART": acc, "LSE_PART": acc, "O": t}
    const = dict(HEAD_DIM=D, IS_FP64=fp64, BLOCK_S=dec.COMBINE_SPANS, BLOCK_D=BLOCK_D)
    specs.append(("_decode_combine_kernel", dec_kernels._decode_combine_kernel, types, const, 4, 1))
    return specs


def vision_specs(dtype, D, pad=True):
    """kernel_specs' rows of the two-dimensional kernels at VISION_WINDOW, with the bias, global keys and (pad)
    padding."""
    t, acc = TL_TYPES[dtype], _acc(dtype)
    cfg = LS2DConfig(grid=(56, 56), window=VISION_WINDOW, rank=8, num_global=1, has_bias=True, scale=1.0)
    tiles = vision.patch_tiles(cfg, dtype, D)
    flags = dict(HEAD_DIM=D, HAS_PAD=pad, HAS_BIAS=True, IS_FP64=dtype == torch.float64, PRECISION="ieee",
                 SPAN_P=tiles.span_p, BLOCK_D=block_d(D))
    base = {"Q": t, "K": t, "V": t, "KG": t, "VG": t, "GVIS": "i8", "PAD": "i8", "WB": acc, "SCALARS": acc}
    attention = dict(flags, HAS_LOCAL=True, HAS_GLOBAL=True, BLOCK_G=vision.block_g(9, vision.TARGET_KEYS))
    fwd, dq, dkv = tiles.fwd, tiles.dq, tiles.dkv
    return [
        ("_ls2d_fwd_kernel", vision_kernels._ls2d_fwd_kernel, dict(base, O=t, O_RES=t, LSE=acc),
         dict(attention, STORE_RES=True, BLOCK_M=fwd.block_m, ROWS=fwd.rows), fwd.num_warps, fwd.num_stages),
        ("_ls2d_bwd_dq_kernel", vision_kernels._ls2d_bwd_dq_kernel,
         dict(base, DO=t, LSE=acc, DELTA=acc, DQ=t, DWB=acc), dict(attention, BLOCK_M=dq.block_m, ROWS=dq.rows),
         dq.num_warps, dq.num_stages),
        ("_ls2d_bwd_dkv_kernel", vision_kernels._ls2d_bwd_dkv_kernel,
         dict(base, DO=t, LSE=acc, DELTA=acc, DK=t, DV=t), dict(flags, BLOCK_M=dkv.block_m), dkv.num_warps,
         dkv.num_stages),
    ]


def compile_kernel(fn, types, const, num_warps, num_stages, arch):
    """Compile for GPUTarget("cuda", arch, 32); pointers and strides get the 16-divisibility hint."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = "*" + types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and const.get("HEAD_DIM", 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def resource_usage(compiled):
    """(registers, spill bytes) from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    spills = int(re.search(r"STACK:(\d+)", text).group(1)) + int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, spills


def report(dtypes, dims, archs):
    rows = []
    for dtype in dtypes:
        for D in dims:
            per_arch = {arch: kernel_specs(dtype, D, arch=arch) for arch in archs}  # the same kernels, in order
            for specs in zip(*per_arch.values()):
                for arch, (label, fn, types, const, warps, stages) in zip(per_arch, specs):
                    compiled = compile_kernel(fn, types, const, warps, stages, arch)
                    regs, spills = resource_usage(compiled)
                    rows.append(dict(kernel=label, target=f"sm_{arch}{'a' if arch == 90 else ''}",
                                     dtype=TL_TYPES[dtype], D=D, registers=regs, spills=spills,
                                     shared=compiled.metadata.shared, warps=warps, stages=stages))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated: fp16,bf16,fp32,fp64")
    parser.add_argument("--dims", default="64,128", help="comma-separated head dims")
    parser.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    args = parser.parse_args()
    names = {v: k for k, v in TL_TYPES.items()}
    rows = report([names[x] for x in args.dtypes.split(",")], [int(x) for x in args.dims.split(",")],
                  [int(x) for x in args.archs.split(",")])
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    cols = ["kernel", "target", "dtype", "D", "registers", "spills", "shared", "warps", "stages"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
