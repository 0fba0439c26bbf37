"""LongShortAttention.from_official_lra against a statement of the official LRA layer's equations.

The official layer is AttentionLS in NVIDIA/transformer-ls, lra/attention_transformer_ls.py
(read at commit 1527c5cc760daf1432a5c5c1fdc2ffb2f074c969). ``official_lra_forward`` below
restates its forward without the CLS token and without the depthwise conv, as equations:

    Q  = split(W_q X) / sqrt(d_h)
    K  = split(LN_l(W_k X)),  V = split(LN_l(W_v X))        LN over the whole model dim
    S  = softmax over the sequence of dconv_fc(X), padded positions -inf;
         channels head-major: (B, N, H, r) -> P (B, H, r, N)
    Kc = split(LN_s(merge(P K))),  Vc likewise                 merge: (B, H, r, d_h) -> (B, r, H d_h)
    window: queries in segments of w; segment g's keys are positions g w - e .. g w + w + e - 1
         of K zero-padded by e = max(w // 2, 1) on both sides, out-of-range and padded keys -inf
    A  = softmax([Q Kc^T, window scores]) in fp32; rows of padded queries set to 0
    C  = A_c Vc + A_w V_window;  out = W_o merge(C)

(N must be a multiple of w, as the official code's views require.)
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ls_kernels import LongShortAttention

COMMIT = "1527c5cc760daf1432a5c5c1fdc2ffb2f074c969"


def official_state_dict(E, H, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    sd = {}
    for name, rows in (("W_q", E), ("W_k", E), ("W_v", E), ("W_o", E), ("dconv_fc", H * r)):
        sd[name + ".weight"] = rnd(rows, E, scale=1 / math.sqrt(E))
        sd[name + ".bias"] = rnd(rows, scale=0.1)
    for name in ("dual_ln_l", "dual_ln_s"):
        sd[name + ".weight"] = 1 + rnd(E, scale=0.3)
        sd[name + ".bias"] = rnd(E, scale=0.3)
    return sd


def official_lra_forward(sd, X, mask, num_head, window, num_landmarks):
    """The official AttentionLS forward (no CLS token, no conv, eval mode); mask: 1 = real token."""
    B, N, E = X.shape
    d_h = E // num_head
    w, r = window, num_landmarks

    def linear(name, t):
        return t @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(name, t):
        return F.layer_norm(t, (E,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    def split(t):
        return t.reshape(B, t.shape[1], num_head, d_h).transpose(1, 2)

    padding = ~mask.bool()
    Q = split(linear("W_q", X)) / math.sqrt(d_h)
    K = split(ln("dual_ln_l", linear("W_k", X)))
    V = split(ln("dual_ln_l", linear("W_v", X)))
    scores = []
    if r > 0:
        S = linear("dconv_fc", X).masked_fill(padding[:, :, None], float("-inf"))
        S = torch.softmax(S.float(), dim=1).to(X.dtype)  # over the sequence
        P = S.reshape(B, N, num_head, r).permute(0, 2, 3, 1)  # (B, H, r, N)
        Kc, Vc = P @ K, P @ V  # (B, H, r, d_h)
        Kc = split(ln("dual_ln_s", Kc.transpose(1, 2).reshape(B, r, E)))
        Vc = split(ln("dual_ln_s", Vc.transpose(1, 2).reshape(B, r, E)))
        scores.append(Q @ Kc.transpose(-1, -2))  # (B, H, N, r)
    if w > 0:
        e = max(w // 2, 1)
        n_seg = N // w
        Kp, Vp = F.pad(K, (0, 0, e, e)), F.pad(V, (0, 0, e, e))
        key_pad = F.pad(padding, (e, e), value=True)
        idx = torch.arange(n_seg)[:, None] * w + torch.arange(w + 2 * e)[None, :]  # (n_seg, w + 2e) padded coords
        K_tiles, V_tiles = Kp[:, :, idx], Vp[:, :, idx]  # (B, H, n_seg, w + 2e, d_h)
        Q_tiles = Q.reshape(B, num_head, n_seg, w, d_h)
        win = (Q_tiles @ K_tiles.transpose(-1, -2)).masked_fill(key_pad[:, idx][:, None, :, None, :], float("-inf"))
        scores.append(win.reshape(B, num_head, N, w + 2 * e))
    A = torch.softmax(torch.cat(scores, -1).float(), dim=-1).to(X.dtype)
    A = A.masked_fill(padding[:, None, :, None], 0.0)
    C = 0
    if r > 0:
        C = C + A[..., :r] @ Vc
    if w > 0:
        A_w = A[..., r:].reshape(B, num_head, N // w, w, -1)
        C = C + (A_w @ V_tiles).reshape(B, num_head, N, d_h)
    return linear("W_o", C.transpose(1, 2).reshape(B, N, E))


CASES = [  # E, H, window, rank, N, padded
    (64, 2, 8, 32, 64, False),  # the paper's LRA (w, r) = (8, 32), H = 2, d_h = 32
    (64, 2, 16, 2, 64, True),  # ListOps best (16, 2)
    (64, 2, 1, 1, 24, True),  # Text best (1, 1): 3 keys per window
    (32, 4, 5, 3, 40, True),  # odd window
    (32, 2, 0, 4, 24, True),  # projection only
    (32, 2, 4, 0, 24, True),  # window only
]


@pytest.mark.parametrize("c", CASES, ids=lambda c: f"E{c[0]}-H{c[1]}-w{c[2]}-r{c[3]}-N{c[4]}-pad{c[5]}")
def test_from_official_lra_matches_official_equations(c):
    E, H, w, r, N, padded = c
    sd = official_state_dict(E, H, r)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, N, E, generator=g)
    mask = torch.ones(3, N, dtype=torch.long)
    if padded:  # right padding as in LRA batches, every sequence keeps real tokens
        mask[1, N - N // 3:] = 0
        mask[2, 5:] = 0
    layer = LongShortAttention.from_official_lra(sd, num_heads=H, window=w, rank=r)
    assert layer.dual_ln == "model" and layer.project_after_ln and not layer.causal
    out = layer(X, key_padding_mask=~mask.bool())
    ref = official_lra_forward(sd, X, mask, H, w, r)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_from_official_lra_gradients_match():
    E, H, w, r, N = 32, 2, 4, 3, 24
    sd = {k: v.double() for k, v in official_state_dict(E, H, r).items()}
    layer = LongShortAttention.from_official_lra(sd, num_heads=H, window=w, rank=r)
    assert layer.q_proj.weight.dtype == torch.float64
    X = torch.randn(2, N, E, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, N)
    mask[0, 17:] = 0
    grad = torch.randn(2, N, E, dtype=torch.float64)
    (gx,) = torch.autograd.grad(layer(X, ~mask.bool()), X, grad)
    (gx_ref,) = torch.autograd.grad(official_lra_forward(sd, X, mask, H, w, r), X, grad)
    # the official softmaxes run in fp32 even for fp64 inputs: fp32-level agreement
    torch.testing.assert_close(gx, gx_ref, atol=5e-6, rtol=1e-5)


def test_from_official_lra_prefix_and_errors():
    E, H, r = 32, 2, 2
    sd = official_state_dict(E, H, r)
    model_sd = {f"transformer_0.mha.{k}": v for k, v in sd.items()}
    model_sd["transformer_0.norm1.weight"] = torch.ones(E)
    layer = LongShortAttention.from_official_lra(model_sd, num_heads=H, window=4, rank=r, prefix="transformer_0.mha.")
    torch.testing.assert_close(layer.dproj.weight, sd["dconv_fc.weight"])
    torch.testing.assert_close(layer.ln_global_bias, sd["dual_ln_s.bias"])
    with pytest.raises(ValueError, match="conv"):
        LongShortAttention.from_official_lra({**sd, "conv.weight": torch.zeros(H, 1, 3, 1)}, H, 4, r)
    with pytest.raises(ValueError, match="missing"):
        LongShortAttention.from_official_lra({k: v for k, v in sd.items() if k != "W_o.bias"}, H, 4, r)
    with pytest.raises(ValueError, match=r"\brank\b"):
        LongShortAttention.from_official_lra(sd, H, 4, r + 1)
    with pytest.raises(ValueError, match=r"\bembed_dim\b"):
        LongShortAttention.from_official_lra(sd, 3, 4, r)
    with pytest.raises(ValueError, match=r"\bwindow\b"):
        LongShortAttention.from_official_lra(sd, H, -1, r)
