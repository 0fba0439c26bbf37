"""LongShortAttention against the reference composed by hand, dropout, autocast and bad arguments."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ls_kernels import LongShortAttention, ls_attention_projected
from ls_kernels.config import INTERPRET
from reference import ls_attention_ref, window_mask

E, H = 16, 2
D = E // H


def _masked_softmax(x, visible, dim):
    """Softmax over the visible entries; zeros where nothing is visible."""
    any_visible = visible.any(dim, keepdim=True)
    x = x.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    return torch.softmax(x, dim) * any_visible


def _dense_projected(q, k, v, kg, vg, *, window, causal, chunk, rank, pad):
    """Dense statement of attention over window keys and given projected keys (README, "What it computes"), fp64."""
    B, _, N, _ = q.shape
    t = torch.arange(N)[:, None]
    local = window_mask(N, window, causal)[None, None] & ~pad[:, None, None, :]
    G = kg.shape[2]
    if causal:
        nc = N // chunk
        chunk_real = (~pad[:, :nc * chunk]).reshape(B, nc, chunk).any(-1)  # (B, nc)
        g_chunk = torch.arange(G) // rank
        seen = (g_chunk[None, :] < t // chunk)[None, None] & chunk_real[:, g_chunk][:, None, None, :]
    else:
        seen = (~pad).any(-1)[:, None, None, None].expand(B, 1, N, G)
    scores = torch.cat([q @ kg.transpose(-1, -2), q @ k.transpose(-1, -2)], -1) / math.sqrt(q.shape[-1])
    visible = torch.cat([seen.expand(B, 1, N, G), local], -1)
    out = _masked_softmax(scores, visible, -1) @ torch.cat([vg, v], 2)
    return out.masked_fill(pad[:, None, :, None], 0.0)


def reference_layer(m, x, pad):
    """The layer's forward composed by hand from its parameters and the dense reference (fp64)."""
    B, N, _ = x.shape
    Hh, Dh, r = m.num_heads, m.head_dim, m.rank
    pad = torch.zeros(B, N, dtype=torch.bool) if pad is None else pad

    def heads(t):
        return t.reshape(B, N, Hh, Dh).transpose(1, 2)

    q, k, v = F.linear(x, m.q_proj.weight, m.q_proj.bias), F.linear(x, m.k_proj.weight, m.k_proj.bias), \
        F.linear(x, m.v_proj.weight, m.v_proj.bias)
    logits = F.linear(x, m.dproj.weight, m.dproj.bias).reshape(B, N, Hh, r).transpose(1, 2) if r else None
    if m.dual_ln == "model":
        def ln(t, side):
            return F.layer_norm(t, (m.embed_dim,), getattr(m, side + "_weight"), getattr(m, side + "_bias"), 1e-5)

        k_loc, v_loc = heads(ln(k, "ln_local")), heads(ln(v, "ln_local"))
        k_src, v_src = (k_loc, v_loc) if m.project_after_ln else (heads(k), heads(v))
        if r == 0:
            kg = vg = k_loc.new_zeros(B, Hh, 0, Dh)
        elif m.causal:  # softmax of the logits over each chunk's positions; chunk-major projected vectors
            nc = N // m.chunk
            P = logits[:, :, :nc * m.chunk].reshape(B, Hh, nc, m.chunk, r)
            P = _masked_softmax(P, ~pad[:, :nc * m.chunk].reshape(B, 1, nc, m.chunk, 1), 3)
            kg = (P.transpose(-1, -2) @ k_src[:, :, :nc * m.chunk].reshape(B, Hh, nc, m.chunk, Dh)).reshape(
                B, Hh, nc * r, Dh)
            vg = (P.transpose(-1, -2) @ v_src[:, :, :nc * m.chunk].reshape(B, Hh, nc, m.chunk, Dh)).reshape(
                B, Hh, nc * r, Dh)
        else:
            P = _masked_softmax(logits, ~pad[:, None, :, None], 2)
            kg, vg = P.transpose(-1, -2) @ k_src, P.transpose(-1, -2) @ v_src
        G = kg.shape[2]
        kg, vg = (heads_g.transpose(1, 2).reshape(B, G, m.embed_dim) for heads_g in (kg, vg))
        kg, vg = (ln(t, "ln_global").reshape(B, G, Hh, Dh).transpose(1, 2) for t in (kg, vg))
        o = _dense_projected(heads(q), k_loc, v_loc, kg, vg, window=m.window, causal=m.causal, chunk=m.chunk,
                             rank=r, pad=pad)
    else:
        lnl = (m.ln_local_weight, m.ln_local_bias) if m.ln_local_weight is not None else None
        lng = (m.ln_global_weight, m.ln_global_bias) if m.ln_global_weight is not None else None
        o = ls_attention_ref(heads(q), heads(k), heads(v), logits, window=m.window, causal=m.causal, chunk=m.chunk,
                             ln_local=lnl, ln_global=lng, project_after_ln=m.project_after_ln,
                             key_padding_mask=pad)
    return F.linear(o.transpose(1, 2).reshape(B, N, m.embed_dim), m.out_proj.weight, m.out_proj.bias)


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    m = LongShortAttention(E, H, **kw).double()
    with torch.no_grad():  # LN weights away from the 1 / 0 init, so that they matter
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def make_x(B, N, pad_kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, E, generator=g, dtype=torch.float64, requires_grad=True)
    pad = None
    if pad_kind == "rows":
        pad = torch.rand(B, N, generator=g) < 0.3
        pad[:, 0] = False
    elif pad_kind == "tail":  # the usual right padding, a whole chunk included
        pad = torch.zeros(B, N, dtype=torch.bool)
        pad[0, N - 9:] = True
    return x, pad


