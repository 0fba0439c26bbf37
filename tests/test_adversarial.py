"""Adversarial inputs: strided layouts, extreme values, empty tensors, huge windows, garbage at padded
positions, mixed dtypes, meta tensors, overflowing scales. Each group fails on a defect once found."""
import sys

import numpy as np
import pytest
import torch

from ls_kernels import LongShortAttention, dynamic_projection, ls_attention, ls_attention_projected
from reference import ls_attention_ref
from reference.inputs import make_inputs

BACKENDS = ["torch", "triton"]
MODES = {"bidir": False, "causal": True}

# small enough for Triton's interpreter; odd N, a partial chunk, D below the kernels' 16-wide tiles
B, H, N, D, R, W, L = 2, 2, 23, 8, 3, 4, 4


def _inputs(dtype=torch.float64, pad="rows", seed=0):
    q, k, v, proj, kw = make_inputs(B, H, N, D, R, dtype=dtype, pad=pad, ln_local="head", ln_global="shared",
                                    chunk=L, seed=seed)
    return dict(q=q, k=k, v=v, proj=proj, ln_local=kw["ln_local"], ln_global=kw["ln_global"],
                key_padding_mask=kw["key_padding_mask"])


def _call(args, causal, backend, grad_out=None):
    """Output and the gradient of every float tensor argument (None for the mask), in argument order."""
    leaves = {}
    call = {}
    for name, x in args.items():
        if isinstance(x, tuple):
            call[name] = tuple(t.detach().requires_grad_() for t in x)
            leaves.update({f"{name}.{i}": t for i, t in enumerate(call[name])})
        elif x is not None and x.dtype != torch.bool:
            call[name] = x.detach().requires_grad_()
            leaves[name] = call[name]
        else:
            call[name] = x
    out = ls_attention(**call, window=W, causal=causal, chunk=L, project_after_ln=causal, backend=backend)
    g = torch.autograd.grad(out, list(leaves.values()), grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), dict(zip(leaves, g))


# ----------------------------------------------------------------------------- strided layouts

def _layouts(x):
    """Strided tensors holding (for expand: broadcast) x's values, by name."""
    dims = x.dim()
    out = {}
    for d in range(dims):
        if x.shape[d] > 1:
            big = torch.zeros(*x.shape[:d], 2 * x.shape[d], *x.shape[d + 1:], dtype=x.dtype)
            big.narrow(d, 0, 2 * x.shape[d])[(slice(None),) * d + (slice(None, None, 2),)] = x
            out[f"every-other-{d}"] = big[(slice(None),) * d + (slice(None, None, 2),)]
            out[f"expand-{d}"] = x.narrow(d, 0, 1).expand(x.shape)
    rev = tuple(reversed(range(dims)))
    out["reversed-strides"] = x.permute(rev).contiguous().permute(rev)
    if dims == 4:
        out["bnhd"] = x.transpose(1, 2).contiguous().transpose(1, 2)
        out["transposed-ND"] = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    storage = torch.zeros(x.numel() + 5, dtype=x.dtype)
    storage[5:] = x.reshape(-1)
    out["offset"] = storage[5:].view(x.shape)
    return out


ARGS = ["q", "k", "v", "proj", "key_padding_mask", "ln_local", "ln_global", "grad_out"]


def _layout_cases():
    base = _inputs()
    shapes = {"ln_local": base["ln_local"][0], "ln_global": base["ln_global"][0], "grad_out": base["q"]}
    for arg in ARGS:
        names = _layouts(shapes.get(arg, base.get(arg))).keys()
        for layout in names:
            yield arg, layout


LAYOUT_CASES = list(_layout_cases())


