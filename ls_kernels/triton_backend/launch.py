"""Launchers of the attention kernels: default tiles, the forward (projection and LN_L pre-passes, then the
fused kernel) and the backward (delta, by a pre-pass or inside dKg/dVg; dKg/dVg with LN_G; the projection
backward, by its own kernel or inside dK/dV; window dK/dV; dQ). Deterministic: no atomics.

``forward`` and ``backward`` serve both entry points: ``ls_attention`` (the projection computed here from
``proj``, with LN_L and LN_G) and ``ls_attention_projected`` (projected keys and values given, no LN).
"""
from typing import NamedTuple, Optional

import torch
import triton

from ..common import given_visibility
from ..config import HALF_DTYPES, INTERPRET, LSConfig
from .args import (HOPPER, absent, bhn_strides, block_d, block_g, gpu_arch, gvis_int8, kernel_dtype, ln_params,
                   make_scalars, pad_int8)
from .kernels.backward import (_ls_bwd_delta_kernel, _ls_bwd_dkv_global_combine_kernel, _ls_bwd_dkv_global_kernel,
                               _ls_bwd_dkv_kernel, _ls_bwd_dq_kernel)
from .kernels.forward import _ls_fwd_kernel
from .kernels.prepass import _ln_local_kernel
from .projection import (InKernelBackward, Projected, RawGrads, in_kernel_args, in_kernel_backward,
                         projection_backward, projection_forward, runs_in_kernel)

# in the interpreter every tile step costs milliseconds: small tiles there, the GPU's elsewhere
GPU_TILES = not INTERPRET
# the dKg/dVg kernel splits the queries over about this many programs, in at most _DKV_GLOBAL_SPLITS splits (the
# combine kernel walks them one after another)
_DKV_GLOBAL_PROGRAMS = 1024
_DKV_GLOBAL_SPLITS = 48
# rows per program of the row-wise pre-passes (LN_L, delta)
ROWS_PER_PROGRAM = 64
# projected vectors per program of the dKg/dVg combine (LN_G backward: several fp32 tiles of them in registers)
COMBINE_ROWS = 16
# dK/dV kernel: what the projection's gradients of what it read (dk_src, dv_src) are added to
SRC_NONE, SRC_AFTER_LN, SRC_BEFORE_LN = 0, 1, 2


class Tiles(NamedTuple):
    block_m: int  # queries
    block_n: int  # keys or projected vectors
    num_warps: int
    num_stages: int


_INTERPRETER_TILES = Tiles(32, 32, 4, 1)
# the forward's key tile for windows of at most this many keys (fwd_config)
NARROW_BLOCK_N = 32


def fwd_config(D, dtype, gpu_tiles=GPU_TILES, window_span=0):
    """Default tiles of the forward kernel, chosen by ahead-of-time compilation (bench/aot_report.py): zero
    spills on sm_90a. fp32 dots are IEEE FMA dots that hold whole rows of their operands in registers, hence
    the small tiles; fp64 has no dot at all (broadcast products). fp16/bf16 at D <= 64 take 64-key tiles,
    or NARROW_BLOCK_N-key tiles when a query's window keys (window_span, LSConfig.window_span) fit in one:
    a block's window then needs about 64 + span keys, three narrow tiles against two wide ones."""
    if not gpu_tiles:
        return _INTERPRETER_TILES
    if dtype == torch.float64:
        return Tiles(16, 16, 4, 1)
    if dtype == torch.float32:
        return Tiles(32, 16, 8, 2) if D <= 64 else Tiles(16, 16, 8, 2)
    if D > 64:
        return Tiles(64, 32, 8, 2)
    return Tiles(64, NARROW_BLOCK_N if 0 < window_span <= NARROW_BLOCK_N else 64, 4, 2)


