"""LongShortAttention2d.from_official_vil against a statement of the official vision layer's equations.

The official layer is AttentionLS in NVIDIA/transformer-ls, imagenet/models/layers/transformer_ls.py (read at
commit 1527c5cc760daf1432a5c5c1fdc2ffb2f074c969). ``official_vil_forward`` below restates its forward (eval
mode, a square n x n grid with n a multiple of w, nglo global tokens first) as equations:

    Q  = split(qkv_q X) * scale                          (scale = head_dim ** -0.5)
    K  = split(LN_full(qkv_k X)),  V = split(LN_full(qkv_v X))   LN over the whole model dim, globals included
    P  = softmax over the n^2 patch positions of to_dynamic_projection(X_patches) in fp32, channels head-major:
         (B, n^2, H r) -> (B, H, r, n^2)
    Kc = split(LN_dp(merge(P K))),  Vc likewise            (patch rows of K, V only)
    window: queries in w x w patches; patch (a, b) scores the (w + 2s)^2 keys of rows a w - s .. a w + w + s - 1
         and columns b w - s .. b w + w + s - 1 of K zero-padded by s = max(w // 2, 1); the first/last patch
         row/column fills the s padded rows/columns with -inf; plus the bias table at the official index
         ((qr - kr + p + w - 1)(2p + w) + qc - kc + p + w - 1, p = w // 2, in patch coordinates)
    A  = softmax([Q Kc^T, window scores, Q K_glob^T]) in fp32
    C  = A_c Vc + A_w V_window + A_glob * V_glob          (elementwise: one global token)
    global queries: softmax([Q_glob K_glob^T, Q_glob C^T]) in fp32; C_glob = A_g V_glob + A_p C
    out = proj(merge([C_glob, C]))
"""
import pytest
import torch
import torch.nn.functional as F

import ls_kernels.layer2d as layer2d
from ls_kernels import LongShortAttention2d, ls_attention_2d_projected
from ls_kernels.config import INTERPRET, rel_pos_rows
from reference import ls_attention_2d_ref

COMMIT = "1527c5cc760daf1432a5c5c1fdc2ffb2f074c969"