def _strided_args(arg, layout):
    """(args, grad_out) with `arg` in `layout`, and the same values contiguous."""
    args = _inputs()
    grad = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if arg == "grad_out":
        strided = _layouts(grad)[layout]
        return (args, strided), (args, strided.contiguous())
    if arg in ("ln_local", "ln_global"):
        strided = tuple(_layouts(t)[layout] for t in args[arg])
        plain = tuple(t.contiguous() for t in strided)
    else:
        strided = _layouts(args[arg])[layout]
        plain = strided.contiguous()
    return ({**args, arg: strided}, grad), ({**args, arg: plain}, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arg,layout", LAYOUT_CASES, ids=[f"{a}-{l}" for a, l in LAYOUT_CASES])
def test_strided_layout_equals_contiguous(arg, layout, mode, backend):
    """Every strided layout of every tensor argument (and of the incoming gradient) gives the contiguous
    layout's output and gradients: fp64, so the two must agree to rounding."""
    (args, grad), (plain_args, plain_grad) = _strided_args(arg, layout)
    out, grads = _call(args, MODES[mode], backend, grad)
    ref_out, ref_grads = _call(plain_args, MODES[mode], backend, plain_grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_strided_projected_inputs_equal_contiguous(mode, backend):
    """ls_attention_projected: q, k, v transposed in memory and k_proj, v_proj sliced every other row."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, D, N, dtype=torch.float64, generator=g).transpose(-1, -2) for _ in range(3))
    G = (N // L) * R if MODES[mode] else R
    kg, vg = (torch.randn(B, H, 2 * G, D, dtype=torch.float64, generator=g)[:, :, ::2] for _ in range(2))

    def run(*xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = ls_attention_projected(*xs, window=W, causal=MODES[mode], chunk=L, backend=backend)
        return (out, *torch.autograd.grad(out.square().sum(), xs))

    for got, want in zip(run(q, k, v, kg, vg), run(*(x.contiguous() for x in (q, k, v, kg, vg)))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- fp16 extremes

FP16_EXTREMES = {
    # 16 equal keys of |v| = 5000: an unnormalised fp16 p @ v would sum to 80000 > 65504
    "large-values": lambda: (torch.zeros(1, 1, 32, 16), torch.zeros(1, 1, 32, 16), torch.full((1, 1, 32, 16), 5000.)),
    # |q . k| = 76800 > 65504 before the 1/8 scale: fp16 scores would be inf
    "large-scores": lambda: (torch.full((1, 1, 32, 64), 40.), torch.full((1, 1, 32, 64), 30.),
                             torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", FP16_EXTREMES)
def test_fp16_extreme_values_stay_finite(case, mode, backend):
    """fp16 inputs whose products overflow fp16 give fp64's answer: scores and p @ v accumulate in fp32."""
    q, k, v = FP16_EXTREMES[case]()
    proj = torch.randn(*q.shape[:3], 2, generator=torch.Generator().manual_seed(1))
    kw = dict(window=16, causal=MODES[mode], chunk=8)
    out = ls_attention(q.half(), k.half(), v.half(), proj.half(), backend=backend, **kw)
    ref = ls_attention_ref(q.double(), k.double(), v.double(), proj.double(), **kw)
    assert torch.isfinite(out).all()
    # fp16 keeps 11 significant bits: the inputs are exact, the output is rounded once (and p once)
    torch.testing.assert_close(out.double(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max().item())


# ----------------------------------------------------------------------------- empty tensors

EMPTY_SHAPES = {"B0": (0, 2, 8, 4), "H0": (2, 0, 8, 4), "N0": (2, 2, 0, 4)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "window-only"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs_give_empty_outputs_and_gradients(shape, with_proj, mode, backend):
    shp = EMPTY_SHAPES[shape]
    q, k, v = (torch.randn(*shp, requires_grad=True) for _ in range(3))
    proj = torch.randn(*shp[:3], 2, requires_grad=True) if with_proj else None
    ln = (torch.ones(shp[-1], requires_grad=True), torch.zeros(shp[-1], requires_grad=True))
    mask = torch.zeros(shp[0], shp[2], dtype=torch.bool)
    out = ls_attention(q, k, v, proj, window=4, causal=MODES[mode], chunk=2, ln_local=ln, ln_global=ln,
                       key_padding_mask=mask, backend=backend)
    assert out.shape == shp and out.dtype == q.dtype
    out.sum().backward()
    for x in (q, k, v, proj) if with_proj else (q, k, v):
        assert x.grad is not None and x.grad.shape == x.shape
    for x in ln:  # the loss does not depend on them
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_projected_inputs(shape, backend):
    shp = EMPTY_SHAPES[shape]
    q, k, v = (torch.randn(*shp, requires_grad=True) for _ in range(3))
    kg, vg = (torch.randn(*shp[:2], 3, shp[3], requires_grad=True) for _ in range(2))
    out = ls_attention_projected(q, k, v, kg, vg, window=4, backend=backend)
    assert out.shape == shp
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (q, k, v, kg, vg))


@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "window-only"])
def test_empty_sequence_in_the_layer(with_proj):
    layer = LongShortAttention(8, 2, window=4, rank=2 if with_proj else 0)
    x = torch.randn(0, 5, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 5, 8) and x.grad.shape == x.shape


# ----------------------------------------------------------------------------- huge windows

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [N + 1, 2 ** 31 - 1, 1_500_000_000, 2 ** 40, sys.maxsize],
                         ids=["N+1", "2^31-1", "1.5e9", "2^40", "maxsize"])
