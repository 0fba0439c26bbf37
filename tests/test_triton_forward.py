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

from ls_kernels import ls_attention
from ls_kernels.long_short import INTERPRET
from reference.inputs import make_inputs, reference_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="needs CUDA or TRITON_INTERPRET=1")

# tiny atol of the 2x rule: covers rounding of the output cast when both errors are ~0
TINY = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}
# readable absolute bound on the max error for inputs of unit scale
MAX_ERR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}

AXES = dict(
    causal=[False, True], N=[1, 7, 63, 111, 256], w=[0, 1, 3, 8, 16, 300], r=[None, 1, 2, 5],
    chunk=[1, 4, 16], D=[8, 40, 64], pad=["none", "rows", "seq", "chunk"],
    ln_local=[None, "shared", "head"], ln_global=[None, "shared", "head"], after=[False, True],
)
STEPS = dict(causal=1, N=3, w=5, r=3, chunk=2, D=1, pad=3, ln_local=2, ln_global=1, after=1)


def _grid(n):
    """n cases in which every value of every axis appears, mixed by coprime steps."""
    cases = []
    for i in range(n):
        c = {a: vals[(i * STEPS[a] + i // len(vals)) % len(vals)] for a, vals in AXES.items()}
        if c["w"] == 0 and c["r"] is None:
            c["r"] = 2
        cases.append(c)
    return cases


def _id(c):
    return (f"{'causal' if c['causal'] else 'bidir'}-N{c['N']}-D{c['D']}-w{c['w']}-r{c['r']}-l{c['chunk']}"
            f"-pad_{c['pad']}-lnL_{c['ln_local']}-lnG_{c['ln_global']}{'-after' if c['after'] else ''}")


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


PAPER = {  # (causal, N, H, D, w, r, chunk) at reduced N
    "lra-w8-r32": (False, 512, 2, 32, 8, 32, 16),
    "text-w1-r1": (False, 512, 2, 32, 1, 1, 16),
    "listops-w16-r2": (False, 512, 2, 32, 16, 2, 16),
    "retrieval-w1-r254": (False, 512, 2, 32, 1, 254, 16),
    "charlm-w512-l16-r1": (True, 1024, 2, 64, 512, 1, 16),
}


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
