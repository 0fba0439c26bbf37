"""Causal calls with keys beyond the queries (k, v, proj, key_padding_mask over Nk >= Nq positions, the queries
the last Nq of them): against the fp64 reference on both backends, forward and every gradient; the rows of a
full call; gradcheck on the blocked path; bidirectional calls keep Nk == Nq."""
import pytest
import torch

from cases import DEVICE, TINY
from ls_kernels import ls_attention
from ls_kernels.config import INTERPRET
from reference import ls_attention_ref
from reference.inputs import make_inputs, to64

BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" or INTERPRET else [])

# (Nq, Nk, D, w, r, chunk, pad, ln_local, ln_global, project_after_ln)
CASES = [
    (1, 63, 40, 8, 1, 16, "none", "head", "shared", False),
    (17, 111, 48, 3, 3, 4, "rows", "shared", "head", True),
    (40, 64, 16, 0, 2, 8, "none", None, "shared", False),  # projection only
    (5, 45, 16, 1, None, 16, "rows", "head", None, False),  # window only, w = 1
    (30, 30, 16, 16, 2, 1, "chunk", "head", "head", True),  # Nk == Nq, chunk 1
    (9, 100, 16, 120, 1, 7, "none", None, None, False),  # window longer than the keys
]


def case_id(c):
    Nq, Nk, D, w, r, chunk, pad, lnL, lnG, after = c
    return f"B2-H3-Nq{Nq}-Nk{Nk}-D{D}-w{w}-r{r}-l{chunk}-pad_{pad}-lnL_{lnL}-lnG_{lnG}{'-after' if after else ''}"


def _inputs(c, dtype, seed=0):
    """(q of the last Nq positions, k, v, proj, keyword arguments), leaves requiring grad."""
    Nq, Nk, D, w, r, chunk, pad, lnL, lnG, after = c
    q, k, v, proj, kw = make_inputs(2, 3, Nk, D, r, dtype=dtype, pad=pad, chunk=chunk, ln_local=lnL,
                                    ln_global=lnG, seed=seed, device=DEVICE)
    q = q[:, :, Nk - Nq:].clone()
    leaves = [x for x in (q, k, v, proj) if x is not None]
    leaves += [x for side in ("ln_local", "ln_global") if kw[side] is not None for x in kw[side]]
    for x in leaves:
        x.requires_grad_()
    kw.update(window=w, causal=True, project_after_ln=after)
    return q, k, v, proj, kw, leaves


def _out_and_grads(fn, q, k, v, proj, kw, leaves, seed=1):
    out = fn(q, k, v, proj, **kw)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g_out.to(DEVICE, out.dtype), allow_unused=True)
    return [out] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _ref64(q, k, v, proj, kw, leaves):
    leaves64 = [to64(x) for x in leaves]
    swap = {id(x): y for x, y in zip(leaves, leaves64)}
    kw64 = dict(kw, **{s: None if kw[s] is None else tuple(swap[id(x)] for x in kw[s])
                       for s in ("ln_local", "ln_global")})
    args = [None if x is None else swap[id(x)] for x in (q, k, v, proj)]
    return _out_and_grads(ls_attention_ref, *args, kw64, leaves64)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_reference_rows_of_the_full_call(c):
    """The reference's own rule: the last Nq rows of a call with every query equal a call with only those."""
    q, k, v, proj, kw, _ = _inputs(c, torch.float64)
    Nq, Nk = c[0], c[1]
    q_full = torch.randn(2, 3, Nk, c[2], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    q_full[:, :, Nk - Nq:] = q.detach()
    full = ls_attention_ref(q_full, k, v, proj, **kw)
    torch.testing.assert_close(ls_attention_ref(q, k, v, proj, **kw), full[:, :, Nk - Nq:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_keys_beyond_queries_fp64(c, backend):
    """Output and the gradients of q, k, v, proj and the LN parameters at 1e-10 of the fp64 reference."""
    q, k, v, proj, kw, leaves = _inputs(c, torch.float64)
    got = _out_and_grads(lambda *a, **k_: ls_attention(*a, backend=backend, **k_), q, k, v, proj, kw, leaves)
    ref = _ref64(q, k, v, proj, kw, leaves)
    assert got[0].shape == q.shape
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, i=i: f"output/grad {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES[:2], ids=case_id)
def test_keys_beyond_queries_fp16_two_times_rule(c, backend):
    """fp16: every error against fp64 at most 2x that of the same-dtype reference (plus a tiny atol)."""
    q, k, v, proj, kw, leaves = _inputs(c, torch.float16)
    got = _out_and_grads(lambda *a, **k_: ls_attention(*a, backend=backend, **k_), q, k, v, proj, kw, leaves)
    ref = _ref64(q, k, v, proj, kw, leaves)
    same = _out_and_grads(lambda *a, **k_: ls_attention_ref(*a, upcast=False, **k_), q, k, v, proj, kw, leaves)
    for i, (a, r, s) in enumerate(zip(got, ref, same)):
        assert torch.isfinite(a).all(), i
        err, err_same = ((x.double() - r).abs().max().item() for x in (a, s))
        scale = max(1.0, r.abs().max().item())  # proj and LN gradients sum over positions (see test_triton_backward)
        assert err <= 2 * err_same + TINY[torch.float16] * scale, (i, err, err_same)


@pytest.mark.parametrize("c", [CASES[1], CASES[3]], ids=case_id)
def test_keys_beyond_queries_gradcheck(c):
    """Full fp64 gradcheck of the blocked path w.r.t. q, k, v, proj and the LN parameters, Nk > Nq."""
    Nq, Nk, D, w, r, chunk, pad, lnL, lnG, after = c
    small = (min(Nq, 3), min(Nk, 13), 4, min(w, 5), r, min(chunk, 4), pad, lnL, lnG, after)
    q, k, v, proj, kw, leaves = _inputs(small, torch.float64)
    n_qkv = sum(x is not None for x in (q, k, v, proj))

    def fn(*xs):
        lnl = (xs[n_qkv], xs[n_qkv + 1]) if kw["ln_local"] is not None else None
        rest = xs[n_qkv + (2 if lnl else 0):]
        lng = (rest[0], rest[1]) if kw["ln_global"] is not None else None
        args = list(xs[:3]) + [xs[3] if proj is not None else None]
        return ls_attention(*args, **dict(kw, ln_local=lnl, ln_global=lng), backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_needs_equal_lengths(backend):
    q, k, v, proj, kw = make_inputs(1, 2, 16, 8, 2, device=DEVICE)
    with pytest.raises(ValueError, match="k must have the shape of q.*only causal"):
        ls_attention(q[:, :, 4:], k, v, proj, window=4, causal=False, backend=backend, **kw)
    with pytest.raises(ValueError, match="k must have"):  # fewer keys than queries
        ls_attention(q, k[:, :, 4:], v[:, :, 4:], proj[:, :, 4:], window=4, causal=True, backend=backend,
                     **dict(kw, key_padding_mask=None))
    with pytest.raises(ValueError, match="proj must have shape"):  # proj over the queries, not the keys
        ls_attention(q[:, :, 4:], k, v, proj[:, :, 4:], window=4, causal=True, backend=backend, **kw)
