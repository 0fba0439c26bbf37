"""Triton launchers of long-short attention against projected keys and values given by the caller.

``ls_attention`` runs the projection pre-pass itself (LN_G per head, fused). A layer
whose DualLN spans the whole model dim (``LongShortAttention(dual_ln="model")``, the
official code's ``LayerNorm(H * D)``) computes the projected keys and values itself;
these launchers then run the same kernels as ``ls_attention`` with those tensors in
place of the pre-pass output: the fused forward (one online softmax over the visible
projected vectors and the window keys), and the backward's dQ, dKg/dVg and window
dK/dV kernels. No LN_L here: the caller normalises k and v.
"""
import torch

from .long_short import (
    _launch_bwd_dkv,
    _launch_bwd_dkv_global,
    _launch_bwd_dq,
    _launch_fwd,
    _delta,
    _projected_visibility,
    _scalars,
)

_EPS = 1e-5  # unused without LN_L; the kernels read it from the scalars tensor


def _prepare(q, k, v, kg, vg, pad, causal, chunk, rank, scale):
    """Inputs with last stride 1, projected tensors in the accumulation dtype, scalars, pad as int8, visibility."""
    B, H, N, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    scalars = _scalars(scale, _EPS, q.dtype, q.device)
    kg, vg = kg.to(scalars.dtype).contiguous(), vg.to(scalars.dtype).contiguous()
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    gvis = _projected_visibility(pad, B, N, rank, causal, chunk, q.device, kg.shape[2])
    return q, k, v, kg, vg, scalars, pad8, gvis


def projected_forward(q, k, v, kg, vg, pad, window, causal, chunk, rank, scale, store_acc):
    """q, k, v (B, H, N, D); kg, vg (B, H, NG, D), NG = rank (bidirectional) or (N // chunk) * rank
    (causal, chunk-major); pad (B, N) bool or None. Returns o (q's dtype), o_acc (fp32 unrounded
    output when store_acc and q is fp16/bf16, else o) and lse (B, H, N)."""
    q, k, v, kg, vg, scalars, pad8, gvis = _prepare(q, k, v, kg, vg, pad, causal, chunk, rank, scale)
    return _launch_fwd(q, k, v, kg, vg, gvis, pad8, None, scalars, window, causal, chunk, max(rank, 1), store_acc)


def projected_backward(do, q, k, v, kg, vg, o, lse, pad, window, causal, chunk, rank, scale):
    """dq, dk, dv (q's dtype) and dkg, dvg (accumulation dtype); deterministic (no atomics)."""
    q, k, v, kg, vg, scalars, pad8, gvis = _prepare(q, k, v, kg, vg, pad, causal, chunk, rank, scale)
    do = do if do.stride(-1) == 1 else do.contiguous()
    r = max(rank, 1)
    delta = _delta(do, o, pad, scalars.dtype)
    dq = _launch_bwd_dq(q, k, v, kg, vg, gvis, pad8, None, scalars, do, lse, delta, window, causal, chunk, r)
    if kg.shape[2] > 0:
        dkg, dvg = _launch_bwd_dkv_global(q, kg, vg, gvis, pad8, scalars, do, lse, delta, causal, chunk, r)
    else:
        dkg, dvg = torch.zeros_like(kg), torch.zeros_like(vg)
    dk, dv, _, _ = _launch_bwd_dkv(q, k, v, pad8, None, scalars, do, lse, delta, None, None, 0, window, causal)
    return dq, dk, dv, dkg, dvg