def _check_against_reference(m, x, pad, atol=1e-9):
    out = m(x, pad)
    ref = reference_layer(m, x, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    got = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
    want = torch.autograd.grad(ref, [x] + params, g, allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, p, a, b in zip(names, [x] + params, got, want):  # None: unused (e.g. LN_L with window 0)
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda s: f"{name}: {s}")


CASES = [  # causal, window, rank, chunk, N, pad
    (False, 4, 3, 16, 21, "none"),
    (False, 5, 2, 16, 23, "rows"),
    (False, 0, 2, 16, 12, "tail"),  # projection only
    (False, 3, 0, 16, 14, "rows"),  # window only
    (True, 4, 2, 4, 21, "none"),
    (True, 3, 1, 5, 23, "tail"),
    (True, 5, 2, 4, 18, "rows"),
    (True, 0, 2, 3, 13, "none"),
]


def _case_id(c):
    causal, w, r, chunk, N, pad = c
    return f"{'causal' if causal else 'bidir'}-w{w}-r{r}-l{chunk}-N{N}-pad_{pad}"


@pytest.mark.parametrize("dual_ln", ["head", "model", None], ids=["head", "model", "none"])
@pytest.mark.parametrize("c", CASES, ids=_case_id)
def test_layer_matches_reference(c, dual_ln):
    causal, w, r, chunk, N, pad_kind = c
    m = make_layer(window=w, rank=r, causal=causal, chunk=chunk, dual_ln=dual_ln, backend="torch")
    x, pad = make_x(2, N, pad_kind)
    _check_against_reference(m, x, pad)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_project_after_ln_default_and_override(causal, dual_ln):
    assert make_layer(window=2, rank=1, causal=causal).project_after_ln is (not causal)
    m = make_layer(window=3, rank=2, causal=causal, chunk=4, dual_ln=dual_ln, project_after_ln=causal)
    x, pad = make_x(2, 17, "rows")
    _check_against_reference(m, x, pad)


def test_padded_rows_give_output_bias():
    m = make_layer(window=3, rank=2)
    x, pad = make_x(2, 12, "tail")
    out = m(x, pad)
    torch.testing.assert_close(out[pad], m.out_proj.bias.detach().expand(int(pad.sum()), E))


# ----------------------------------------------------------------------------- Triton path (interpreter on CPU)

triton_only = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                 reason="needs CUDA or TRITON_INTERPRET=1")


@triton_only
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_layer_triton_matches_torch(dual_ln, causal):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = make_layer(window=4, rank=2, causal=causal, chunk=4, dual_ln=dual_ln, backend="torch").float().to(device)
    x, pad = make_x(2, 19, "rows")
    x, pad = x.detach().float().to(device).requires_grad_(), pad.to(device)
    out_t = m(x, pad)
    grads_t = torch.autograd.grad(out_t.sum(), [x] + list(m.parameters()))
    m.backend = "triton"
    out_k = m(x, pad)
    grads_k = torch.autograd.grad(out_k.sum(), [x] + list(m.parameters()))
    torch.testing.assert_close(out_k, out_t, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads_k, grads_t):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_dropout_is_unbiased_and_off_in_eval(dual_ln, causal):
    m = make_layer(window=3, rank=2, causal=causal, chunk=4, dual_ln=dual_ln, dropout=0.3, backend="torch")
    x, pad = make_x(1, 13, "rows")
    x = x.detach()
    m.eval()
    ref = reference_layer(m, x, pad)
    torch.testing.assert_close(m(x, pad), ref, atol=1e-9, rtol=0)
    m.train()
    torch.manual_seed(0)
    samples = torch.stack([m(x, pad) for _ in range(400)])
    assert not torch.allclose(samples[0], samples[1])
    # each output is linear in the keep mask: the sample mean converges to the eval output
    err = (samples.mean(0) - ref).abs().max().item()
    spread = samples.std(0).max().item()
    assert err < 5 * spread / math.sqrt(len(samples)) + 1e-6, (err, spread)
    out = m(x.requires_grad_(), pad)
    (g,) = torch.autograd.grad(out.sum(), [x])
    assert torch.isfinite(g).all()


