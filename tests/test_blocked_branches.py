"""Branches of the blocked path that test_blocked.py's small inputs do not reach.

- the matmul (unfused) branch, the one CUDA and fp16/bf16 use, checked on CPU: fp32 and fp64
  go through ATen's fused flash kernel there unless ``Options(fused_cpu=False)``;
- the fused branch's causal projected keys in several query groups (one shared bias buffer
  without padded chunks, prefix + own-chunk parts with them);
- causal windows over segment-sized key blocks, with a partial last segment and key padding.
"""
import pytest
import torch

from cases import BLOCKED_PAPER, blocked_id, blocked_with, check_case, covering_cases
from ls_kernels.torch_backend import Options, blocked

CASES = covering_cases(200)
UNFUSED = blocked_with(fused_cpu=False)


@pytest.mark.parametrize("c", CASES[::4], ids=blocked_id)
def test_unfused_matches_reference(c):
    check_case(c, UNFUSED)


@pytest.mark.parametrize("name", ["lra", "charlm"])
def test_unfused_paper_configs(name):
    causal, w, r, chunk, N, H, D = BLOCKED_PAPER[name]
    check_case(dict(causal=causal, w=w, r=r, chunk=chunk, N=N, H=H, D=D, B=1, pad="none",
                    lnL="shared", lnG="shared", after=not causal), UNFUSED)


@pytest.mark.parametrize("group", [4, 12, 32])
@pytest.mark.parametrize("pad", ["none", "rows", "chunk"])
def test_fused_causal_global_groups(group, pad):
    """Groups of 1, 3 and 8 chunks of 4 at N = 63 (the last group partial)."""
    check_case(dict(causal=True, B=2, H=3, N=63, D=8, w=3, r=2, chunk=4, pad=pad, lnL="shared", lnG="head",
                    after=False), blocked_with(causal_global_group=group))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("w, pad", [(9, "none"), (9, "rows"), (1, "none"), (21, "rows"), (63, "none"), (100, "none")])
def test_causal_window_blocks(fused, w, pad):
    """Causal windows as two key blocks per segment of w queries (its own, the previous one), at
    N = 63: a partial last segment (w = 9, 21, 100 -> one segment), one segment (w = 63), w = 1."""
    check_case(dict(causal=True, B=2, H=3, N=63, D=8, w=w, r=2, chunk=4, pad=pad, lnL="head", lnG="shared",
                    after=True), blocked_with(fused_cpu=fused))


def test_fused_switch_is_used():
    """The option really selects the branch: fp32 CPU tensors are fused unless it is off (or dropout is on)."""
    x = torch.zeros(1, 1, 4, 8)
    assert not blocked._fused(x, Options(fused_cpu=False))
    assert blocked._fused(x, Options()) and not blocked._fused(x.half(), Options())
    assert not blocked._fused(x, Options(dropout_p=0.1))
