"""Branches of the blocked path that test_blocked.py's small inputs do not reach.

- the matmul (unfused) branch, the one CUDA and fp16/bf16 use, checked on CPU: fp32 and fp64
  go through ATen's fused flash kernel there (blocked.FUSED_CPU) unless it is switched off;
- the fused branch's causal projected keys in several query groups (one shared bias buffer
  without padded chunks, prefix + own-chunk parts with them);
- causal windows over segment-sized key blocks, with a partial last segment and key padding.
"""
import pytest

from ls_kernels import blocked
from test_blocked import CASES, PAPER, case_id, check_case


@pytest.fixture
def unfused(monkeypatch):
    monkeypatch.setattr(blocked, "FUSED_CPU", False)


@pytest.mark.parametrize("c", CASES[::4], ids=case_id)
def test_unfused_matches_reference(c, unfused):
    check_case(c)


@pytest.mark.parametrize("name", ["lra", "charlm"])
def test_unfused_paper_configs(name, unfused):
    causal, w, r, chunk, N, H, D = PAPER[name]
    check_case(dict(causal=causal, w=w, r=r, chunk=chunk, N=N, H=H, D=D, B=1, pad="none",
                    lnL="shared", lnG="shared", after=not causal))


@pytest.mark.parametrize("group", [4, 12, 32])
@pytest.mark.parametrize("pad", ["none", "rows", "chunk"])
def test_fused_causal_global_groups(monkeypatch, group, pad):
    """Groups of 1, 3 and 8 chunks of 4 at N = 63 (the last group partial)."""
    monkeypatch.setattr(blocked, "_CAUSAL_GLOBAL_GROUP", group)
    check_case(dict(causal=True, B=2, H=3, N=63, D=8, w=3, r=2, chunk=4, pad=pad, lnL="shared", lnG="head",
                    after=False))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("w, pad", [(9, "none"), (9, "rows"), (1, "none"), (21, "rows"), (63, "none"), (100, "none")])
def test_causal_window_blocks(monkeypatch, fused, w, pad):
    """Causal windows as two key blocks per segment of w queries (its own, the previous one), at
    N = 63: a partial last segment (w = 9, 21, 100 -> one segment), one segment (w = 63), w = 1."""
    monkeypatch.setattr(blocked, "FUSED_CPU", fused)
    check_case(dict(causal=True, B=2, H=3, N=63, D=8, w=w, r=2, chunk=4, pad=pad, lnL="head", lnG="shared",
                    after=True))


def test_fused_switch_is_used(monkeypatch, unfused):
    """The switch really selects the branch: fp32 CPU tensors are fused unless it is off."""
    import torch
    x = torch.zeros(1, 1, 4, 8)
    assert not blocked._fused(x)  # switched off by the fixture
    monkeypatch.setattr(blocked, "FUSED_CPU", True)
    assert blocked._fused(x) and not blocked._fused(x.half())
