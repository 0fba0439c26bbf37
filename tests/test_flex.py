"""bench/flex_ls.py (the sweep's `flex` method) computes the same long-short attention as ls_attention."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from flex_ls import block_mask, ls_flex, ls_mask_mod  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

from ls_kernels import ls_attention  # noqa: E402

# causal, N, window, rank, chunk, LN shape (None, "shared", "head"), project_after_ln
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [
    (True, 64, 8, 2, 4, "shared", False),
    (True, 61, 7, 1, 4, "head", True),  # N not a multiple of the chunk or the window
    (True, 64, 100, 3, 16, "shared", False),  # window longer than N
    (True, 64, 0, 2, 8, "head", False),  # projection only: the first chunk sees nothing
    (True, 64, 5, None, 4, None, False),  # window only
    (False, 64, 8, 3, 16, "head", True),
    (False, 61, 5, 2, 16, "shared", False),
    (False, 64, 1, 1, 16, None, True),
    (False, 64, 0, 4, 16, "shared", False),
    (False, 50, 16, None, 16, "head", False),
]


def inputs(causal, N, w, r, chunk, ln, after, B=2, H=3, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    proj = torch.randn(B, H, N, r, generator=g) if r else None
    shape = {None: None, "shared": (D,), "head": (H, D)}[ln]
    lns = [None if shape is None else (1 + 0.3 * torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g))
           for _ in range(2)]
    return (q, k, v, proj), dict(window=w, causal=causal, chunk=chunk, ln_local=lns[0], ln_global=lns[1],
                                 project_after_ln=after)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_flex_eager_matches_ls_attention(case):
    args, kw = inputs(*case)
    expected = ls_attention(*args, backend="torch", **kw)
    actual = ls_flex(*args, compile=False, **kw)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_flex_compiled_matches_ls_attention():
    """The compiled kernel, as the sweep times it."""
    args, kw = inputs(True, 128, 16, 2, 8, "shared", False, B=1, H=2)
    torch.testing.assert_close(ls_flex(*args, **kw), ls_attention(*args, backend="torch", **kw), rtol=1e-5, atol=1e-5)


def test_mask_mod_visibility():
    """mask_mod against the README's rules at a few (query, key) pairs: key index >= N is projected vector N - key."""
    N, w, chunk, r = 32, 8, 4, 2
    t = lambda x: torch.tensor(x)  # noqa: E731
    causal = ls_mask_mod(N, w, True, chunk, r)
    assert causal(0, 0, t(10), t(10)) and causal(0, 0, t(10), t(3)) and not causal(0, 0, t(10), t(2))
    assert not causal(0, 0, t(10), t(11))
    # query 10 is in chunk 2: it sees chunks 0 and 1, i.e. projected vectors 0 .. 3
    assert causal(0, 0, t(10), t(N + 3)) and not causal(0, 0, t(10), t(N + 4))
    bidir = ls_mask_mod(N, w, False, chunk, r)  # query 10: segment [8, 16) widened by 4 on both sides
    assert bidir(0, 0, t(10), t(4)) and bidir(0, 0, t(10), t(19))
    assert not bidir(0, 0, t(10), t(3)) and not bidir(0, 0, t(10), t(20))
    assert bidir(0, 0, t(0), t(N + r - 1))


def _blocks(bm):
    """(partial, full) block patterns of a BlockMask as dense bool (n_q, n_kv)."""
    out = []
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        m = torch.zeros(idx.shape[-2:], dtype=torch.bool)
        for i in range(m.shape[0]):
            m[i, idx[0, 0, i, :num[0, 0, i]].long()] = True
        out.append(m)
    return out


@pytest.mark.parametrize("N, w, causal, chunk, r", [
    (1024, 512, True, 16, 1), (1024, 8, False, 16, 32), (384, 100, True, 4, 3), (200, 1, False, 16, 5),
    (640, 0, True, 16, 2), (256, 300, False, 16, 1), (61, 7, True, 4, 1),
])
def test_block_mask_equals_create_block_mask(N, w, causal, chunk, r):
    """The interval-built BlockMask lists the same partial and full blocks as evaluating mask_mod everywhere."""
    G = N // chunk * r if causal else r
    expected = create_block_mask(ls_mask_mod(N, w, causal, chunk, r), None, None, N, N + G, device="cpu")
    for got, exp in zip(_blocks(block_mask(N, G, w, causal, chunk, r, "cpu")), _blocks(expected)):
        assert torch.equal(got, exp)
