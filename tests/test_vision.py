"""Two-dimensional long-short attention (``ls_attention_2d``): the dense reference's properties, the blocked
PyTorch path against it (outputs and every gradient, the bias table's included), edge rules, layouts and bad
input."""
import pytest
import torch
import torch.nn.functional as F

from cases import TINY, VISION_CASES, assert_blocked_results, assert_matches, run_2d, vision_id, vision_inputs
from ls_kernels import ls_attention, ls_attention_2d, ls_attention_2d_projected
from ls_kernels.config import rel_pos_rows
from reference import ls_attention_2d_ref, ls_attention_ref

TIGHT = dict(rtol=1e-12, atol=1e-12)


def blocked_2d(q, k, v, proj=None, **kw):
    return ls_attention_2d(q, k, v, proj, backend="torch", **kw)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def official_bias_matrix(table, nx, ny, w):
    """(H, N, N) by the official equations for a grid inside one patch (nx, ny <= w): a key at (kr, kc) is entry
    (kr + p) (w + 2p) + kc + p of the patch's neighbourhood, a query at (qr, qc) entry qr w + qc of the patch,
    and relative_position_index[q, kv] = (qr - kr + p + w - 1)(2p + w) + qc - kc + p + w - 1, p = w // 2."""
    p = w // 2
    N = nx * ny
    index = torch.empty(N, N, dtype=torch.long)
    for qi in range(N):
        qr, qc = divmod(qi, ny)
        for ki in range(N):
            kr, kc = divmod(ki, ny)
            index[qi, ki] = (qr - kr + p + w - 1) * (2 * p + w) + (qc - kc + p + w - 1)
    return table[index].permute(2, 0, 1)


@pytest.mark.parametrize("grid,w", [((1, 1), 2), ((3, 4), 4), ((5, 5), 5), ((6, 2), 7)], ids=str)
def test_window_covering_grid_equals_full_attention_with_bias(grid, w):
    H, N = 3, grid[0] * grid[1]
    q, k, v = (randn(2, H, N, 8, seed=i) for i in range(3))
    table = randn(rel_pos_rows(w), H, seed=3)
    out = ls_attention_2d_ref(q, k, v, grid=grid, window=w, rel_pos_bias=table, scale=0.4)
    bias = official_bias_matrix(table, *grid, w)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.4), **TIGHT)
    got = blocked_2d(q, k, v, grid=grid, window=w, rel_pos_bias=table, scale=0.4)
    torch.testing.assert_close(got, out, **TIGHT)


@pytest.mark.parametrize("N,w", [(1, 1), (17, 1), (23, 4), (30, 6), (9, 20)])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_one_row_grid_equals_1d_windows(N, w, pad):
    """A 1 x N grid: the rows of every neighbourhood hold the one row, its columns are the 1D bidirectional
    segment widened by s = max(w // 2, 1): the 1D semantics exactly (projection and LayerNorms included)."""
    H, D = 2, 8
    q, k, v = (randn(2, H, N, D, seed=i) for i in range(3))
    proj = randn(2, H, N, 3, seed=3)
    ln_local, ln_global = (1 + randn(H, D, seed=4), randn(H, D, seed=5)), (1 + randn(D, seed=6), randn(D, seed=7))
    mask = (randn(2, N, seed=8) > 0.5) if pad else None
    kw = dict(window=w, ln_local=ln_local, ln_global=ln_global, project_after_ln=True, key_padding_mask=mask)
    one_d = ls_attention_ref(q, k, v, proj, **kw)
    torch.testing.assert_close(ls_attention_2d_ref(q, k, v, proj, grid=(1, N), **kw), one_d, **TIGHT)
    torch.testing.assert_close(blocked_2d(q, k, v, proj, grid=(1, N), **kw),
                               ls_attention(q, k, v, proj, backend="torch", **kw), **TIGHT)