def test_window_beyond_the_sequence_is_window_n(window, mode, backend):
    args = _inputs()
    got = ls_attention(**args, window=window, causal=MODES[mode], chunk=L, backend=backend)
    want = ls_attention(**args, window=N, causal=MODES[mode], chunk=L, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- mixed dtypes

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proj_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["q-fp32", "q-fp16"])
def test_proj_of_another_dtype(dtype, proj_dtype, mode, backend):
    """proj of any float dtype is read in the accumulation dtype: the same numbers as proj cast to fp32,
    and its gradient comes back in proj's dtype."""
    args = _inputs(dtype=dtype)
    args["proj"] = args["proj"].to(proj_dtype)
    got, grads = _call(args, MODES[mode], backend)
    want, want_grads = _call({**args, "proj": args["proj"].float()}, MODES[mode], backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert grads["proj"].dtype == proj_dtype
    # the gradient is computed in fp32 either way, then rounded to proj's dtype
    torch.testing.assert_close(grads["proj"], want_grads["proj"].to(proj_dtype), rtol=0, atol=0)


# ----------------------------------------------------------------------------- meta tensors

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_tensors_give_shapes(dtype, mode, backend):
    q, k, v = (torch.empty(B, H, N, D, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))
    proj = torch.empty(B, H, N, R, device="meta", dtype=dtype, requires_grad=True)
    ln = (torch.empty(D, device="meta"), torch.empty(D, device="meta"))
    mask = torch.empty(B, N, device="meta", dtype=torch.bool)
    out = ls_attention(q, k, v, proj, window=W, causal=MODES[mode], chunk=L, ln_local=ln, ln_global=ln,
                       key_padding_mask=mask, backend=backend)
    assert out.shape == (B, H, N, D) and out.dtype == dtype and out.device.type == "meta"
    grads = torch.autograd.grad(out, (q, k, v, proj), torch.empty_like(out))
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v, proj)]


# ----------------------------------------------------------------------------- non-finite keys