def bwd_config(D, dtype, gpu_tiles=GPU_TILES, arch=HOPPER):
    """Default tiles of the backward kernels {"dq", "dkv", "dkv_global"} on a GPU of compute capability arch:
    zero spills on sm_80 and sm_90a (IEEE fp32 FMA dots: one stage). fp16/bf16 at D <= 64: 128-query dQ blocks,
    64-key dK/dV blocks on sm_90a (32 below, where 64 spill): the work outside the loops shared by more rows."""
    if not gpu_tiles:
        return dict(dq=_INTERPRETER_TILES, dkv=_INTERPRETER_TILES, dkv_global=_INTERPRETER_TILES)
    if dtype == torch.float64:
        return dict.fromkeys(("dq", "dkv", "dkv_global"), Tiles(16, 16, 4, 1))
    if dtype == torch.float32:
        if D <= 64:
            return dict(dq=Tiles(32, 16, 8, 2), dkv=Tiles(16, 16, 8, 2), dkv_global=Tiles(16, 16, 8, 2))
        return dict(dq=Tiles(16, 16, 8, 2), dkv=Tiles(32, 16, 8, 1), dkv_global=Tiles(16, 16, 4, 1))
    if D <= 64:
        return dict(dq=Tiles(128, 32, 4, 2), dkv=Tiles(32, 64 if arch >= HOPPER else 32, 4, 1),
                    dkv_global=Tiles(32, 64, 4, 2))
    return dict(dq=Tiles(32, 32, 8, 2), dkv=Tiles(16, 32, 8, 2), dkv_global=Tiles(32, 32, 8, 2))


