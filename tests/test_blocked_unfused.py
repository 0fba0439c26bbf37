"""The blocked path's matmul (unfused) branch, the one CUDA and fp16/bf16 use, checked on CPU.

On CPU, fp32 and fp64 go through ATen's fused flash kernel (blocked.FUSED_CPU), so
test_blocked.py checks that branch; here the same checks run with it switched off.
"""
import pytest

from ls_kernels import blocked
from test_blocked import CASES, PAPER, case_id, check_case


@pytest.fixture(autouse=True)
def unfused(monkeypatch):
    monkeypatch.setattr(blocked, "FUSED_CPU", False)


@pytest.mark.parametrize("c", CASES[::4], ids=case_id)
def test_unfused_matches_reference(c):
    check_case(c)


@pytest.mark.parametrize("name", ["lra", "charlm"])
def test_unfused_paper_configs(name):
    causal, w, r, chunk, N, H, D = PAPER[name]
    check_case(dict(causal=causal, w=w, r=r, chunk=chunk, N=N, H=H, D=D, B=1, pad="none",
                    lnL="shared", lnG="shared", after=not causal))


def test_fused_switch_is_used(monkeypatch):
    """The switch really selects the branch: fp32 CPU tensors are fused unless it is off."""
    import torch
    x = torch.zeros(1, 1, 4, 8)
    assert not blocked._fused(x)
    monkeypatch.setattr(blocked, "FUSED_CPU", True)
    assert blocked._fused(x) and not blocked._fused(x.half())