@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_whose_projected_scores_are_all_minus_inf(backend):
    """An infinite key coordinate makes the projected keys infinite in that coordinate: queries whose
    coordinate has the other sign score -inf on every projected key and must attend to their window
    keys alone, as the reference does."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64, generator=g) for _ in range(3))
    proj = torch.randn(1, 1, 16, 2, dtype=torch.float64, generator=g)
    k[0, 0, 3, 0] = float("inf")
    out = ls_attention(q, k, v, proj, window=4, backend=backend)
    ref = ls_attention_ref(q, k, v, proj, window=4)
    rows = (q[0, 0, :, 0] < 0) & ((torch.arange(16) // 4) != 0)  # projected scores -inf, window keys finite
    assert rows.sum() >= 3 and torch.isfinite(ref[0, 0, rows]).all()
    torch.testing.assert_close(out[0, 0, rows], ref[0, 0, rows], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- garbage at padded positions

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_values_at_padded_positions_never_matter(garbage, mode, backend):
    """q, k, v, proj and the incoming gradient at padded positions hold garbage: every output and gradient
    at real positions is unchanged, and padded positions get zero gradients."""
    args = _inputs(pad="rows")
    pad = args["key_padding_mask"]
    assert pad.any() and (~pad).any()
    grad = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, grads = _call(args, MODES[mode], backend, grad)

    rows = pad[:, None, :, None]
    dirty = {name: args[name].masked_fill(rows, garbage) for name in ("q", "k", "v", "proj")}
    dirty_out, dirty_grads = _call({**args, **dirty}, MODES[mode], backend, grad.masked_fill(rows, garbage))
    torch.testing.assert_close(dirty_out, out, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(dirty_grads[name], g, rtol=1e-12, atol=1e-12, msg=name)
    for name in ("q", "k", "v", "proj"):
        assert (dirty_grads[name].masked_select(rows) == 0).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_projected_entry_points_ignore_padded_values(mode, backend):
    """dynamic_projection and ls_attention_projected: NaN at padded positions, and in the projected vectors
    of a fully padded sequence (which no query sees), change nothing."""
    causal = MODES[mode]
    args = _inputs(pad="seq")  # the last sequence is all padding
    pad = args["key_padding_mask"]
    rows = pad[:, None, :, None]

    def run(q, k, v, proj):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, proj)]
        kg, vg = dynamic_projection(leaves[3], leaves[1], leaves[2], causal=causal, chunk=L, key_padding_mask=pad)
        if not causal:  # a fully padded sequence's projected vectors are never seen: garbage there changes nothing
            kg, vg = (x.masked_fill(pad.all(1)[:, None, None, None], float("nan")) for x in (kg, vg))
        out = ls_attention_projected(leaves[0], leaves[1], leaves[2], kg, vg, window=W, causal=causal, chunk=L,
                                     key_padding_mask=pad, backend=backend)
        return (out, *torch.autograd.grad(out.sum(), leaves))

    clean = run(args["q"], args["k"], args["v"], args["proj"])
    dirty = run(*(args[n].masked_fill(rows, float("nan")) for n in ("q", "k", "v", "proj")))
    assert torch.isfinite(clean[0]).all()
    for got, want in zip(dirty, clean):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- scale

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e38, -1e38, 1e36])
def test_scale_that_overflows_the_scores_is_rejected(scale, backend):
    q = 100 * torch.randn(1, 1, 16, 8)  # |q| about 300: scale * |q|^2 > 3.4e38
    with pytest.raises(ValueError, match=r"\bscale\b"):
        ls_attention(q, q, q, torch.randn(1, 1, 16, 2), window=4, scale=scale, backend=backend)


@pytest.mark.parametrize("scale", [1e38, float("nan"), float("inf")])
def test_scale_that_overflows_is_rejected_by_ls_attention_projected(scale):
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        ls_attention_projected(q, q, q, q[:, :, :2], q[:, :, :2], window=4, scale=scale)


def test_large_scale_that_fits_is_accepted():
    """|scale| > 1 is checked against the data, not refused: 50 with unit-size inputs gives the reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 8, dtype=torch.float64, generator=g) for _ in range(3))
    out = ls_attention(q, k, v, window=4, scale=50.0)
    torch.testing.assert_close(out, ls_attention_ref(q, k, v, window=4, scale=50.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [np.float32(0.3), np.float64(0.3), np.float16(0.3), 1, np.int64(1)],
                         ids=["np.float32", "np.float64", "np.float16", "int", "np.int64"])
def test_scale_of_any_real_number_type(scale):
    q = torch.randn(1, 1, 16, 8, generator=torch.Generator().manual_seed(0))
    got = ls_attention(q, q, q, window=4, scale=scale)
    torch.testing.assert_close(got, ls_attention(q, q, q, window=4, scale=float(scale)), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [0, -1])
def test_chunk_is_validated_in_bidirectional_mode(chunk):
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match=r"\bchunk\b"):
        ls_attention(q, q, q, window=4, chunk=chunk)


# ----------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_layer_input_of_another_dtype_names_x(dual_ln):
    layer = LongShortAttention(16, 2, window=4, rank=2, dual_ln=dual_ln)
    with pytest.raises(ValueError, match=r"\bx\b.*float64.*float32"):
        layer(torch.randn(1, 8, 16, dtype=torch.float64))


def test_layer_input_of_another_dtype_under_autocast():
    """Under autocast the Linear maps cast x themselves: bf16 x into an fp32 layer works."""
    layer = LongShortAttention(16, 2, window=4, rank=2)
    x = torch.randn(1, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    ref = layer(x.bfloat16().float())
    assert torch.isfinite(y).all()
    # bf16 keeps 8 significant bits: the Linear maps round their outputs to bf16
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)

