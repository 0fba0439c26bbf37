"""The two-dimensional Triton kernels (``ls_attention_2d(backend="triton")``): outputs and every gradient
(q, k, v, proj, global keys and values, the bias table, the LN weights and biases) against the fp64 reference by
the 2x rule, fp64 exactness, determinism, layouts.

Without a GPU these run in Triton's interpreter (small grids)."""
import pytest
import torch

from cases import DEVICE, TINY, VISION_CASES, run_2d, vision_id, vision_inputs
from ls_kernels import ls_attention_2d, ls_attention_2d_projected
from ls_kernels.config import INTERPRET, rel_pos_rows
from reference import ls_attention_2d_ref

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")


def triton_2d(q, k, v, proj=None, **kw):
    return ls_attention_2d(q, k, v, proj, backend="triton", **kw)


def _on_device(inputs, mask):
    return {n: t.to(DEVICE) for n, t in inputs.items()}, None if mask is None else mask.to(DEVICE)


# the kernels' dS = P (dP - delta) subtracts delta = rowsum(dO * O) taken from the stored output: where the
# reference's softmax backward cancels exactly (a query that sees one key: its gradient of k is 0 there), the
# kernels leave the rounding of O, about eps |dO| |O| per score, which LN_L's backward multiplies by its rstd;
# a few times the tiny atol covers it
CANCELLATION = 4


def check_2x_rule(c, dtype):
    """Output and every gradient: max error against the fp64 reference at most twice the same-dtype reference
    path's (plus a tiny atol scaled by the gradient's magnitude: the bias, proj and LN gradients sum over
    positions, where both paths' errors sit at the dtype's rounding noise; and by CANCELLATION)."""
    inputs, mask, settings = vision_inputs(c)
    inputs, mask = _on_device(inputs, mask)
    ref = run_2d(ls_attention_2d_ref, inputs, mask, settings, torch.float64)
    same = run_2d(ls_attention_2d_ref, inputs, mask, settings, dtype, upcast=False)
    got = run_2d(triton_2d, inputs, mask, settings, dtype)
    assert got["out"].dtype == dtype
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        err = (got[name].double() - ref[name]).abs().max().item()
        err_same = (same[name].double() - ref[name]).abs().max().item()
        scale = max(1.0, ref[name].abs().max().item())
        assert err <= 2 * err_same + CANCELLATION * TINY[dtype] * scale, (name, err, err_same, scale)
    if mask is not None:  # padded positions: zero output, no gradient
        for name in ("out", "q", "k", "v", "proj"):
            if name in got:
                assert (got[name].transpose(1, 2)[mask] == 0).all(), name


@pytest.mark.parametrize("c", VISION_CASES, ids=vision_id)
def test_fp32(c):
    check_2x_rule(c, torch.float32)


@pytest.mark.parametrize("c", VISION_CASES[1::2], ids=vision_id)
def test_fp16(c):
    check_2x_rule(c, torch.float16)


@pytest.mark.parametrize("c", VISION_CASES[2::4], ids=vision_id)
def test_bf16(c):
    check_2x_rule(c, torch.bfloat16)


@pytest.mark.parametrize("c", VISION_CASES[3:5], ids=vision_id)
def test_fp64_matches_reference(c):
    inputs, mask, settings = vision_inputs(c)
    inputs, mask = _on_device(inputs, mask)
    ref = run_2d(ls_attention_2d_ref, inputs, mask, settings, torch.float64)
    got = run_2d(triton_2d, inputs, mask, settings, torch.float64)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-10, msg=name)


def test_deterministic():
    """Two runs give bitwise the same output and gradients (no atomics; the bias gradient summed in order)."""
    inputs, mask, settings = vision_inputs(VISION_CASES[3])
    inputs, mask = _on_device(inputs, mask)
    first = run_2d(triton_2d, inputs, mask, settings, torch.float32)
    second = run_2d(triton_2d, inputs, mask, settings, torch.float32)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_bias_gradient_summed_over_many_batches():
    """More batches than the dQ kernel's batch groups: each group walks several batches into one partial."""
    B, H, D, grid, w = 5, 2, 16, (8, 8), 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 64, D, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    table = torch.randn(rel_pos_rows(w), H, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    import ls_kernels.triton_backend.vision as tv
    old = tv._BIAS_PROGRAMS
    tv._BIAS_PROGRAMS = 2 * H * 4  # 2 groups of batches for 4 patches and H heads
    try:
        assert tv._bias_groups(B, H, 4) == 2
        (got,) = torch.autograd.grad(triton_2d(q, k, v, grid=grid, window=w, rel_pos_bias=table).sum(), table)
    finally:
        tv._BIAS_PROGRAMS = old
    (ref,) = torch.autograd.grad(ls_attention_2d_ref(q, k, v, grid=grid, window=w, rel_pos_bias=table).sum(), table)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_strided_layouts_give_the_contiguous_numbers():
    inputs, mask, settings = vision_inputs(VISION_CASES[3])
    inputs, mask = _on_device(inputs, mask)
    base = run_2d(triton_2d, inputs, mask, settings, torch.float64)
    moved = {n: (t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t)
             for n, t in inputs.items()}
    got = run_2d(triton_2d, moved, mask, settings, torch.float64)
    for name in base:
        torch.testing.assert_close(got[name], base[name], rtol=1e-12, atol=1e-12, msg=name)


def test_projected_entry_point_on_the_kernels():
    (nx, ny), H, D, r = (5, 6), 2, 16, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, nx * ny, D, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    kg, vg, gk, gv = (torch.randn(2, H, n, D, generator=g, dtype=torch.float64).to(DEVICE) for n in (r, r, 1, 1))
    table = torch.randn(rel_pos_rows(4), H, generator=g, dtype=torch.float64).to(DEVICE)
    kw = dict(grid=(nx, ny), window=4, global_k=gk, global_v=gv, rel_pos_bias=table)
    got = ls_attention_2d_projected(q, k, v, kg, vg, backend="triton", **kw)
    ref = ls_attention_2d_ref(q, k, v, k_proj=kg, v_proj=vg, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