def test_global_keys_are_keys_every_query_sees():
    """Global keys and values, normalised by LN_L like the window keys, join the window's softmax: with a
    window covering the grid, full attention over both sets."""
    H, D, grid = 2, 8, (3, 5)
    q, k, v = (randn(2, H, 15, D, seed=i) for i in range(3))
    gk, gv = randn(2, H, 2, D, seed=3), randn(2, H, 2, D, seed=4)
    ln = (1 + randn(D, seed=5), randn(D, seed=6))
    out = ls_attention_2d_ref(q, k, v, grid=grid, window=8, global_k=gk, global_v=gv, ln_local=ln)
    norm = lambda t: F.layer_norm(t, (D,), *ln)  # noqa: E731
    keys, values = torch.cat([norm(gk), norm(k)], 2), torch.cat([norm(gv), norm(v)], 2)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, keys, values), **TIGHT)


@pytest.mark.parametrize("c", VISION_CASES, ids=vision_id)
def test_blocked_matches_reference(c):
    """Output and every gradient in fp64 and fp32 against the fp64 reference; zeros at padded positions."""
    inputs, mask, settings = vision_inputs(c)
    ref = run_2d(ls_attention_2d_ref, inputs, mask, settings, torch.float64)
    got64 = run_2d(blocked_2d, inputs, mask, settings, torch.float64)
    got32 = run_2d(blocked_2d, inputs, mask, settings, torch.float32)
    assert_blocked_results(got64, got32, ref, mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c", VISION_CASES[1:4], ids=vision_id)
def test_half_precision_within_twice_the_same_dtype_reference(c, dtype):
    inputs, mask, settings = vision_inputs(c)
    ref = run_2d(ls_attention_2d_ref, inputs, mask, settings, torch.float64)["out"]
    same = run_2d(ls_attention_2d_ref, inputs, mask, settings, dtype, upcast=False)["out"]
    got = run_2d(blocked_2d, inputs, mask, settings, dtype)["out"]
    assert got.dtype == dtype
    err, err_same = (got.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err <= 2 * err_same + TINY[dtype], (err, err_same)


def test_nothing_visible_gives_zeros_not_nan():
    """A fully padded image with no global key, and queries whose whole neighbourhood is padded: zero rows and
    finite zero gradients."""
    H, D, grid = 2, 8, (6, 6)
    q, k, v = (randn(2, H, 36, D, seed=i).requires_grad_() for i in range(3))
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[0, 0] = False  # image 0: one real token at (0, 0); image 1: all padded
    out = ls_attention_2d(q, k, v, grid=grid, window=2, key_padding_mask=mask)
    seen = torch.zeros(36, dtype=torch.bool)
    seen[[0, 1, 2, 6, 7, 8, 12, 13, 14]] = True  # (0, 0) lies in the neighbourhood of the patches at (0, 0), (0, 2)...
    seen &= ~mask[0]
    assert (out[1] == 0).all() and (out[0][:, ~seen] == 0).all() and (out[0][:, 0] != 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][1] == 0).all() and (grads[0][0][:, 1:] == 0).all()


LAYOUTS = {  # the same values in another layout
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
    "heads-outer": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "offset": lambda t: torch.cat([t.new_zeros(5), t.reshape(-1)])[5:].view(t.shape),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_layouts_give_the_contiguous_numbers(layout):
    """Every tensor argument in another layout: the contiguous layout's output and gradients, to fp64
    rounding."""
    inputs, mask, settings = vision_inputs(VISION_CASES[3])
    base = run_2d(blocked_2d, inputs, mask, settings, torch.float64)
    moved = {n: LAYOUTS[layout](t) if t.dim() >= (4 if layout == "heads-outer" else 2) or layout == "offset" else t
             for n, t in inputs.items()}
    got = run_2d(blocked_2d, moved, mask, settings, torch.float64)
    for name in base:
        torch.testing.assert_close(got[name], base[name], rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck():
    inputs, mask, settings = vision_inputs(((3, 4), 2, 2, 1, True, "rows", "head", "shared", True, 4))
    names = list(inputs)
    x = [inputs[n].clone().requires_grad_() for n in names]

    def fn(*args):
        t = dict(zip(names, args))
        ln = lambda side: (t[side + "_w"], t[side + "_b"]) if side + "_w" in t else None  # noqa: E731
        return blocked_2d(t["q"], t["k"], t["v"], t.get("proj"), global_k=t.get("global_k"),
                          global_v=t.get("global_v"), rel_pos_bias=t.get("rel_pos_bias"), ln_local=ln("ln_local"),
                          ln_global=ln("ln_global"), key_padding_mask=mask, **settings)

    assert torch.autograd.gradcheck(fn, x)


def test_projected_entry_point_equals_the_whole_call():
    """ls_attention_2d_projected with the projection done outside gives ls_attention_2d's numbers."""
    (nx, ny), H, D, r = (5, 6), 2, 8, 3
    q, k, v = (randn(2, H, nx * ny, D, seed=i) for i in range(3))
    proj, gk, gv = randn(2, H, nx * ny, r, seed=3), randn(2, H, 1, D, seed=4), randn(2, H, 1, D, seed=5)
    table = randn(rel_pos_rows(4), H, seed=6)
    P = torch.softmax(proj, dim=2)
    kg, vg = P.transpose(-1, -2) @ k, P.transpose(-1, -2) @ v
    kw = dict(grid=(nx, ny), window=4, global_k=gk, global_v=gv, rel_pos_bias=table)
    whole = ls_attention_2d(q, k, v, proj, project_after_ln=False, **kw)
    torch.testing.assert_close(ls_attention_2d_projected(q, k, v, kg, vg, **kw), whole, **TIGHT)


def test_empty_batch_gives_empty_output_and_zero_gradients():
    q, k, v = (torch.zeros(0, 2, 12, 8, requires_grad=True) for _ in range(3))
    table = torch.zeros(rel_pos_rows(2), 2, requires_grad=True)
    out = ls_attention_2d(q, k, v, grid=(3, 4), window=2, rel_pos_bias=table)
    assert out.shape == (0, 2, 12, 8)
    (g,) = torch.autograd.grad(out.sum(), (table,))
    assert (g == 0).all()


def _args():
    q, k, v = (torch.zeros(1, 2, 12, 8) for _ in range(3))
    return dict(q=q, k=k, v=v, proj=None, grid=(3, 4), window=2, global_k=None, global_v=None, rel_pos_bias=None)


BAD = {  # argument -> (bad value, what the message names)
    "grid": ((4, 4), "grid"),
    "grid-type": ((3.0, 4), "grid"),
    "window": (-1, "window"),
    "rel_pos_bias": (torch.zeros(5, 2), "rel_pos_bias"),
    "rel_pos_bias-w1": (torch.zeros(1, 2), "window"),
    "global_k": (torch.zeros(1, 2, 1, 4), "global_k"),
    "global_v": (torch.zeros(1, 2, 1, 8, dtype=torch.float64), "global_v"),
    "proj": (torch.zeros(1, 2, 11, 3), "proj"),
    "key_padding_mask": (torch.zeros(1, 11, dtype=torch.bool), "key_padding_mask"),
    "backend": ("gpu", "backend"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_value_error_naming_it(name):
    kw = _args()
    value, named = BAD[name]
    arg = name.split("-")[0]
    if arg == "rel_pos_bias" and name.endswith("w1"):
        kw["window"] = 1
    if arg in ("global_k", "global_v"):
        kw["global_k"], kw["global_v"] = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)
    q, k, v, proj = kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("proj")
    kw[arg if arg != "proj" else "proj"] = value
    if arg == "proj":
        proj = kw.pop("proj")
    with pytest.raises(ValueError, match=named):
        ls_attention_2d(q, k, v, proj, **kw)


def test_nothing_to_attend_raises():
    q = torch.zeros(1, 2, 12, 8)
    with pytest.raises(ValueError, match="window, proj and global_k"):
        ls_attention_2d(q, q, q, grid=(3, 4), window=0)
    with pytest.raises(ValueError, match="window, k_proj and global_k"):
        ls_attention_2d_projected(q, q, q, grid=(3, 4), window=0)


def test_torch_compile_gives_the_eager_numbers():
    """torch.compile of ls_attention_2d on the blocked path: the eager output and gradients (bias table
    included), to fp32 rounding."""
    inputs, mask, settings = vision_inputs(VISION_CASES[3])
    compiled = torch.compile(blocked_2d)
    eager = run_2d(blocked_2d, inputs, mask, settings, torch.float32)
    got = run_2d(compiled, inputs, mask, settings, torch.float32)
    assert_matches(got, {n: t.double() for n, t in eager.items()}, rtol=1e-5)