def test_dropout_with_triton_backend_raises():
    with pytest.raises(ValueError, match=r"\bdropout\b"):
        LongShortAttention(E, H, window=2, rank=1, dropout=0.1, backend="triton")
    LongShortAttention(E, H, window=2, rank=1, dropout=0.0, backend="triton")
    q = torch.zeros(1, H, 8, D)
    with pytest.raises(ValueError, match=r"\bdropout_p\b"):
        ls_attention_projected(q, q, q, window=2, dropout_p=0.1, backend="triton")


# ----------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dual_ln", ["head", "model", None], ids=["head", "model", "none"])
def test_autocast_bf16_cpu(dual_ln, causal):
    m = make_layer(window=4, rank=2, causal=causal, chunk=4, dual_ln=dual_ln).float()
    x, pad = make_x(2, 24, "tail")
    x = x.detach().float().requires_grad_()
    ref = m(x, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, pad)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 Linear maps and attention products, fp32 statistics: bf16-level agreement
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() < 0.03 * scale
    out.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all()


@triton_only
@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_autocast_triton(dual_ln):
    """Under autocast the kernels get the autocast dtype (bf16 on CPU's interpreter, fp16 and bf16 on CUDA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.bfloat16,)
    m = make_layer(window=4, rank=2, causal=True, chunk=4, dual_ln=dual_ln, backend="triton").float().to(device)
    x, pad = make_x(2, 20, "tail")
    x, pad = x.detach().float().to(device).requires_grad_(), pad.to(device)
    ref = m(x, pad)
    for dtype in dtypes:
        with torch.autocast(device, dtype=dtype):
            out = m(x, pad)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max().item() < 0.03 * ref.abs().max().item()
        (g,) = torch.autograd.grad(out.float().sum(), [x])
        assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- arguments

BAD = {
    "embed_dim-not-divisible": (dict(embed_dim=10, num_heads=3), "embed_dim"),
    "embed_dim-zero": (dict(embed_dim=0), "embed_dim"),
    "num_heads-zero": (dict(num_heads=0), "num_heads"),
    "window-negative": (dict(window=-1), "window"),
    "window-float": (dict(window=2.0), "window"),
    "rank-negative": (dict(rank=-2), "rank"),
    "chunk-zero": (dict(chunk=0), "chunk"),
    "chunk-zero-causal": (dict(chunk=0, causal=True), "chunk"),
    "window-and-rank-zero": (dict(window=0, rank=0), "rank"),
    "dual_ln": (dict(dual_ln="layer"), "dual_ln"),
    "project_after_ln": (dict(project_after_ln="yes"), "project_after_ln"),
    "dropout-1": (dict(dropout=1.0), "dropout"),
    "dropout-negative": (dict(dropout=-0.1), "dropout"),
    "backend": (dict(backend="cuda"), "backend"),
    "causal": (dict(causal=1), "causal"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_constructor_arguments_raise(name):
    changes, arg = BAD[name]
    kw = dict(embed_dim=E, num_heads=H, window=2, rank=1)
    kw.update(changes)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        LongShortAttention(kw.pop("embed_dim"), kw.pop("num_heads"), **kw)


def test_bad_forward_input_raises():
    m = LongShortAttention(E, H, window=2, rank=1)
    with pytest.raises(ValueError, match=r"\bx\b"):
        m(torch.zeros(2, 5, E + 1))
    with pytest.raises(ValueError, match=r"\bkey_padding_mask\b"):
        m(torch.zeros(2, 5, E), torch.zeros(2, 6, dtype=torch.bool))
    m = LongShortAttention(E, H, window=2, rank=1, dual_ln="model")
    with pytest.raises(ValueError, match=r"\bkey_padding_mask\b"):
        m(torch.zeros(2, 5, E), torch.zeros(2, 5))


def test_char_lm_example_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "char_lm.py"), "--steps", "3", "--seconds", "20",
                          "--sample", "20", "--batch", "4", "--generate", "20"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "validation loss" in run.stdout and "sample:" in run.stdout
    assert "with the cache:" in run.stdout and "recomputing the prefix:" in run.stdout
