"""Launchers of the projection pre-pass (P = softmax of proj over positions; Kg = LN_G(P^T k_P),
Vg = LN_G(P^T v_P)) and of its backward, with their default tiles."""
from typing import NamedTuple

import torch
import triton

from ..config import HALF_DTYPES

from .args import absent, block_d, ln_params, next_pow2
from .kernels.projection import (LN_SRC_NONE, LN_SRC_PROJECT_NORMED, LN_SRC_PROJECT_RAW, _proj_bwd_kernel,
                                 _proj_combine_kernel, _proj_partial_kernel)

# programs a bidirectional projection spreads over, to fill a GPU; each takes at least this many positions
_TARGET_PROGRAMS = 512
_MIN_SEGMENT = 64
_SEGMENT_ALIGN = 16
# the projection's fp32 dots: three TF32 tensor-core products with the low parts (fp32's accuracy)
PRECISION = "tf32x3"
# rank columns per program of the combine (a short serial walk over the segments: many small programs) and its
# warps (the walk is one program's critical path: more warps, fewer instructions each)
COMBINE_BLOCK_R = 16
COMBINE_WARPS = 8
_MIN_BLOCK_R = 16  # tl.dot's smallest dimension
# the largest head dim at which the dK/dV kernel runs the bidirectional projection backward (runs_in_kernel)
_IN_KERNEL_MAX_DIM = 64


class Projected(NamedTuple):
    """The projection's outputs, each (B, H, NG, D) but col_lse (B, H, NG): Kg, Vg (after LN_G) in the kernels'
    dtype (q's), P^T k_P and P^T v_P (before it) and each column's logsumexp over its positions in the
    accumulation dtype."""
    kg: torch.Tensor
    vg: torch.Tensor
    k_raw: torch.Tensor
    v_raw: torch.Tensor
    col_lse: torch.Tensor


def proj_config(D, r):
    """(BLOCK_N, BLOCK_R) of the pre-pass, chosen by ahead-of-time compilation (bench/aot_report.py): 16
    positions per step (the LN_L pre-pass of the rows runs in the same loop; 32 spill on sm_90a at fp16, D 64)
    and up to 64 rank columns at D <= 64, so that r = 64 takes one program per segment (each rank block
    normalises the rows again), zero spills on sm_80 and sm_90a."""
    BLOCK_R = max(_MIN_BLOCK_R, min(64 if D <= 64 else 16, next_pow2(r)))
    return 16, BLOCK_R


def proj_bwd_config(D, r, seg_len, dtype):
    """(BLOCK_N, BLOCK_R, num_warps, precision of the fp32 dots) of the projection backward, spill-free on
    sm_90a (sm_80 spills some at the fp16/bf16 tiles: bench/aot_report.py): fp16/bf16 tensor-core dots take 64
    positions (bf16's conversions want 8 warps); fp32 dots are 3xTF32 at D <= 64 and IEEE FMA dots in small
    tiles beyond (3xTF32 would spill there)."""
    if dtype in HALF_DTYPES:
        if D <= 64:
            return (64 if seg_len >= 64 else 16), (32 if r > 16 else 16), (4 if dtype == torch.float16 else 8), \
                PRECISION
        return 64, 16, 8, PRECISION
    return 16, 16, 8, (PRECISION if D <= 64 else "ieee")


class RawGrads(NamedTuple):
    """Gradients of P^T k_P and P^T v_P (B, H, NG, D) as the projection backward reads them
    (kernels/projection._proj_rows_bwd): with fp16/bf16 inputs (split) a high part in their dtype and the rounded
    rest (lo); else in the accumulation dtype (lo: the same tensor, unread); col_dot (B, H, NG):
    Kraw . dKraw + Vraw . dVraw per projected vector."""
    k_hi: torch.Tensor
    k_lo: torch.Tensor
    v_hi: torch.Tensor
    v_lo: torch.Tensor
    col_dot: torch.Tensor
    split: bool


class InKernelBackward(NamedTuple):
    """The projection's backward run inside the dK/dV kernel (one group of r vectors over every position: the
    bidirectional projection), at each key block's rows: what it reads, dproj (B, H, N, r) it writes, its rank
    block and the precision of its fp32 dots (as proj_bwd_config's)."""
    proj: torch.Tensor
    col_lse: torch.Tensor
    raw: RawGrads
    dproj: torch.Tensor
    block_r: int
    precision: str


