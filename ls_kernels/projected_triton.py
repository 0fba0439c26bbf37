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
import triton

from .long_short import (
    _bwd_config,
    _fwd_config,
    _ls_bwd_dkv_global_kernel,
    _ls_bwd_dkv_kernel,
    _ls_bwd_dq_kernel,
    _ls_fwd_kernel,
    _projected_visibility,
    _scalars,
)

_EPS = 1e-5  # unused without LN_L; the kernels read it from the scalars tensor


def _next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def _no_ln(acc, device):
    """LN weight, bias and head stride arguments of kernels launched with HAS_LN=False."""
    dummy = torch.empty(1, dtype=acc, device=device)
    return dummy, dummy, 0


def _visibility(pad, B, N, NG, rank, causal, chunk, device):
    if NG == 0:
        return torch.empty(B, 0, dtype=torch.int8, device=device)
    return _projected_visibility(pad, B, N, rank, causal, chunk, device)


def projected_forward(q, k, v, kg, vg, pad, window, causal, chunk, rank, scale, store_acc):
    """q, k, v (B, H, N, D); kg, vg (B, H, NG, D), NG = rank (bidirectional) or (N // chunk) * rank
    (causal, chunk-major); pad (B, N) bool or None. Returns o (q's dtype), o_acc (fp32 unrounded
    output when store_acc and q is fp16/bf16, else o) and lse (B, H, N)."""
    B, H, N, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    device = q.device
    scalars = _scalars(scale, _EPS, q.dtype, device)
    acc = scalars.dtype
    kg, vg = kg.to(acc).contiguous(), vg.to(acc).contiguous()
    NG = kg.shape[2]
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    gvis = _visibility(pad, B, N, NG, rank, causal, chunk, device)
    lnw, lnb, stride_lnh = _no_ln(acc, device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _fwd_config(D, q.dtype)
    BLOCK_D = max(16, _next_pow2(D))
    BLOCK_G = max(16, min(BLOCK_N, _next_pow2(max(NG, 1))))
    o = torch.empty(B, H, N, D, dtype=q.dtype, device=device)
    store_acc = store_acc and q.dtype in (torch.float16, torch.bfloat16)
    o_acc = torch.empty(B, H, N, D, dtype=acc, device=device) if store_acc else o
    lse = torch.empty(B, H, N, dtype=acc, device=device)
    _ls_fwd_kernel[(triton.cdiv(N, BLOCK_M), H, B)](
        q, k, v, kg, vg, gvis, pad8 if pad8 is not None else gvis, lnw, lnb, scalars, o, o_acc, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        pad8.stride(0) if pad8 is not None else 0, stride_lnh,
        H, N, NG, window, max(window // 2, 1), chunk, max(rank, 1),
        HEAD_DIM=D, CAUSAL=causal, HAS_LOCAL=window > 0, HAS_GLOBAL=NG > 0,
        HAS_PAD=pad8 is not None, HAS_LN=False, IS_FP64=q.dtype == torch.float64,
        PRECISION="ieee", STORE_ACC=store_acc, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
        BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages,
    )
    return o, o_acc, lse


def projected_backward(do, q, k, v, kg, vg, o, lse, pad, window, causal, chunk, rank, scale):
    """dq, dk, dv (q's dtype) and dkg, dvg (accumulation dtype); deterministic (no atomics)."""
    B, H, N, D = q.shape
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    device = q.device
    scalars = _scalars(scale, _EPS, q.dtype, device)
    acc = scalars.dtype
    kg, vg = kg.to(acc).contiguous(), vg.to(acc).contiguous()
    NG = kg.shape[2]
    r = max(rank, 1)
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    delta = (do.to(acc) * o.to(acc)).sum(-1).contiguous()  # (B, H, N): rowsum(dO * O)
    gvis = _visibility(pad, B, N, NG, rank, causal, chunk, device)
    lnw, lnb, stride_lnh = _no_ln(acc, device)
    cfg = _bwd_config(D, q.dtype)
    BLOCK_D = max(16, _next_pow2(D))
    is_fp64 = q.dtype == torch.float64
    pad_arg = pad8 if pad8 is not None else gvis
    stride_padb = pad8.stride(0) if pad8 is not None else 0
    half = max(window // 2, 1)

    def common(kernel):
        BLOCK_M, BLOCK_N, num_warps, num_stages = cfg[kernel]
        return dict(HEAD_DIM=D, CAUSAL=causal, IS_FP64=is_fp64, PRECISION="ieee", BLOCK_M=BLOCK_M,
                    BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)

    BLOCK_M, BLOCK_N = cfg["dq"][:2]
    BLOCK_G = max(16, min(BLOCK_N, _next_pow2(max(NG, 1))))
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=device)
    _ls_bwd_dq_kernel[(triton.cdiv(N, BLOCK_M), H, B)](
        q, k, v, kg, vg, gvis, pad_arg, lnw, lnb, scalars, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        stride_padb, stride_lnh,
        H, N, NG, window, half, chunk, r,
        HAS_LOCAL=window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None, HAS_LN=False,
        BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, **common("dq"),
    )

    if NG > 0:
        BLOCK_M, BLOCK_N = cfg["dkv_global"][:2]
        BLOCK_G = max(16, min(BLOCK_N, _next_pow2(NG)))
        n_gblk = triton.cdiv(NG, BLOCK_G)
        n_split = 1 if causal else max(1, min(triton.cdiv(N, BLOCK_M), 512 // (B * H * n_gblk)))
        split_len = triton.cdiv(triton.cdiv(N, n_split), BLOCK_M) * BLOCK_M
        n_split = triton.cdiv(N, split_len)
        dkg_part = torch.empty(n_split, B, H, NG, D, dtype=acc, device=device)
        dvg_part = torch.empty_like(dkg_part)
        _ls_bwd_dkv_global_kernel[(n_gblk, n_split, B * H)](
            q, kg, vg, gvis, scalars, do, lse, delta, dkg_part, dvg_part,
            q.stride(0), q.stride(1), q.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            H, N, NG, chunk, r, split_len,
            BLOCK_G=BLOCK_G, **common("dkv_global"),
        )
        dkg, dvg = dkg_part.sum(0), dvg_part.sum(0)  # fixed-order reduction over the splits
    else:
        dkg, dvg = torch.zeros_like(kg), torch.zeros_like(vg)

    BLOCK_N = cfg["dkv"][1]
    n_kblk = triton.cdiv(N, BLOCK_N)
    dk, dv = torch.empty(B, H, N, D, dtype=k.dtype, device=device), torch.empty(B, H, N, D, dtype=v.dtype, device=device)
    dummy = torch.empty(1, dtype=acc, device=device)
    _ls_bwd_dkv_kernel[(n_kblk, H, B)](
        q, k, v, pad_arg, lnw, lnb, scalars, do, lse, delta, delta, delta,
        dk, dv, dummy, dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        stride_padb, stride_lnh,
        H, N, window, half,
        HAS_LOCAL=window > 0, SRC_MODE=0, HAS_PAD=pad8 is not None, HAS_LN=False,
        BLOCK_N=BLOCK_N, **common("dkv"),
    )
    return dq, dk, dv, dkg, dvg
