"""Memory traffic of the fused Triton kernels, counted under Triton's CPU interpreter (no GPU needed).

Every tl.load and tl.store the kernels issue is counted, in bytes of the elements its mask lets
through, by wrapping the interpreter's masked load and store; kernels launch with the tile sizes
they use on a GPU (not the interpreter's). Compared with the minimum: the forward reads q, k, v,
proj once and writes o once; the backward reads q, k, v, proj, dO once and writes dq, dk, dv,
dproj once. Loads are counted as issued, so a re-read that a GPU's L2 would serve counts too:
an upper bound on DRAM traffic at these tiles. The PyTorch glue between the kernels (rowsum(dO * O),
zero-filled buffers, casts, the LN_G backward on the small projected tensors, sums of per-block partials)
is counted apart, by a TorchDispatchMode: the bytes every aten op outside the kernels reads and writes
(views and allocations move nothing).

    python bench/traffic.py [--seqlen 2048] [--dtype fp16] [--preset charlm lra]
"""
import argparse
import collections
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from ls_kernels import triton_backend  # noqa: E402
from ls_kernels.config import LSConfig, default_scale  # noqa: E402

PRESETS = {  # as bench/sweep.py
    "charlm": dict(causal=True, heads=8, dim=64, window=512, chunk=16, rank=1, project_after_ln=False),
    "lra": dict(causal=False, heads=2, dim=32, window=8, chunk=16, rank=32, project_after_ln=True),
}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
COUNT = collections.Counter()  # kernel name -> bytes
GLUE = "glue"  # COUNT's key for the PyTorch ops between the kernels
_kernel = ["?"]
_in_kernel = [False]
_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}


class _CountGlue(TorchDispatchMode):
    """Bytes read and written by the aten ops that run outside the kernels."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _in_kernel[0] and not func.is_view and func.overloadpacket not in _ALLOCATIONS:
            COUNT[GLUE] += sum(x.numel() * x.element_size() for x in tree_leaves((args, kwargs, out))
                               if isinstance(x, torch.Tensor))
        return out


def _count_loads_and_stores():
    builder, grid = interp.InterpreterBuilder, interp.GridExecutor
    load, store, call = builder.create_masked_load, builder.create_masked_store, grid.__call__

    def masked_load(self, ptrs, mask, other, *args):
        COUNT[_kernel[0]] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return load(self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        COUNT[_kernel[0]] += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
        return store(self, ptrs, value, mask, *args)

    def launch(self, *args, **kwargs):
        _kernel[0] = self.fn.__name__
        _in_kernel[0] = True  # the interpreter's own tensor copies are not glue
        try:
            return call(self, *args, **kwargs)
        finally:
            _in_kernel[0] = False

    builder.create_masked_load, builder.create_masked_store, grid.__call__ = masked_load, masked_store, launch


def nbytes(*xs):
    return sum(x.numel() * x.element_size() for x in xs if x is not None)


def measure(preset, N, dtype, batch=1):
    """{pass: (per-kernel bytes with the glue's under GLUE, minimum bytes)} for one forward and one backward."""
    c = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    H, D = c["heads"], c["dim"]
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v, proj = rand(batch, H, N, D), rand(batch, H, N, D), rand(batch, H, N, D), rand(batch, H, N, c["rank"])
    ln = lambda: (torch.ones(D), torch.zeros(D))  # noqa: E731
    kw = dict(cfg=LSConfig(window=c["window"], causal=c["causal"], chunk=c["chunk"], rank=c["rank"],
                           scale=default_scale(D), project_after_ln=c["project_after_ln"]),
              proj=proj, ln_local=ln(), ln_global=ln(), gpu_tiles=True)
    COUNT.clear()
    with _CountGlue():
        out = triton_backend.forward(q, k, v, **kw).out  # inference: no rounding residual of O kept
    fwd = dict(COUNT)
    res = triton_backend.forward(q, k, v, store_acc=True, **kw)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    COUNT.clear()
    with _CountGlue():
        grads = triton_backend.backward(dout, q, k, v, o=res.out, o_res=res.o_res,
                                        lse=res.lse, projected=res.projected, ln_stats=res.ln_stats, **kw)
    bwd = dict(COUNT)
    return {"forward": (fwd, nbytes(q, k, v, proj, out)),
            "backward": (bwd, nbytes(q, k, v, proj, dout, grads.q, grads.k, grads.v, grads.proj))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--preset", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    ap.add_argument("--seqlen", type=int, default=2048, help="N (default: 2048; batch 1)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="(default: fp16)")
    a = ap.parse_args(argv)
    if a.seqlen < 1:
        ap.error("--seqlen must be >= 1")
    _count_loads_and_stores()
    rows = []
    for preset in a.preset:
        for phase, (kernels, minimum) in measure(preset, a.seqlen, DTYPES[a.dtype]).items():
            glue = kernels.pop(GLUE, 0)
            total = sum(kernels.values())
            detail = ", ".join(f"{k.strip('_')} {v / a.seqlen:.0f}" for k, v in kernels.items())
            rows.append(f"| {preset} | {phase} | {total / a.seqlen:.0f} | {minimum / a.seqlen:.0f} | "
                        f"{total / minimum:.2f} | {detail} | {glue / a.seqlen:.0f} | {glue / minimum:.2f} |")
    print(f"Bytes per token, N = {a.seqlen}, batch 1, {a.dtype}, GPU tile sizes, Triton interpreter\n")
    print("| preset | pass | kernels' loads + stores | minimum | ratio | per kernel | PyTorch glue | glue / minimum |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main())
