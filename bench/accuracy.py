"""Max error of the Triton kernels against the fp64 reference on the paper's configurations.

For the output and the gradient of every input, prints the kernel's max abs error and
that of the same-dtype PyTorch path (the reference with upcast=False), at reduced N; then the same for
the two-dimensional kernels on the official vision windows (one CLS token, the relative-position bias),
on grids of 2 x 2 patches. Without a GPU it runs the kernels in Triton's interpreter (a few minutes).

    python bench/accuracy.py [--dtypes fp32,fp16]
"""
import argparse
import os


import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ls_kernels import ls_attention, ls_attention_2d  # noqa: E402
from ls_kernels.config import rel_pos_rows  # noqa: E402
from reference import ls_attention_2d_ref, ls_attention_ref  # noqa: E402
from reference.inputs import make_inputs, to64  # noqa: E402

PAPER = {  # name: (causal, N, H, D, window, rank, chunk)
    "LRA w8 r32": (False, 512, 2, 32, 8, 32, 16),
    "Text w1 r1": (False, 512, 2, 32, 1, 1, 16),
    "ListOps w16 r2": (False, 512, 2, 32, 16, 2, 16),
    "Retrieval w1 r254": (False, 512, 2, 32, 1, 254, 16),
    "char-LM w512 l16 r1": (True, 1024, 2, 64, 512, 1, 16),
}
VISION = {  # name: (grid, window, rank, H, D): ViL-LS stage 1 (3 heads of 32), w 7 at 224 px and w 8 at 384 px
    "ViL w7 r8 14x14": ((14, 14), 7, 8, 3, 32),
    "ViL w8 r8 16x16": ((16, 16), 8, 8, 3, 32),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def outputs_and_grads(fn, tensors, kw, grad_out):
    """{name: tensor} for the output and the gradient of every named input."""
    names = list(tensors)
    args = dict(tensors)
    ln = {s: (args.pop(f"{s}.w"), args.pop(f"{s}.b")) for s in ("ln_local", "ln_global")}
    out = fn(args["q"], args["k"], args["v"], args["proj"], **ln, **kw)
    grads = torch.autograd.grad(out, [tensors[n] for n in names], grad_out.to(out.dtype))
    return {"out": out, **{f"d{n}": g for n, g in zip(names, grads)}}


def measure(name, dtype):
    causal, N, H, D, w, r, chunk = PAPER[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, proj, kw = make_inputs(1, H, N, D, r, dtype=dtype, pad="rows", chunk=chunk, ln_local="head",
                                    ln_global="head", device=device, requires_grad=True)
    tensors = dict(q=q, k=k, v=v, proj=proj, **{f"{s}.{p}": kw[s][i] for s in ("ln_local", "ln_global")
                                                   for i, p in enumerate("wb")})
    cfg = dict(window=w, causal=causal, chunk=chunk, project_after_ln=not causal,
               key_padding_mask=kw["key_padding_mask"])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    ref = outputs_and_grads(ls_attention_ref, {n: to64(x) for n, x in tensors.items()}, cfg, grad_out)
    same = outputs_and_grads(lambda *a, **k_: ls_attention_ref(*a, upcast=False, **k_), tensors, cfg, grad_out)
    got = outputs_and_grads(lambda *a, **k_: ls_attention(*a, backend="triton", **k_), tensors, cfg, grad_out)
    return {n: ((got[n].double() - ref[n]).abs().max().item(), (same[n].double() - ref[n]).abs().max().item())
            for n in ref}


def measure_2d(name, dtype):
    """measure() of ls_attention_2d: padding on, LN_L and LN_G per head, one global key, the bias table."""
    (nx, ny), w, r, H, D = VISION[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * s)  # noqa: E731
    N = nx * ny
    tensors = dict(q=rand(1, H, N, D), k=rand(1, H, N, D), v=rand(1, H, N, D), proj=rand(1, H, N, r),
                   global_k=rand(1, H, 1, D), global_v=rand(1, H, 1, D), rel_pos_bias=rand(rel_pos_rows(w), H, s=0.5),
                   **{f"{side}.{p}": (1.0 if p == "w" else 0.0) + 0.3 * rand(H, D) for side in ("ln_local", "ln_global")
                      for p in "wb"})
    mask = (torch.rand(1, N, generator=g) < 0.1).to(device)

    def run(fn, dt, **extra):
        x = {n: t.to(dt).to(device).requires_grad_() for n, t in tensors.items()}
        ln = {side: (x[f"{side}.w"], x[f"{side}.b"]) for side in ("ln_local", "ln_global")}
        out = fn(x["q"], x["k"], x["v"], x["proj"], grid=(nx, ny), window=w, global_k=x["global_k"],
                 global_v=x["global_v"], rel_pos_bias=x["rel_pos_bias"], key_padding_mask=mask, **ln, **extra)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(out, list(x.values()), grad_out.to(device).to(out.dtype))
        return {"out": out, **{f"d{n}": gr for n, gr in zip(x, grads)}}

    ref = run(ls_attention_2d_ref, torch.float64)
    same = run(ls_attention_2d_ref, dtype, upcast=False)
    got = run(ls_attention_2d, dtype, backend="triton")
    return {n: ((got[n].double() - ref[n]).abs().max().item(), (same[n].double() - ref[n]).abs().max().item())
            for n in ref}


def print_table(label, configs, measure_fn, dtypes):
    """One markdown row per (dtype, config): each output's and gradient's errors as measure_fn gives them."""
    cols = None
    for dt in dtypes:
        for name in configs:
            errs = measure_fn(name, DTYPES[dt])
            if cols is None:
                cols = list(errs)
                print(f"| {label} | dtype | " + " | ".join(cols) + " |")
                print("|---|---|" + "---|" * len(cols))
            print(f"| {name} | {dt} | " + " | ".join(f"{a:.1e} ({b:.1e})" for a, b in errs.values()) + " |",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,fp16", help="comma-separated from fp32, fp16, bf16")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    print_table("config", PAPER, measure, dtypes)
    print("\neach cell: kernel max abs error vs fp64 reference (same-dtype PyTorch path's error)\n")
    print_table("2D config", VISION, measure_2d, dtypes)


if __name__ == "__main__":
    main()
