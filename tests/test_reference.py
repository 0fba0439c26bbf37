"""Properties of the dense reference ``ls_attention_ref`` itself, in fp64."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from reference import ls_attention_ref


TIGHT = dict(rtol=1e-12, atol=1e-12)


def make(B, H, N, D, r=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    proj = None if r is None else torch.randn(B, H, N, r, generator=g, dtype=torch.float64)
    return q, k, v, proj


def ln_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64),
            0.5 * torch.randn(shape, generator=g, dtype=torch.float64))


def grads(out, inputs):
    """Gradients of sum(out * fixed random weights) w.r.t. inputs (zeros where unused)."""
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    gs = torch.autograd.grad(out, inputs, g_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


@pytest.mark.parametrize("N,w", [(1, 1), (7, 7), (10, 13), (33, 100)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_window_covering_sequence_equals_sdpa(N, w, scale):
    q, k, v, _ = make(2, 3, N, 8)
    out = ls_attention_ref(q, k, v, window=w, scale=scale)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), **TIGHT)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_appended_padding_changes_nothing(causal, after):
    N, extra = 21, 11  # N is not a multiple of the window or the chunk
    q, k, v, proj = make(2, 3, N + extra, 8, r=3)
    q, k, v, proj = (torch.cat([x[:, :, :N], 100 * x[:, :, N:]], dim=2) for x in (q, k, v, proj))
    kw = dict(window=4, causal=causal, chunk=4, ln_local=ln_pair((3, 8), 2), ln_global=ln_pair((8,), 3),
              project_after_ln=after)
    mask = torch.zeros(2, N + extra, dtype=torch.bool)
    mask[:, N:] = True
    long = ls_attention_ref(q, k, v, proj, key_padding_mask=mask, **kw)
    short = ls_attention_ref(q[:, :, :N], k[:, :, :N], v[:, :, :N], proj[:, :, :N], **kw)
    assert_close(long[:, :, :N], short, **TIGHT)
    assert (long[:, :, N:] == 0).all()


@pytest.mark.parametrize("t", [0, 3, 5, 7, 8, 18])  # chunk = 4: 3 and 7 end a chunk, 8 starts one
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_causal_future_does_not_leak(t, after):
    N = 20
    inputs = make(2, 3, N, 8, r=2)
    kw = dict(window=3, causal=True, chunk=4, ln_local=ln_pair((8,), 2), ln_global=ln_pair((3, 8), 3),
              project_after_ln=after)
    noise = make(2, 3, N, 8, r=2, seed=5)
    changed = [x.clone() for x in inputs]
    for x, n in zip(changed, noise):
        x[:, :, t + 1:] += n[:, :, t + 1:]
    out = ls_attention_ref(*inputs, **kw)
    out_changed = ls_attention_ref(*changed, **kw)
    assert torch.equal(out[:, :, :t + 1], out_changed[:, :, :t + 1])
    assert not torch.equal(out, out_changed)  # the perturbation is not a no-op

    leaves = [x.clone().requires_grad_() for x in inputs]
    for g in grads(ls_attention_ref(*leaves, **kw)[:, :, :t + 1], leaves):
        assert (g[:, :, t + 1:] == 0).all()


@pytest.mark.parametrize("ln", [False, True], ids=["noLN", "LN"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_projection_only_is_permutation_equivariant(ln, after):
    N = 17
    q, k, v, proj = make(2, 3, N, 8, r=4)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    kw = dict(window=0, project_after_ln=after,
              ln_local=ln_pair((3, 8), 2) if ln else None, ln_global=ln_pair((8,), 3) if ln else None)
    out = ls_attention_ref(q, k, v, proj, **kw)
    out_perm = ls_attention_ref(*(x[:, :, perm] for x in (q, k, v, proj)), **kw)
    assert_close(out_perm, out[:, :, perm], **TIGHT)


def test_causal_first_chunk_without_window_sees_nothing():
    leaves = [x.requires_grad_() for x in make(2, 3, 10, 8, r=2)]
    out = ls_attention_ref(*leaves, window=0, causal=True, chunk=4, ln_global=ln_pair((8,), 3))
    assert (out[:, :, :4] == 0).all()  # queries 0..3 see no earlier chunk
    assert (out[:, :, 4:] != 0).any()
    gs = grads(out, leaves)
    assert all(torch.isfinite(g).all() for g in gs)
    assert (gs[0][:, :, :4] == 0).all()  # their queries do not matter


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padded_queries_and_fully_padded_sequence_give_zeros(causal):
    B, H, N, D = 2, 3, 12, 8
    leaves = [x.requires_grad_() for x in make(B, H, N, D, r=2)]
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, [1, 5, 6, 11]] = True  # some padded rows
    mask[1] = True  # every key of sequence 1 is padding
    out = ls_attention_ref(*leaves, window=3, causal=causal, chunk=4, key_padding_mask=mask,
                           ln_local=ln_pair((D,), 2), ln_global=ln_pair((D,), 3))
    assert (out.transpose(1, 2)[mask] == 0).all()
    assert (out.transpose(1, 2)[~mask] != 0).any()
    for g in grads(out, leaves):
        assert torch.isfinite(g).all()
        assert (g.transpose(1, 2)[mask] == 0).all()


def test_ln_global_none_means_no_normalisation():  # SPEC: None = that side is not normalised
    q, k, v, proj = make(1, 2, 9, 4, r=2)
    P = torch.softmax(proj, dim=2)  # over the N positions
    expected = F.scaled_dot_product_attention(q, P.mT @ k, P.mT @ v)
    assert_close(ls_attention_ref(q, k, v, proj, window=0), expected, **TIGHT)
