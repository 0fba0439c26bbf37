"""Forward of the Triton backend against the fp64 reference.

On a machine without a GPU these run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernels).

Tolerance rule (FlashAttention's): the kernel's max error against the fp64
reference is at most 2x the error of the same-dtype PyTorch path (the reference
run with upcast=False) plus a tiny atol; the table below is the readable bound.
"""
import os
import subprocess
import sys

import pytest
import torch

from cases import DEVICE, MAX_ERR, TINY
from cases import TRITON_PAPER as PAPER
from cases import triton_grid as _grid
from cases import triton_id as _id
from ls_kernels import ls_attention
from ls_kernels.config import INTERPRET
from reference.inputs import make_inputs, reference_errors
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

def _check(dtype, B, H, c, seed=0):
    q, k, v, proj, kw = make_inputs(B, H, c["N"], c["D"], c["r"], dtype=dtype, pad=c["pad"], chunk=c["chunk"],
                                    ln_local=c["ln_local"], ln_global=c["ln_global"], seed=seed, device=DEVICE)
    kw.update(window=c["w"], causal=c["causal"], project_after_ln=c["after"])
    out = ls_attention(q, k, v, proj, backend="triton", **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    if kw["key_padding_mask"] is not None:  # padded query rows are zero
        assert (out.masked_select(kw["key_padding_mask"][:, None, :, None]) == 0).all()
    err, err_torch = reference_errors(q, k, v, proj, out, **kw)
    assert err <= 2 * err_torch + TINY[dtype], (err, err_torch)
    assert err <= MAX_ERR[dtype], err
    return err


@pytest.mark.parametrize("c", _grid(36), ids=_id)
def test_forward_fp32(c):
    _check(torch.float32, 2, 3, c)


@pytest.mark.parametrize("c", _grid(36)[::3], ids=_id)
def test_forward_fp16(c):
    _check(torch.float16, 2, 2, c)


@pytest.mark.parametrize("c", _grid(36)[1::6], ids=_id)
def test_forward_bf16(c):
    _check(torch.bfloat16, 1, 2, c)


@pytest.mark.parametrize("c", _grid(36)[2::6], ids=_id)
def test_forward_fp64(c):
    _check(torch.float64, 1, 2, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(PAPER))
def test_forward_paper_configs(name, dtype):
    causal, N, H, D, w, r, chunk = PAPER[name]
    c = dict(causal=causal, N=N, D=D, w=w, r=r, chunk=chunk, pad="rows", ln_local="head",
             ln_global="head", after=not causal)
    _check(dtype, 1, H, c)


def test_triton_head_dim_limit():
    q = torch.randn(1, 1, 4, 136, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        ls_attention(q, q, q, window=2, backend="triton")


def test_triton_on_cpu_without_interpreter_says_how_to_run():
    code = ("import torch\nfrom ls_kernels import ls_attention\nq = torch.randn(1, 1, 8, 16)\n"
            "try:\n    ls_attention(q, q, q, window=2, backend='triton')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ValueError:" in res.stdout and "CUDA" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, \
        res.stdout + res.stderr
