"""Performance evidence without a GPU, from the compiled sm_90a code: the compiled loops.

Compiles every kernel at its default launch config (bench/aot_report.py's specs) and a plain
FlashAttention-style forward written here for comparison, then reads the SASS (``cuobjdump -sass``):
per kernel registers, spills, shared memory, CTAs per SM on an H100, and for each loop (a backward
branch) the instructions per iteration with the tensor-core (HMMA/HGMMA) and MUFU counts.

    python bench/kernel_model.py [--dtypes fp16,bf16] [--dims 64,128] [--dump DIR] [--json]

``--dump DIR`` writes each kernel's SASS as ``DIR/<label>_sm_90a_<dtype>_D<D>.sass``.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_model.py compiles kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from aot_report import CUOBJDUMP, TL_TYPES, compile_kernel, kernel_specs, resource_usage  # noqa: E402
from ls_kernels.triton_backend.args import block_d  # noqa: E402
from ls_kernels.triton_backend.launch import fwd_config  # noqa: E402

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


def plain_spec(dtype, D):
    """(label, fn, types, constexprs, warps, stages) of the plain forward at the long-short forward's tiles."""
    tiles = fwd_config(D, dtype, gpu_tiles=True)
    t = TL_TYPES[dtype]
    return ("_plain_fwd_kernel", _plain_fwd_kernel, {"Q": t, "K": t, "V": t, "O": t},
            dict(HEAD_DIM=block_d(D), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n), tiles.num_warps, tiles.num_stages)


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
            for label, fn, types, const, warps, stages in [*kernel_specs(dtype, D), plain_spec(dtype, D)]:
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated from fp16, bf16, fp32 (default fp16,bf16)")
    ap.add_argument("--dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--dump", metavar="DIR", help="write each kernel's SASS to DIR")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    a = ap.parse_args(argv)
    names = {v: k for k, v in TL_TYPES.items()}
    try:
        dtypes = [names[x] for x in a.dtypes.split(",")]
        dims = [int(x) for x in a.dims.split(",")]
    except (KeyError, ValueError):
        ap.error(f"--dtypes from {sorted(names)} and integer --dims, got {a.dtypes!r} and {a.dims!r}")
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
    rows = kernel_rows(dtypes, dims, a.dump)
    if a.json:
        print(json.dumps(rows))
        return
    print("Compiled for sm_90a at the default launch configs; loops: instructions per iteration "
          "(tensor-core, MUFU), in code order\n")
    print("| kernel | dtype | D | registers | spills | shared | warps | stages | CTAs/SM | loops |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        body = ", ".join(f"{x['instructions']} ({x['tensor']}, {x['mufu']})" for x in r["loops"]) or "none"
        print(f"| {r['kernel']} | {r['dtype']} | {r['D']} | {r['registers']} | {r['spills']} | {r['shared']} | "
              f"{r['warps']} | {r['stages']} | {r['ctas_per_sm']} | {body} |")


if __name__ == "__main__":
    sys.exit(main())