def runs_in_kernel(causal, D, project_after_ln):
    """Whether the dK/dV kernel runs the projection backward: one group (bidirectional) of LN_L(k), LN_L(v)
    rows, at head dims whose fused kernel compiles without spills on sm_80 and sm_90a (bench/aot_report.py);
    else its own kernel. (Raw rows would keep the keys' gradients in registers through the values' LN_L
    backward and the raw rows' reload: the fused kernel spills at sm_90a's tiles.)"""
    return not causal and project_after_ln and D <= _IN_KERNEL_MAX_DIM


def in_kernel_backward(*, proj, k, projected, raw):
    """InKernelBackward of a bidirectional projection (inputs as projection_backward's), dproj allocated."""
    _, block_r, _, precision = proj_bwd_config(k.shape[-1], proj.shape[-1], k.shape[2], k.dtype)
    return InKernelBackward(proj=proj, col_lse=projected.col_lse, raw=raw,
                            dproj=torch.empty(proj.shape, dtype=proj.dtype, device=proj.device), block_r=block_r,
                            precision=precision)


def in_kernel_args(pb, device):
    """(pointers PROJ, COL_LSE, COL_DOT, DK_HI, DK_LO, DV_HI, DV_LO, DPROJ; proj's (B, H, N) strides; its rank;
    constexprs) of _ls_bwd_dkv_kernel for InKernelBackward pb, or stand-ins when pb is None (PROJ_BWD off)."""
    if pb is None:
        return [absent(device)] * 8, [0, 0, 0], 1, dict(PROJ_BWD=False, PROJ_PRECISION=PRECISION, SPLIT=False,
                                                         BLOCK_R=_MIN_BLOCK_R)
    raw = pb.raw
    return ([pb.proj, pb.col_lse, raw.col_dot, raw.k_hi, raw.k_lo, raw.v_hi, raw.v_lo, pb.dproj],
            list(pb.proj.stride()[:3]), pb.proj.shape[-1],
            dict(PROJ_BWD=True, PROJ_PRECISION=pb.precision, SPLIT=raw.split, BLOCK_R=pb.block_r))