class Grads(NamedTuple):
    """Gradients of the backward (None where the input is absent): q, k, v in the kernels' dtype, the rest in
    the accumulation dtype; kg, vg only when the projected keys and values were given."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    proj: Optional[torch.Tensor] = None
    ln_local_weight: Optional[torch.Tensor] = None
    ln_local_bias: Optional[torch.Tensor] = None
    ln_global_weight: Optional[torch.Tensor] = None
    ln_global_bias: Optional[torch.Tensor] = None
    kg: Optional[torch.Tensor] = None
    vg: Optional[torch.Tensor] = None


def _kernel_tensors(*xs):
    """q, k, v (and dO) as the kernels read them: unit last stride, in kernel_dtype."""
    return [(x if x.stride(-1) == 1 else x.contiguous()).to(kernel_dtype(x.dtype)) for x in xs]


def _kernel_proj(proj, acc):
    """proj as the kernels read it: any float dtype is used in the accumulation dtype, but fp64 cannot meet fp32
    arithmetic in a kernel and the interpreter gets bf16 wrong, so those are cast first (same numbers)."""
    if (proj.dtype == torch.float64 and acc != torch.float64) or (INTERPRET and proj.dtype == torch.bfloat16):
        proj = proj.to(acc)
    return proj if proj.stride(-1) == 1 else proj.contiguous()


def _given(kg, vg, acc, like):
    """Projected keys and values given by the caller (or none: window only) as a Projected: kg, vg in like's
    dtype, rounded through the accumulation dtype as the kernels always read them."""
    B, H, _, D = like.shape
    none = like.new_empty(B, H, 0, D, dtype=acc)
    if kg is None:
        return Projected(none.to(like.dtype), none.to(like.dtype), none, none, like.new_empty(B, H, 0, dtype=acc))
    kg, vg = (x.to(acc).to(like.dtype).contiguous() for x in (kg, vg))
    return Projected(kg, vg, none, none, like.new_empty(B, H, 0, dtype=acc))


def _shard_visibility(cfg, gvis, kg, pad, B, Nk, device):
    """(gvis, pad) as the kernels read them: the given vectors' visibility as common.given_visibility rules it
    for a shard (cfg offsets); the kernels read GVIS only with a mask: a mask of no padding where there is none."""
    if gvis is None and kg is not None and (cfg.query_offset is not None or cfg.chunk_offset is not None):
        gvis = given_visibility(cfg, None, pad, B, Nk, kg.shape[2], device)
    if gvis is not None and pad is None:
        pad = torch.zeros(B, Nk, dtype=torch.bool, device=device)
    return gvis, pad


def _ln_buffers(k, acc):
    """(kn, vn, ln_stats): LN_L(k), LN_L(v) (B, H, N, D) in k's dtype and their row statistics (4, B, H, N) in
    the accumulation dtype (k's means, k's rstd, v's means, v's rstd), to be written by the LN_L pre-pass."""
    B, H, N, D = k.shape
    kn = torch.empty(B, H, N, D, dtype=k.dtype, device=k.device)
    return kn, torch.empty_like(kn), torch.empty(4, B, H, N, dtype=acc, device=k.device)


def _ln_local_rows(k, v, out, *, row0, ln_local, pad8, stride_pad, scalars):
    """_ln_local_kernel over the rows row0 .. N - 1 of k, v into out = _ln_buffers(...)."""
    B, H, N, D = k.shape
    if row0 >= N:
        return
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, scalars.dtype, k.device)
    _ln_local_kernel[(triton.cdiv(N - row0, ROWS_PER_PROGRAM), B * H)](
        k, v, pad8 if pad8 is not None else absent(k.device), lnw, lnb, scalars, *out,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), stride_pad, stride_lnh,
        H, N, row0, HEAD_DIM=D, HAS_PAD=pad8 is not None, BLOCK_N=ROWS_PER_PROGRAM, BLOCK_D=block_d(D), num_warps=4,
    )


class Forward(NamedTuple):
    """``forward``'s results: out (B, H, N, D) in q's dtype; o_res, the output's rounding residual
    (out - round(out), in the kernels' dtype) when kept for the backward (else None); lse (B, H, N) (+inf where a query sees nothing); the Projected the backward needs; ln_stats
    (4, B, H, N), the LN_L row statistics the backward needs (None without LN_L)."""
    out: torch.Tensor
    o_res: Optional[torch.Tensor]
    lse: torch.Tensor
    projected: Projected
    ln_stats: Optional[torch.Tensor]


def forward(q, k, v, *, cfg: LSConfig, proj=None, kg=None, vg=None, ln_local=None, ln_global=None, pad=None,
            gvis=None, store_acc=False, gpu_tiles=GPU_TILES):
    """Long-short attention forward of validated inputs.

    q (B, H, N, D), k, v (B, H, Nk, D) (causal Nk >= N: the queries are the last N positions), any strides;
    proj (B, H, Nk, r): the projection runs here (LN_L when cfg.project_after_ln, then LN_G); or kg, vg
    (B, H, NG, D): projected keys and values as given; or neither: window only. ln_local, ln_global:
    (weight, bias) of (D,) or (H, D), or None; pad (B, Nk) bool; gvis (B, NG) bool: which given projected
    vectors may be seen (default: from pad, cfg.offsets place the queries).
    store_acc: also keep the output's rounding residual (out - round(out), in q's dtype: half the bytes of an
    fp32 copy) for the backward; with fp16/bf16 outputs, rowsum(dO * O) from the rounded O alone is the
    backward's largest error. Returns a Forward.
    """
    dtype = q.dtype
    q, k, v = _kernel_tensors(q, k, v)
    B, H, N, D = q.shape
    Nk = k.shape[2]
    gvis, pad = _shard_visibility(cfg, gvis, kg, pad, B, Nk, q.device)
    device = q.device
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, device)
    acc = scalars.dtype
    pad8, stride_pad = pad_int8(pad)
    reads_ln = proj is not None and cfg.project_after_ln  # the projection reads LN_L(k), LN_L(v)
    where = dict(pad8=pad8, stride_pad=stride_pad, scalars=scalars)
    ln_out = None
    if ln_local is not None and (cfg.window > 0 or reads_ln):  # LN_L(k), LN_L(v) written once, with statistics
        ln_out = _ln_buffers(k, acc)
    if proj is not None:  # the projection's partial kernel is the LN_L pre-pass of the rows it reads
        projected = projection_forward(proj=_kernel_proj(proj, acc), k=k, v=v, ln_global=ln_global,
                                       causal=cfg.causal, chunk=cfg.chunk, ln_local=ln_local, ln_out=ln_out,
                                       reads_ln=reads_ln, **where)
        covered = (Nk // cfg.chunk) * cfg.chunk if cfg.causal else Nk
    else:
        projected, covered = _given(kg, vg, acc, q), 0
    if ln_out is not None:
        _ln_local_rows(k, v, ln_out, row0=covered, ln_local=ln_local, **where)
    kn, vn, ln_stats = ln_out if ln_out is not None else (k, v, None)
    NG, rank = projected.kg.shape[2], max(cfg.rank, 1)
    gvis = gvis_int8(pad, B, Nk, rank, cfg.causal, cfg.chunk, NG, device, given=gvis)
    q_off, c_off = cfg.offsets(N, Nk)
    tiles = fwd_config(D, q.dtype, gpu_tiles, window_span=cfg.window_span)
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=device)
    keep_res = store_acc and dtype in HALF_DTYPES
    res_in_kernel = keep_res and q.dtype == dtype  # (the interpreter computes bf16 in fp32: residual below)
    o_res = torch.empty(B, H, N, D, dtype=q.dtype, device=device) if keep_res else None
    lse = torch.empty(B, H, N, dtype=acc, device=device)
    _ls_fwd_kernel[(triton.cdiv(N, tiles.block_m), H, B)](
        q, kn, vn, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(device), scalars,
        out, o_res if res_in_kernel else absent(device), lse,
        *bhn_strides(q, kn, vn, out), stride_pad,
        H, N, Nk, q_off, c_off, NG, cfg.window, cfg.half_width, cfg.chunk, rank,
        HEAD_DIM=D, CAUSAL=cfg.causal, HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None,
        IS_FP64=q.dtype == torch.float64, PRECISION="ieee", STORE_RES=res_in_kernel,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_G=block_g(NG, tiles.block_n), BLOCK_D=block_d(D),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if keep_res and not res_in_kernel:
        o_res = out - out.to(dtype).to(out.dtype)
    return Forward(out=out.to(dtype), o_res=o_res, lse=lse, projected=projected,
                   ln_stats=ln_stats)


def _common(q, cfg, tiles):
    """Launch arguments every backward kernel takes."""
    return dict(HEAD_DIM=q.shape[-1], CAUSAL=cfg.causal, IS_FP64=q.dtype == torch.float64, PRECISION="ieee",
                BLOCK_M=tiles.block_m, BLOCK_D=block_d(q.shape[-1]), num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


def _output_rows(o, o_res):
    """The forward's output (in the kernels' dtype) and its rounding residual (or None) as contiguous tensors,
    as the kernels computing delta read them."""
    o, = _kernel_tensors(o)
    return o.contiguous(), (o_res.contiguous() if o_res is not None else None)


def _delta(o, o_res, do, *, pad8, stride_pad, q_off, acc):
    """rowsum(dO * (O + O_res)) (B, H, N) in the accumulation dtype (O_res: the output's rounding residual, or
    None), 0 at padded queries whatever dO holds there (query row i at padding position i + q_off)."""
    B, H, N, D = do.shape
    delta = torch.empty(B, H, N, dtype=acc, device=do.device)
    o, o_res = _output_rows(o, o_res)
    _ls_bwd_delta_kernel[(triton.cdiv(N, ROWS_PER_PROGRAM), H, B)](
        o, o_res if o_res is not None else absent(do.device), do,
        pad8 if pad8 is not None else absent(do.device), delta,
        do.stride(0), do.stride(1), do.stride(2), stride_pad, H, N, q_off,
        HEAD_DIM=D, HAS_PAD=pad8 is not None, HAS_RES=o_res is not None, BLOCK_M=ROWS_PER_PROGRAM,
        BLOCK_D=block_d(D), num_warps=4,
    )
    return delta


def _dq(q, kw, vw, do, lse, delta, *, cfg, projected, gvis, pad8, stride_pad, offsets, scalars, tiles):
    """dQ (q's dtype) by _ls_bwd_dq_kernel; kw, vw: the window keys and values as the forward read them."""
    B, H, N, D = q.shape
    Nk = kw.shape[2]
    NG = projected.kg.shape[2]
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    _ls_bwd_dq_kernel[(triton.cdiv(N, tiles.block_m), H, B)](
        q, kw, vw, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(q.device),
        scalars, do, lse, delta, dq,
        *bhn_strides(q, kw, vw, do), stride_pad,
        H, N, Nk, *offsets, NG, cfg.window, cfg.half_width, cfg.chunk, max(cfg.rank, 1),
        HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None,
        BLOCK_N=tiles.block_n, BLOCK_G=block_g(NG, tiles.block_n), **_common(q, cfg, tiles),
    )
    return dq


class GlobalGrads(NamedTuple):
    """_dkv_global's results: dk_raw, dv_raw (B, H, NG, D), the gradients of the projected vectors before LN_G
    (of kg, vg themselves without it) in the accumulation dtype (None where only split); raw, the same as the
    projection backward reads them (RawGrads, when the projection ran here, else None); the LN_G weight and
    bias gradients (or None)."""
    dk_raw: Optional[torch.Tensor]
    dv_raw: Optional[torch.Tensor]
    raw: Optional[RawGrads]
    ln_weight: Optional[torch.Tensor]
    ln_bias: Optional[torch.Tensor]


def delta_fits(D, dtype):
    """Whether _ls_bwd_dkv_global_kernel computing delta compiles without spills on sm_90a at its default
    tiles (bench/aot_report.py): not with fp32's IEEE dots beyond D 64 (their operands held in registers)."""
    return not (dtype == torch.float32 and D > 64)


def delta_in_dkv_global(cfg, NG, tiles, D, dtype):
    """Whether _ls_bwd_dkv_global_kernel computes delta (no pre-pass): bidirectional (every query sees the
    projected vectors) with one block of them, so that one program visits each query, where it fits."""
    return NG > 0 and not cfg.causal and block_g(NG, tiles["dkv_global"].block_n) >= NG and delta_fits(D, dtype)


def _dkv_global(q, do, lse, delta, *, cfg, projected, gvis, pad8, stride_pad, offsets, scalars, ln_global, tiles,
                out=None):
    """Gradients of the projected vectors before LN_G (of kg, vg themselves without it), (B, H, NG, D) in the
    accumulation dtype: per-split partials of _ls_bwd_dkv_global_kernel (each split holds at most split_len
    queries, counted from the first query that sees the block of vectors, so that programs are even), summed
    in a fixed order (deterministic) by _ls_bwd_dkv_global_combine_kernel with the LN_G backward. With out =
    (o, o_res) (delta_in_dkv_global), the kernel writes delta itself. Returns GlobalGrads."""
    B, H, N, D = q.shape
    NG = projected.kg.shape[2]
    acc = scalars.dtype
    BLOCK_G = block_g(NG, tiles.block_n)
    n_gblk = triton.cdiv(NG, BLOCK_G)
    n_split = max(1, min(triton.cdiv(N, tiles.block_m), _DKV_GLOBAL_PROGRAMS // (B * H * n_gblk),
                         _DKV_GLOBAL_SPLITS))
    split_len = triton.cdiv(triton.cdiv(N, n_split), tiles.block_m) * tiles.block_m
    n_split = triton.cdiv(N, split_len)
    dkg_part = torch.empty(n_split, B, H, NG, D, dtype=acc, device=q.device)
    dvg_part = torch.empty_like(dkg_part)
    o, o_res = _output_rows(*out) if out is not None else (absent(q.device), None)
    _ls_bwd_dkv_global_kernel[(n_gblk, n_split, B * H)](
        q, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(q.device), scalars, do, lse,
        delta, o, o_res if o_res is not None else absent(q.device), dkg_part, dvg_part,
        *bhn_strides(q, do), stride_pad,
        H, N, *offsets, NG, cfg.chunk, max(cfg.rank, 1), split_len,
        HAS_PAD=pad8 is not None, DELTA_HERE=out is not None, HAS_RES=o_res is not None, BLOCK_G=BLOCK_G,
        **_common(q, cfg, tiles),
    )
    has_col_dot = projected.k_raw.shape[2] == NG  # the projection ran here: its backward follows
    lnw, _, stride_lnh = ln_params(ln_global, H, D, acc, q.device)
    col_dot = torch.empty(B, H, NG, dtype=acc, device=q.device) if has_col_dot else absent(q.device)
    split = has_col_dot and q.dtype in HALF_DTYPES  # the projection backward's dots read a high and a low part
    if split:  # the gradients stored only split
        dk_raw = dv_raw = None
        hi_lo = [torch.empty(B, H, NG, D, dtype=q.dtype, device=q.device) for _ in range(4)]
    else:
        dk_raw = torch.empty(B, H, NG, D, dtype=acc, device=q.device)
        dv_raw = torch.empty_like(dk_raw)
        hi_lo = [dk_raw, dk_raw, dv_raw, dv_raw]
    raw = RawGrads(*hi_lo, col_dot=col_dot, split=split) if has_col_dot else None
    n_rows = triton.cdiv(NG, COMBINE_ROWS)
    dlnw_part = torch.empty(B, H, n_rows, D, dtype=acc, device=q.device) if ln_global is not None else None
    dlnb_part = torch.empty_like(dlnw_part) if ln_global is not None else None
    _ls_bwd_dkv_global_combine_kernel[(n_rows, B * H)](
        dkg_part, dvg_part, projected.k_raw if has_col_dot else absent(q.device),
        projected.v_raw if has_col_dot else absent(q.device), lnw, scalars,
        *((dk_raw, dv_raw) if not split else (absent(q.device),) * 2), *hi_lo, col_dot,
        dlnw_part if dlnw_part is not None else absent(q.device),
        dlnb_part if dlnb_part is not None else absent(q.device),
        n_split, NG, stride_lnh, H,
        HEAD_DIM=D, HAS_LN=ln_global is not None, HAS_COL_DOT=has_col_dot, SPLIT=split, BLOCK_G=COMBINE_ROWS,
        BLOCK_D=block_d(D),
        num_warps=4,
    )
    if ln_global is None:
        return GlobalGrads(dk_raw, dv_raw, raw, None, None)
    dims = (0, 2) if ln_global[0].dim() == 2 else (0, 1, 2)
    return GlobalGrads(dk_raw, dv_raw, raw, dlnw_part.sum(dims), dlnb_part.sum(dims))


def _dkv(q, k, v, do, lse, delta, *, cfg, pad8, stride_pad, offsets, ln_local, ln_stats, scalars, dk_src, dv_src,
         src_mode, src_len, tiles, proj_bwd: Optional[InKernelBackward] = None):
    """Window dK, dV (k's dtype) by _ls_bwd_dkv_kernel, with the LN_L backward and the projection's gradients
    of what it read added (src_mode): dk_src, dv_src (below src_len), or computed in the kernel (proj_bwd, whose
    dproj it writes). Returns dk, dv, the window keys and values as the forward read them (LN_L(k), LN_L(v)
    written by the kernel, or k, v) and the per-block LN_L weight and bias gradient partials (B, H, n_kblk, D)."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    acc = scalars.dtype
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, q.device)
    n_kblk = triton.cdiv(Nk, tiles.block_n)  # programs own BLOCK_N keys, visit BLOCK_M queries at a time
    dk = torch.empty(B, H, Nk, D, dtype=k.dtype, device=q.device)  # contiguous: the kernel indexes it so
    dv = torch.empty_like(dk)
    writes_ln = ln_stats is not None and cfg.window > 0
    kn, vn = (torch.empty_like(dk), torch.empty_like(dk)) if writes_ln else (k, v)
    dlnw_part = torch.empty(B, H, n_kblk, D, dtype=acc, device=q.device)
    dlnb_part = torch.empty_like(dlnw_part)
    none = absent(q.device)
    proj_ptrs, proj_strides, rank, proj_flags = in_kernel_args(proj_bwd, q.device)
    _ls_bwd_dkv_kernel[(n_kblk, H, B)](
        q, k, v, pad8 if pad8 is not None else none, lnw, lnb, scalars, do, lse, delta,
        dk_src if dk_src is not None else none, dv_src if dv_src is not None else none,
        dk, dv, kn, vn, ln_stats if ln_stats is not None else none, dlnw_part, dlnb_part, *proj_ptrs,
        *bhn_strides(q, k, v, do), *proj_strides, stride_pad, stride_lnh,
        H, N, Nk, offsets[0], cfg.window, cfg.half_width, src_len, rank,
        HAS_LOCAL=cfg.window > 0, SRC_MODE=src_mode, HAS_PAD=pad8 is not None, HAS_LN=ln_stats is not None,
        BLOCK_N=tiles.block_n, **proj_flags, **_common(q, cfg, tiles),
    )
    return dk, dv, kn, vn, dlnw_part, dlnb_part


def backward(do, q, k, v, *, cfg: LSConfig, o, lse, o_res=None, projected=None, ln_stats=None, proj=None, kg=None,
             vg=None, ln_local=None, ln_global=None, pad=None, gvis=None, gpu_tiles=GPU_TILES):
    """Gradients of ``forward``'s inputs: o, o_res, lse, projected and ln_stats what it returned (out, its
    rounding residual when kept, projected with proj, ln_stats with ln_local), or kg, vg the projected keys and
    values it was given. Returns Grads: with proj, the gradients of proj and of the LayerNorm parameters; with
    kg, vg given, those of kg and vg."""
    uses_ln = ln_local is not None and (cfg.window > 0 or (proj is not None and cfg.project_after_ln))
    if uses_ln != (ln_stats is not None):
        raise ValueError(f"ln_stats: forward's LN_L statistics are needed exactly when LN_L is used "
                         f"(here {uses_ln}), got {None if ln_stats is None else tuple(ln_stats.shape)}")
    q, k, v, do = _kernel_tensors(q, k, v, do)
    B, H, N, D = q.shape
    Nk = k.shape[2]
    gvis, pad = _shard_visibility(cfg, gvis, kg, pad, B, Nk, q.device)
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, q.device)
    acc = scalars.dtype
    if projected is None:
        projected = _given(kg, vg, acc, q)
    pad8, stride_pad = pad_int8(pad)
    offsets = cfg.offsets(N, Nk)
    NG = projected.kg.shape[2]
    gvis = gvis_int8(pad, B, Nk, max(cfg.rank, 1), cfg.causal, cfg.chunk, NG, q.device, given=gvis)
    tiles = bwd_config(D, q.dtype, gpu_tiles, arch=gpu_arch(q.device))
    where = dict(cfg=cfg, pad8=pad8, stride_pad=stride_pad, offsets=offsets, scalars=scalars)
    delta_here = delta_in_dkv_global(cfg, NG, tiles, D, q.dtype)
    delta = torch.empty(B, H, N, dtype=acc, device=q.device) if delta_here else \
        _delta(o, o_res, do, pad8=pad8, stride_pad=stride_pad, q_off=offsets[0], acc=acc)

    grads = {}
    dk_src = dv_src = proj_bwd = None
    src_len = 0
    if NG > 0:
        glob = _dkv_global(q, do, lse, delta, projected=projected, gvis=gvis,
                           ln_global=ln_global if proj is not None else None, tiles=tiles["dkv_global"],
                           out=(o, o_res) if delta_here else None, **where)
        if proj is None:
            grads.update(kg=glob.dk_raw, vg=glob.dv_raw)
        elif not runs_in_kernel(cfg.causal, D, cfg.project_after_ln):  # the projection backward's own kernel
            grads.update(ln_global_weight=glob.ln_weight, ln_global_bias=glob.ln_bias)
            grads["proj"], dk_src, dv_src, src_len = projection_backward(
                proj=_kernel_proj(proj, acc), k=k, v=v, pad8=pad8, stride_pad=stride_pad,
                ln_src=ln_local if cfg.project_after_ln else None, causal=cfg.causal, chunk=cfg.chunk,
                scalars=scalars, projected=projected, raw=glob.raw)
        else:  # the dK/dV kernel runs the projection backward at its rows
            grads.update(ln_global_weight=glob.ln_weight, ln_global_bias=glob.ln_bias)
            proj_bwd = in_kernel_backward(proj=_kernel_proj(proj, acc), k=k, projected=projected, raw=glob.raw)
            grads["proj"], src_len = proj_bwd.dproj, Nk
    elif proj is not None:  # causal, no full chunk: proj is never used
        grads["proj"] = torch.zeros_like(proj)

    src_mode = SRC_NONE if src_len == 0 else (SRC_AFTER_LN if cfg.project_after_ln else SRC_BEFORE_LN)
    dk, dv, kw, vw, dlnw_part, dlnb_part = _dkv(q, k, v, do, lse, delta, ln_local=ln_local, ln_stats=ln_stats,
                                                dk_src=dk_src, dv_src=dv_src, src_mode=src_mode, src_len=src_len,
                                                tiles=tiles["dkv"], proj_bwd=proj_bwd, **where)
    if ln_stats is not None:
        dims = (0, 2) if ln_local[0].dim() == 2 else (0, 1, 2)
        grads.update(ln_local_weight=dlnw_part.sum(dims), ln_local_bias=dlnb_part.sum(dims))
    elif ln_local is not None:  # LN_L unused (no window, the projection reads raw k, v)
        grads.update(ln_local_weight=torch.zeros_like(ln_local[0], dtype=acc),
                     ln_local_bias=torch.zeros_like(ln_local[1], dtype=acc))
    dq = _dq(q, kw, vw, do, lse, delta, projected=projected, gvis=gvis, tiles=tiles["dq"], **where)
    return Grads(q=dq, k=dk, v=dv, **grads)
