"""Backward of the Triton backend: gradcheck, gradients against the fp64 reference, determinism.

Without a GPU these run in Triton's interpreter. Gradient errors follow the same
2x rule as the forward (see test_triton_forward.py), input by input.
"""
import pytest
import torch

from ls_kernels import ls_attention
from ls_kernels.config import INTERPRET
from reference.inputs import make_inputs, to64
from reference import ls_attention_ref
from cases import DEVICE, TINY
from cases import TRITON_PAPER as PAPER
from cases import triton_grid as _grid
from cases import triton_id as _id

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


def _leaves(q, k, v, proj, kw):
    """Named differentiable inputs: q, k, v, proj and the LN weights and biases that are present."""
    named = [("q", q), ("k", k), ("v", v), ("proj", proj)]
    for side in ("ln_local", "ln_global"):
        if kw[side] is not None:
            named += [(f"{side}.weight", kw[side][0]), (f"{side}.bias", kw[side][1])]
    return [(n, x) for n, x in named if x is not None]


def _grads(fn, q, k, v, proj, kw, grad_out):
    leaves = _leaves(q, k, v, proj, kw)
    out = fn(q, k, v, proj, **kw)
    grads = torch.autograd.grad(out, [x for _, x in leaves], grad_out.to(out.dtype), allow_unused=True)
    return {n: torch.zeros_like(x) if g is None else g for (n, x), g in zip(leaves, grads)}


def _triton(q, k, v, proj, **kw):
    return ls_attention(q, k, v, proj, backend="triton", **kw)


def _check_grads(dtype, B, H, c, seed=0):
    q, k, v, proj, kw = make_inputs(B, H, c["N"], c["D"], c["r"], dtype=dtype, pad=c["pad"], chunk=c["chunk"],
                                    ln_local=c["ln_local"], ln_global=c["ln_global"], seed=seed, device=DEVICE,
                                    requires_grad=True)
    kw.update(window=c["w"], causal=c["causal"], project_after_ln=c["after"])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(DEVICE)
    got = _grads(_triton, q, k, v, proj, kw, grad_out)
    kw64 = dict(kw, **{s: None if kw[s] is None else tuple(to64(x) for x in kw[s]) for s in ("ln_local", "ln_global")})
    ref = _grads(ls_attention_ref, to64(q), to64(k), to64(v), to64(proj), kw64, grad_out)
    same = _grads(lambda *a, **k_: ls_attention_ref(*a, upcast=False, **k_), q, k, v, proj, kw, grad_out)
    for name in ref:
        assert got[name].dtype == dict(_leaves(q, k, v, proj, kw))[name].dtype, name
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - ref[name]).abs().max().item()
        err_torch = (same[name].double() - ref[name]).abs().max().item()
        # the tiny atol is relative to the gradient's magnitude: proj and LN gradients sum over
        # positions and reach |g| ~ 10-100, where both paths' errors sit at the dtype's rounding noise
        scale = max(1.0, ref[name].abs().max().item())
        assert err <= 2 * err_torch + TINY[dtype] * scale, (name, err, err_torch, scale)
    pad = kw["key_padding_mask"]
    if pad is not None:  # padded positions get no gradient
        for name in ("k", "v", "proj"):
            if name in got:
                assert (got[name].masked_select(pad[:, None, :, None]) == 0).all(), name


@pytest.mark.parametrize("c", _grid(36)[::2], ids=_id)
def test_backward_fp32(c):
    _check_grads(torch.float32, 2, 2, c)


@pytest.mark.parametrize("c", _grid(36)[1::4], ids=_id)
def test_backward_fp16(c):
    _check_grads(torch.float16, 1, 2, c)


@pytest.mark.parametrize("c", _grid(36)[3::9], ids=_id)
def test_backward_bf16(c):
    _check_grads(torch.bfloat16, 1, 2, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(PAPER))