def _bidirectional_segments(N, programs_per_segment):
    """(seg_len, n_seg): a bidirectional sequence cut into segments so that about _TARGET_PROGRAMS run."""
    n_seg = max(1, min(triton.cdiv(N, _MIN_SEGMENT), _TARGET_PROGRAMS // max(1, programs_per_segment)))
    seg_len = triton.cdiv(triton.cdiv(N, n_seg), _SEGMENT_ALIGN) * _SEGMENT_ALIGN
    return seg_len, triton.cdiv(N, seg_len)


def projection_forward(*, proj, k, v, pad8, stride_pad, ln_global, causal, chunk, scalars, ln_local=None,
                       ln_out=None, reads_ln=False):
    """Projected keys and values of validated inputs.

    proj (B, H, N, r) with stride(-1) == 1; k, v (B, H, N, D) with stride(-1) == 1, in the kernels' dtype: what
    the projection reads (raw, or LN_L(k), LN_L(v) as the LN_L pre-pass wrote them); pad8 (B, N) int8 or None;
    scalars: make_scalars. Returns Projected, NG = r (bidirectional) or (N // chunk) * r (causal, chunk-major).

    With ln_local (weight, bias) and ln_out = (kn, vn, ln_stats) (as launch's LN_L pre-pass allocates them),
    k, v are raw and the partial kernel is also the LN_L pre-pass of the rows it reads (every row but those
    past the last full causal chunk), projecting LN_L(k), LN_L(v) when reads_ln.
    """
    B, H, N, D = k.shape
    r = proj.shape[-1]
    acc = scalars.dtype
    device = k.device
    BLOCK_D = block_d(D)
    BLOCK_N, BLOCK_R = proj_config(D, r)
    n_rblk = triton.cdiv(r, BLOCK_R)
    if causal:
        n_groups = N // chunk
        seg_len, segs_per_group = chunk, 1
        n_seg = n_groups
    else:
        n_groups = 1
        seg_len, n_seg = _bidirectional_segments(N, B * H * n_rblk)
        segs_per_group = n_seg
    NG = n_groups * r
    final = segs_per_group == 1  # each segment a whole group: the partial kernel stores the vectors itself
    kg = torch.empty(B, H, NG, D, dtype=k.dtype, device=device)
    vg = torch.empty_like(kg)
    k_raw = torch.empty(B, H, NG, D, dtype=acc, device=device)
    v_raw = torch.empty_like(k_raw)
    col_lse = torch.empty(B, H, NG, dtype=acc, device=device)
    if NG == 0:
        return Projected(kg, vg, k_raw, v_raw, col_lse)
    if final:
        part_m = part_z = part_k = part_v = absent(device)
    else:
        part_m = torch.empty(B, H, n_seg, r, dtype=acc, device=device)
        part_z = torch.empty_like(part_m)
        part_k = torch.empty(B, H, n_seg, r, D, dtype=acc, device=device)
        part_v = torch.empty_like(part_k)
    lng_w, lng_b, lng_stride = ln_params(ln_global, H, D, acc, device)
    lnl_w, lnl_b, lnl_stride = ln_params(ln_local, H, D, acc, device)
    kn, vn, ln_stats = ln_out if ln_out is not None else (absent(device),) * 3
    ln_src = LN_SRC_NONE if ln_out is None else (LN_SRC_PROJECT_NORMED if reads_ln else LN_SRC_PROJECT_RAW)
    _proj_partial_kernel[(n_seg, n_rblk, B * H)](
        proj, k, v, pad8 if pad8 is not None else absent(device), scalars,
        part_m, part_z, part_k, part_v, lng_w, lng_b, kg, vg, k_raw, v_raw, col_lse, lnl_w, lnl_b, kn, vn, ln_stats,
        proj.stride(0), proj.stride(1), proj.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_pad, lng_stride, lnl_stride,
        N, H, r, seg_len,
        HEAD_DIM=D, HAS_PAD=pad8 is not None, HAS_LN=ln_global is not None, IS_FP64=acc == torch.float64,
        PRECISION=PRECISION, FINAL=final, LN_SRC=ln_src, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=4,
    )
    if not final:
        _proj_combine_kernel[(n_groups, triton.cdiv(r, COMBINE_BLOCK_R), B * H)](
            part_m, part_z, part_k, part_v, lng_w, lng_b, scalars,
            kg, vg, k_raw, v_raw, col_lse,
            H, r, segs_per_group, lng_stride,
            HEAD_DIM=D, HAS_LN=ln_global is not None, BLOCK_R=COMBINE_BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=COMBINE_WARPS,
        )
    return Projected(kg, vg, k_raw, v_raw, col_lse)


def projection_backward(*, proj, k, v, pad8, stride_pad, ln_src, causal, chunk, scalars, projected, raw):
    """Gradients of proj and of what the projection read (k_P, v_P), from dL/dKraw and dL/dVraw.

    Inputs as projection_forward; projected: its Projected with NG > 0; raw: RawGrads.
    Returns dproj (B, H, N, r) in proj's dtype, dk_src, dv_src (B, H, N, D) in k's dtype, written
    only at positions below src_len (causal: the last full chunk's end; past it they are zero and never read),
    and src_len.
    """
    col_lse = projected.col_lse
    B, H, N, D = k.shape
    r = proj.shape[-1]
    acc = scalars.dtype
    NG = col_lse.shape[2]
    src_len = (N // chunk) * chunk if causal else N
    dproj = torch.empty(B, H, N, r, dtype=proj.dtype, device=proj.device)
    dproj[:, :, src_len:].zero_()  # positions past the last full chunk project nothing
    dk_src = torch.empty(B, H, N, D, dtype=k.dtype, device=k.device)  # rounded as dk, dv will be
    dv_src = torch.empty_like(dk_src)
    BLOCK_N, BLOCK_R, num_warps, precision = proj_bwd_config(D, r, chunk if causal else N, k.dtype)
    seg_len, n_seg = (chunk, N // chunk) if causal else _bidirectional_segments(N, B * H)
    lnl_w, lnl_b, lnl_stride = ln_params(ln_src, H, D, acc, k.device)
    _proj_bwd_kernel[(n_seg, B * H)](
        proj, k, v, pad8 if pad8 is not None else absent(k.device), lnl_w, lnl_b, scalars, col_lse,
        raw.k_hi, raw.k_lo, raw.v_hi, raw.v_lo, raw.col_dot,
        dproj, dk_src, dv_src,
        proj.stride(0), proj.stride(1), proj.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_pad, lnl_stride,
        N, H, r, seg_len, NG, 1 if causal else 0,
        HEAD_DIM=D, HAS_PAD=pad8 is not None, HAS_LN=ln_src is not None, IS_FP64=acc == torch.float64,
        PRECISION=precision, SPLIT=raw.split, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_D=block_d(D),
        num_warps=num_warps,
    )
    return dproj, dk_src, dv_src, src_len