def official_state_dict(E, H, w, r, *, qkv_bias=True, rpe=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    sd = {"qkv.weight": rnd(3 * E, E, scale=E ** -0.5), "proj.weight": rnd(E, E, scale=E ** -0.5),
          "proj.bias": rnd(E, scale=0.1)}
    if qkv_bias:
        sd["qkv.bias"] = rnd(3 * E, scale=0.1)
    if r > 0:
        sd["to_dynamic_projection.weight"] = rnd(H * r, E, scale=E ** -0.5)
        sd["to_dynamic_projection.bias"] = rnd(H * r, scale=0.1)
    for name in ("dual_ln_dp", "dual_ln_full"):
        sd[name + ".weight"] = 1 + rnd(E, scale=0.3)
        sd[name + ".bias"] = rnd(E, scale=0.3)
    if rpe:
        p = w // 2
        sd["local_relative_position_bias_table"] = rnd(2 * (w + p - 1) * (2 * p + w + 1) + 1, H, scale=0.5)
        sd["relative_position_index"] = official_index(w)
    return sd


def official_index(w):
    """(w^2, (w + 2p)^2): the official relative_position_index, by its equations."""
    p = w // 2
    kv = [(a, b) for a in range(-p, p + w) for b in range(-p, p + w)]
    qs = [(a, b) for a in range(w) for b in range(w)]
    return torch.tensor([[(qa - ka + p + w - 1) * (2 * p + w) + (qb - kb + p + w - 1) for ka, kb in kv]
                         for qa, qb in qs])


def official_vil_forward(sd, x, n, H, w, r, nglo, scale=None, elementwise_global=True):
    """The official AttentionLS forward (eval mode) on an n x n grid; elementwise_global: its A_glob * V_glob
    (one global token); False: the sum over the global tokens that it stands for."""
    B, T, E = x.shape
    d = E // H
    scale = d ** -0.5 if scale is None else scale

    def linear(name, t, rows=None):
        W, b = sd[name + ".weight"], sd.get(name + ".bias")
        if rows is not None:
            W, b = W[rows], None if b is None else b[rows]
        return t @ W.T + (0 if b is None else b)

    def ln(name, t):
        return F.layer_norm(t, (E,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def split(t):
        return t.reshape(B, t.shape[1], H, d).transpose(1, 2)

    Q = split(linear("qkv", x, slice(0, E))) * scale
    K = split(ln("dual_ln_full", linear("qkv", x, slice(E, 2 * E))))
    V = split(ln("dual_ln_full", linear("qkv", x, slice(2 * E, 3 * E))))
    Qg, Q = Q[:, :, :nglo], Q[:, :, nglo:]
    Kg, K = K[:, :, :nglo], K[:, :, nglo:]
    Vg, V = V[:, :, :nglo], V[:, :, nglo:]
    N = n * n
    scores = []
    if r > 0:
        c = linear("to_dynamic_projection", x[:, nglo:]).transpose(1, 2).reshape(B, H, r, N)
        P = torch.softmax(c.float(), dim=-1).to(x.dtype)  # over the patch positions
        Kc = split(ln("dual_ln_dp", (P @ K).transpose(1, 2).reshape(B, r, E)))
        # the official P^T V runs on V.float(): the same for fp32 inputs (fp64 ones it would not multiply)
        Vc = split(ln("dual_ln_dp", (P @ V).transpose(1, 2).reshape(B, r, E)))
        scores.append(Q @ Kc.transpose(-1, -2))  # (B, H, N, r)
    s = max(w // 2, 1)
    S = w + 2 * s
    ng = n // w
    Kp = F.pad(K.reshape(B, H, n, n, d), (0, 0, s, s, s, s))
    Vp = F.pad(V.reshape(B, H, n, n, d), (0, 0, s, s, s, s))
    win_scores, win_values = torch.empty(B, H, N, S * S, dtype=x.dtype), torch.empty(B, H, N, S * S, d, dtype=x.dtype)
    table = sd.get("local_relative_position_bias_table")
    index = sd.get("relative_position_index")
    for a in range(ng):
        for b in range(ng):
            rows = [(a * w + i) * n + b * w + j for i in range(w) for j in range(w)]  # the patch's queries
            k_t = Kp[:, :, a * w:a * w + S, b * w:b * w + S].reshape(B, H, S * S, d)
            v_t = Vp[:, :, a * w:a * w + S, b * w:b * w + S].reshape(B, H, S * S, d)
            dots = (Q[:, :, rows] @ k_t.transpose(-1, -2)).reshape(B, H, w * w, S, S)
            if a == 0:
                dots[:, :, :, :s] = float("-inf")
            if a == ng - 1:
                dots[:, :, :, -s:] = float("-inf")
            if b == 0:
                dots[:, :, :, :, :s] = float("-inf")
            if b == ng - 1:
                dots[:, :, :, :, -s:] = float("-inf")
            dots = dots.reshape(B, H, w * w, S * S)
            if table is not None:
                dots = dots + table[index.reshape(-1)].reshape(w * w, S * S, H).permute(2, 0, 1)
            win_scores[:, :, rows] = dots
            win_values[:, :, rows] = v_t[:, :, None]
    scores.append(win_scores)
    scores.append(Q @ Kg.transpose(-1, -2))
    A = torch.softmax(torch.cat(scores, -1).float(), dim=-1).to(x.dtype)
    C = (A[..., r:r + S * S, None] * win_values).sum(-2)
    if r > 0:
        C = C + A[..., :r] @ Vc
    A_glob = A[..., r + S * S:]
    C = C + (A_glob.mul(Vg) if elementwise_global else A_glob @ Vg)
    cls = torch.softmax(torch.cat([Qg @ Kg.transpose(-1, -2), Qg @ C.transpose(-1, -2)], -1).float(), -1).to(x.dtype)
    C_glob = cls[..., nglo:] @ C + cls[..., :nglo] @ Vg
    out = torch.cat([C_glob, C], dim=2)
    return linear("proj", out.transpose(1, 2).reshape(B, T, E))


# the official launch scripts' long-short stages (imagenet/launch/eval/eval_medium_224.sh and _384.sh: stage 1
# d96 h3, stage 2 d192 h3, f7 at 224 px and f8 at 384 px, r8, one CLS token, bias on): the stage grids of a
# 224 px image (56 x 56, 28 x 28) and of a 384 px one (96 x 96, 48 x 48); then small grids of two patches a side
CASES = [  # E, H, w, r, n, qkv_bias
    (96, 3, 7, 8, 56, True),
    (192, 3, 7, 8, 28, True),
    (96, 3, 8, 8, 96, True),
    (192, 3, 8, 8, 48, True),
    (48, 3, 7, 8, 14, True),
    (48, 3, 8, 8, 16, False),
    (32, 2, 2, 3, 6, True),  # the smallest window with a bias table
    (32, 2, 3, 0, 9, True),  # window and CLS only
]


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"E{c[0]}-H{c[1]}-w{c[2]}-r{c[3]}-grid{c[4]}x{c[4]}-qkvbias{c[5]}")
def test_from_official_vil_matches_official_equations(c):
    E, H, w, r, n, qkv_bias = c
    sd = official_state_dict(E, H, w, r, qkv_bias=qkv_bias)
    x = torch.randn(2, 1 + n * n, E, generator=torch.Generator().manual_seed(1))
    layer = LongShortAttention2d.from_official_vil(sd, num_heads=H, window=w, rank=r)
    assert layer.rel_pos_bias is not None and (layer.q_proj.bias is not None) == qkv_bias
    with torch.no_grad():
        out = layer(x, grid=(n, n))
        ref = official_vil_forward(sd, x, n, H, w, r, nglo=1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
def test_from_official_vil_on_the_kernels():
    """The layer on the Triton kernels (the interpreter without a GPU) against the official equations, w 7."""
    E, H, w, r, n, _ = CASES[4]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sd = {k: v.to(dev) for k, v in official_state_dict(E, H, w, r).items()}
    x = torch.randn(2, 1 + n * n, E, generator=torch.Generator().manual_seed(1)).to(dev)
    layer = LongShortAttention2d.from_official_vil(sd, num_heads=H, window=w, rank=r, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(layer(x, grid=(n, n)), official_vil_forward(sd, x, n, H, w, r, nglo=1),
                                   atol=2e-5, rtol=1e-5)


def test_from_official_vil_gradients_match():
    E, H, w, r, n = 32, 2, 4, 3, 8
    sd = {k: v.double() if v.is_floating_point() else v for k, v in official_state_dict(E, H, w, r).items()}
    layer = LongShortAttention2d.from_official_vil(sd, num_heads=H, window=w, rank=r)
    assert layer.q_proj.weight.dtype == torch.float64
    x = torch.randn(2, 1 + n * n, E, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 1 + n * n, E, dtype=torch.float64)
    table = sd["local_relative_position_bias_table"].requires_grad_(True)
    gx, gt = torch.autograd.grad(layer(x, grid=(n, n)), (x, layer.rel_pos_bias), grad)
    gx_ref, gt_ref = torch.autograd.grad(official_vil_forward(sd, x, n, H, w, r, nglo=1), (x, table), grad)
    # the official softmaxes run in fp32 even for fp64 inputs: fp32-level agreement
    torch.testing.assert_close(gx, gx_ref, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(gt, gt_ref, atol=5e-6, rtol=1e-5)


def test_two_global_tokens_sum_their_values():
    """With G = 2 the official elementwise product does not broadcast; the layer sums a_g v_g over them."""
    E, H, w, r, n = 32, 2, 2, 3, 4
    sd = {k: v.double() if v.is_floating_point() else v for k, v in official_state_dict(E, H, w, r).items()}
    layer = LongShortAttention2d.from_official_vil(sd, num_heads=H, window=w, rank=r, num_global=2)
    x = torch.randn(2, 2 + n * n, E, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        official_vil_forward(sd, x, n, H, w, r, nglo=2)
    ref = official_vil_forward(sd, x, n, H, w, r, nglo=2, elementwise_global=False)
    torch.testing.assert_close(layer(x, grid=(n, n)), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grid,w", [((5, 9), 3), ((6, 4), 4), ((7, 7), 2)], ids=lambda x: str(x))
def test_layer_any_grid_matches_reference(grid, w, monkeypatch):
    """Rectangular grids and grids w does not divide (the official code takes neither): the layer's patch
    attention is the reference's 2D attention of the keys it normalised, on that grid."""
    E, H, r = 24, 2, 3
    layer = LongShortAttention2d(E, H, window=w, rank=r, num_global=1).double()
    x = torch.randn(2, 1 + grid[0] * grid[1], E, dtype=torch.float64)
    calls = []

    def spy(*args, **kwargs):
        out = ls_attention_2d_projected(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    monkeypatch.setattr(layer2d, "ls_attention_2d_projected", spy)
    layer(x, grid=grid)
    ((q, k, v, kg, vg), kw, out), = calls
    assert kw["grid"] == grid and q.shape[2] == grid[0] * grid[1]
    ref = ls_attention_2d_ref(q, k, v, k_proj=kg, v_proj=vg, grid=grid, window=w, global_k=kw["global_k"],
                              global_v=kw["global_v"], rel_pos_bias=kw["rel_pos_bias"], scale=kw["scale"])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_from_official_vil_prefix_and_errors():
    E, H, w, r = 32, 2, 4, 2
    sd = official_state_dict(E, H, w, r, rpe=False)
    model_sd = {f"layers.0.attn.{k}": v for k, v in sd.items()}
    model_sd["layers.0.norm1.weight"] = torch.ones(E)
    layer = LongShortAttention2d.from_official_vil(model_sd, num_heads=H, window=w, rank=r, prefix="layers.0.attn.")
    assert layer.rel_pos_bias is None
    torch.testing.assert_close(layer.k_proj.weight, sd["qkv.weight"][E:2 * E])
    torch.testing.assert_close(layer.ln_global_bias, sd["dual_ln_dp.bias"])
    with pytest.raises(ValueError, match="missing"):
        LongShortAttention2d.from_official_vil({k: v for k, v in sd.items() if k != "proj.bias"}, num_heads=H,
                                               window=w, rank=r)
    with pytest.raises(ValueError, match=r"\brank\b"):
        LongShortAttention2d.from_official_vil(sd, num_heads=H, window=w, rank=r + 1)
    with pytest.raises(ValueError, match=r"\bwindow\b"):
        LongShortAttention2d.from_official_vil(official_state_dict(E, H, w, r), num_heads=H, window=w + 2, rank=r)
    with pytest.raises(ValueError, match=r"\bnum_heads\b"):
        LongShortAttention2d.from_official_vil(sd, num_heads=3, window=w, rank=r)
    assert tuple(LongShortAttention2d(E, H, window=6, rank=0).rel_pos_bias.shape) == (rel_pos_rows(6), H)