def test_backward_paper_configs(name, dtype):
    causal, N, H, D, w, r, chunk = PAPER[name]
    c = dict(causal=causal, N=N, D=D, w=w, r=r, chunk=chunk, pad="rows", ln_local="head",
             ln_global="head", after=not causal)
    _check_grads(dtype, 1, H, c)


GRADCHECK = [  # (causal, N, D, w, r, chunk, pad, ln_local, ln_global, after)
    (False, 11, 4, 3, 2, 4, "rows", "head", "shared", True),
    (False, 9, 4, 0, 1, 4, "none", "shared", "head", False),
    (False, 10, 5, 4, None, 4, "seq", None, None, False),
    (False, 7, 4, 2, 3, 4, "none", None, "shared", True),
    (True, 13, 4, 3, 2, 4, "rows", "head", "head", False),
    (True, 11, 4, 0, 1, 3, "chunk", "shared", None, True),
    (True, 10, 4, 4, None, 4, "none", "head", None, False),
    (True, 9, 5, 2, 2, 2, "none", None, "shared", True),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: "{}-N{}-D{}-w{}-r{}-l{}-pad_{}-lnL_{}-lnG_{}{}".format(
    "causal" if c[0] else "bidir", *c[1:9], "-after" if c[9] else ""))
def test_gradcheck_triton(case):
    causal, N, D, w, r, chunk, pad, lnl, lng, after = case
    q, k, v, proj, kw = make_inputs(1, 2, N, D, r, dtype=torch.float64, pad=pad, chunk=chunk, ln_local=lnl,
                                    ln_global=lng, device=DEVICE, requires_grad=True)
    leaves = [x for _, x in _leaves(q, k, v, proj, kw)]
    names = [n for n, _ in _leaves(q, k, v, proj, kw)]

    def fn(*xs):
        d = dict(zip(names, xs))
        ln = {s: (d[f"{s}.weight"], d[f"{s}.bias"]) if f"{s}.weight" in d else None for s in ("ln_local", "ln_global")}
        return ls_attention(d["q"], d["k"], d["v"], d.get("proj"), window=w, causal=causal, chunk=chunk,
                            project_after_ln=after, key_padding_mask=kw["key_padding_mask"], backend="triton", **ln)

    # a full Jacobian through the interpreter takes minutes: fast mode (random projections), tight tolerances
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True, atol=1e-7, rtol=1e-5)


def test_backward_is_deterministic():
    c = dict(causal=False, N=200, D=32, w=8, r=5, chunk=16, pad="rows", ln_local="head", ln_global="shared",
             after=True)
    q, k, v, proj, kw = make_inputs(2, 2, c["N"], c["D"], c["r"], pad=c["pad"], ln_local=c["ln_local"],
                                    ln_global=c["ln_global"], device=DEVICE, requires_grad=True)
    kw.update(window=c["w"], causal=c["causal"], project_after_ln=c["after"])
    grad_out = torch.randn(q.shape, device=DEVICE)
    first = _grads(_triton, q, k, v, proj, kw, grad_out)
    second = _grads(_triton, q, k, v, proj, kw, grad_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_strided_layouts_match_contiguous():
    """(B, N, H, D) tensors viewed as (B, H, N, D) (only stride(-1) == 1) give the contiguous results exactly."""
    B, H, N, D, r = 2, 3, 70, 24, 3
    g = torch.Generator().manual_seed(3)
    bnhd = [torch.randn(B, N, H, D, generator=g).to(DEVICE) for _ in range(3)]
    proj_bnhr = torch.randn(B, N, H, r, generator=g).to(DEVICE)
    kw = dict(window=5, causal=True, chunk=8, project_after_ln=False,
              ln_local=(torch.rand(H, D, generator=g).to(DEVICE), torch.randn(H, D, generator=g).to(DEVICE)))
    grad_out = torch.randn(B, H, N, D, generator=g).to(DEVICE)
    results = []
    for contiguous in (True, False):
        q, k, v = (x.transpose(1, 2) for x in bnhd)
        proj = proj_bnhr.transpose(1, 2)
        if contiguous:
            q, k, v, proj = (x.contiguous() for x in (q, k, v, proj))
        assert q.is_contiguous() == contiguous
        leaves = [x.detach().requires_grad_() for x in (q, k, v, proj)]
        out = _triton(*leaves, **kw)
        results.append([out, *torch.autograd.grad(out, leaves, grad_out)])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dproj"), *results):
        assert torch.equal(a, b), name


GPU_TILE_CASES = [  # the tiles a GPU launches, in the interpreter: (causal, N, D, w, r, chunk, pad, after)
    (False, 160, 64, 8, 32, 16, "rows", True),  # narrow forward tiles, delta in dKg/dVg, projection bwd in dK/dV
    (False, 130, 48, 32, 80, 16, "none", False),  # two blocks of projected vectors: delta pre-pass; raw k_P, v_P:
    # the projection backward's own kernel
    (True, 150, 64, 16, 2, 16, "chunk", False),  # causal chunks: the projection backward's own kernel
    (True, 160, 64, 48, 4, 32, "rows", True),  # causal, wide forward tiles
    (False, 96, 128, 16, 16, 16, "rows", True),  # D 128: the projection backward's own kernel
]


@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=lambda c: "{}-N{}-D{}-w{}-r{}-l{}-pad_{}{}".format(
    "causal" if c[0] else "bidir", *c[1:7], "-after" if c[7] else ""))
def test_gpu_tiles_fp16(case):
    """launch.forward/backward at the GPU's default tiles and kernel choices (fp16), against the fp64
    reference by the 2x rule, output and every gradient."""
    from ls_kernels.config import LSConfig, default_scale
    from ls_kernels.triton_backend import launch

    causal, N, D, w, r, chunk, pad, after = case
    q, k, v, proj, kw = make_inputs(1, 2, N, D, r, dtype=torch.float16, pad=pad, chunk=chunk, ln_local="head",
                                    ln_global="shared", device=DEVICE, requires_grad=True)
    kw.update(window=w, causal=causal, project_after_ln=after)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    cfg = LSConfig(window=w, causal=causal, chunk=chunk, rank=r, scale=default_scale(D), project_after_ln=after)
    ln = dict(ln_local=tuple(x.detach() for x in kw["ln_local"]), ln_global=tuple(x.detach() for x in kw["ln_global"]))
    pad_mask = kw["key_padding_mask"]
    with torch.no_grad():
        fwd = launch.forward(q, k, v, cfg=cfg, proj=proj, pad=pad_mask, store_acc=True, gpu_tiles=True, **ln)
        g = launch.backward(grad_out.to(q.dtype), q, k, v, cfg=cfg, o=fwd.out, o_res=fwd.o_res, lse=fwd.lse,
                            projected=fwd.projected, ln_stats=fwd.ln_stats, proj=proj, pad=pad_mask, gpu_tiles=True,
                            **ln)
    got = {"out": fwd.out, "q": g.q, "k": g.k, "v": g.v, "proj": g.proj,
           "ln_local.weight": g.ln_local_weight, "ln_local.bias": g.ln_local_bias,
           "ln_global.weight": g.ln_global_weight, "ln_global.bias": g.ln_global_bias}
    kw64 = dict(kw, **{s: tuple(to64(x) for x in kw[s]) for s in ("ln_local", "ln_global")})
    ref = _grads(ls_attention_ref, to64(q), to64(k), to64(v), to64(proj), kw64, grad_out)
    same = _grads(lambda *a, **k_: ls_attention_ref(*a, upcast=False, **k_), q, k, v, proj, kw, grad_out)
    ref["out"] = ls_attention_ref(to64(q), to64(k), to64(v), to64(proj), **kw64).detach()
    same["out"] = ls_attention_ref(q, k, v, proj, upcast=False, **kw).detach()
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - ref[name]).abs().max().item()
        err_torch = (same[name].double() - ref[name]).abs().max().item()
        scale = max(1.0, ref[name].abs().max().item())  # as in _check_grads
        assert err <= 2 * err_torch + TINY[torch.float16] * scale, (name, err, err_torch, scale)
