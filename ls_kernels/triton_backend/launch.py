"""Launchers of the attention kernels: default tiles, the forward (projection pre-pass, then the fused kernel)
and the backward (dQ, dKg/dVg, LN_G, projection backward, window dK/dV). Deterministic: no atomics.

``forward`` and ``backward`` serve both entry points: ``ls_attention`` (the projection computed here from
``proj``, with LN_L and LN_G) and ``ls_attention_projected`` (projected keys and values given, no LN).
"""
from typing import NamedTuple, Optional

import torch
import triton

from ..common import layer_norm
from ..config import HALF_DTYPES, INTERPRET, LSConfig
from .args import absent, bhn_strides, block_d, block_g, gvis_int8, ln_params, make_scalars, pad_int8
from .kernels.backward import _ls_bwd_dkv_global_kernel, _ls_bwd_dkv_kernel, _ls_bwd_dq_kernel
from .kernels.forward import _ls_fwd_kernel
from .projection import Projected, projection_backward, projection_forward

# in the interpreter every tile step costs milliseconds: small tiles there, the GPU's elsewhere
GPU_TILES = not INTERPRET
# the dKg/dVg kernel splits the queries over about this many programs (bidirectional)
_DKV_GLOBAL_PROGRAMS = 512
# dK/dV kernel: what the projection's gradients of what it read (dk_src, dv_src) are added to
SRC_NONE, SRC_AFTER_LN, SRC_BEFORE_LN = 0, 1, 2


class Tiles(NamedTuple):
    block_m: int  # queries
    block_n: int  # keys or projected vectors
    num_warps: int
    num_stages: int


_INTERPRETER_TILES = Tiles(32, 32, 4, 1)


def fwd_config(D, dtype, gpu_tiles=GPU_TILES):
    """Default tiles of the forward kernel, chosen by ahead-of-time compilation (bench/aot_report.py): zero
    spills on sm_90a. fp32 dots are IEEE FMA dots that hold whole rows of their operands in registers, hence
    the small tiles; fp64 has no dot at all (broadcast products)."""
    if not gpu_tiles:
        return _INTERPRETER_TILES
    if dtype == torch.float64:
        return Tiles(16, 16, 4, 1)
    if dtype == torch.float32:
        return Tiles(32, 16, 8, 2) if D <= 64 else Tiles(16, 16, 8, 2)
    return Tiles(64, 64, 4, 2) if D <= 64 else Tiles(64, 32, 8, 2)


def bwd_config(D, dtype, gpu_tiles=GPU_TILES):
    """Default tiles of the backward kernels {"dq", "dkv", "dkv_global"}, chosen like the forward's: zero
    spills on sm_80 and sm_90a. The IEEE fp32 FMA dots need one stage (pipelining doubles their registers)."""
    if not gpu_tiles:
        return dict(dq=_INTERPRETER_TILES, dkv=_INTERPRETER_TILES, dkv_global=_INTERPRETER_TILES)
    if dtype == torch.float64:
        t = Tiles(16, 16, 4, 1)
        return dict(dq=t, dkv=t, dkv_global=t)
    if dtype == torch.float32:
        if D <= 64:
            return dict(dq=Tiles(32, 16, 8, 2), dkv=Tiles(16, 16, 8, 2), dkv_global=Tiles(16, 16, 8, 2))
        return dict(dq=Tiles(16, 16, 8, 2), dkv=Tiles(32, 16, 8, 1), dkv_global=Tiles(16, 16, 8, 1))
    if D <= 64:
        return dict(dq=Tiles(64, 32, 4, 2), dkv=Tiles(32, 32, 4, 1), dkv_global=Tiles(32, 32, 4, 2))
    return dict(dq=Tiles(32, 32, 8, 2), dkv=Tiles(16, 32, 8, 2), dkv_global=Tiles(32, 32, 4, 2))


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
    """q, k, v (and dO) as the kernels read them: unit last stride; in fp32 for bf16 in the interpreter, whose
    bf16 arithmetic is wrong (compiled kernels compute bf16 natively)."""
    out = []
    for x in xs:
        x = x if x.stride(-1) == 1 else x.contiguous()
        out.append(x.float() if INTERPRET and x.dtype == torch.bfloat16 else x)
    return out


def _kernel_proj(proj, acc):
    """proj as the kernels read it: any float dtype is used in the accumulation dtype, but fp64 cannot meet fp32
    arithmetic in a kernel and the interpreter gets bf16 wrong, so those are cast first (same numbers)."""
    if (proj.dtype == torch.float64 and acc != torch.float64) or (INTERPRET and proj.dtype == torch.bfloat16):
        proj = proj.to(acc)
    return proj if proj.stride(-1) == 1 else proj.contiguous()


def _given(kg, vg, acc, like):
    """Projected keys and values given by the caller (or none: window only) as a Projected."""
    B, H, _, D = like.shape
    none = like.new_empty(B, H, 0, D, dtype=acc)
    if kg is None:
        return Projected(none, none, none, none, like.new_empty(B, H, 0, dtype=acc))
    kg, vg = kg.to(acc).contiguous(), vg.to(acc).contiguous()
    return Projected(kg, vg, none, none, like.new_empty(B, H, 0, dtype=acc))


def forward(q, k, v, *, cfg: LSConfig, proj=None, kg=None, vg=None, ln_local=None, ln_global=None, pad=None,
            store_acc=False, gpu_tiles=GPU_TILES):
    """Long-short attention forward of validated inputs.

    q, k, v (B, H, N, D), any strides; proj (B, H, N, r): the projection runs here (LN_L when
    cfg.project_after_ln, then LN_G); or kg, vg (B, H, NG, D): projected keys and values as given; or
    neither: window only. ln_local, ln_global: (weight, bias) of (D,) or (H, D), or None; pad (B, N) bool.
    store_acc: also keep the output unrounded (fp32) for the backward; with fp16/bf16 outputs,
    rowsum(dO * O) from the rounded O is the backward's largest error.

    Returns out (B, H, N, D) in q's dtype, o_acc (the fp32 output when store_acc and q is fp16/bf16, else
    None), lse (B, H, N) (+inf where a query sees nothing) and the Projected the backward needs.
    """
    dtype = q.dtype
    q, k, v = _kernel_tensors(q, k, v)
    B, H, N, D = q.shape
    device = q.device
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, device)
    acc = scalars.dtype
    pad8, stride_pad = pad_int8(pad)
    if proj is not None:
        projected = projection_forward(proj=_kernel_proj(proj, acc), k=k, v=v, pad8=pad8, stride_pad=stride_pad,
                                       ln_src=ln_local if cfg.project_after_ln else None, ln_global=ln_global,
                                       causal=cfg.causal, chunk=cfg.chunk, scalars=scalars)
    else:
        projected = _given(kg, vg, acc, q)
    NG, rank = projected.kg.shape[2], max(cfg.rank, 1)
    gvis = gvis_int8(pad, B, N, rank, cfg.causal, cfg.chunk, NG, device)
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, device)
    tiles = fwd_config(D, q.dtype, gpu_tiles)
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=device)
    keep_acc = store_acc and dtype in HALF_DTYPES
    o_acc = torch.empty(B, H, N, D, dtype=acc, device=device) if keep_acc else out
    lse = torch.empty(B, H, N, dtype=acc, device=device)
    _ls_fwd_kernel[(triton.cdiv(N, tiles.block_m), H, B)](
        q, k, v, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(device), lnw, lnb, scalars,
        out, o_acc, lse,
        *bhn_strides(q, k, v, out), stride_pad, stride_lnh,
        H, N, NG, cfg.window, cfg.half_width, cfg.chunk, rank,
        HEAD_DIM=D, CAUSAL=cfg.causal, HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None,
        HAS_LN=ln_local is not None, IS_FP64=q.dtype == torch.float64, PRECISION="ieee", STORE_ACC=keep_acc,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_G=block_g(NG, tiles.block_n), BLOCK_D=block_d(D),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out.to(dtype), (o_acc if keep_acc else None), lse, projected


def _common(q, cfg, tiles):
    """Launch arguments every backward kernel takes."""
    return dict(HEAD_DIM=q.shape[-1], CAUSAL=cfg.causal, IS_FP64=q.dtype == torch.float64, PRECISION="ieee",
                BLOCK_M=tiles.block_m, BLOCK_D=block_d(q.shape[-1]), num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


def _dq(q, k, v, do, lse, delta, *, cfg, projected, gvis, pad8, stride_pad, ln_local, scalars, tiles):
    """dQ (q's dtype) by _ls_bwd_dq_kernel."""
    B, H, N, D = q.shape
    NG = projected.kg.shape[2]
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, scalars.dtype, q.device)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    _ls_bwd_dq_kernel[(triton.cdiv(N, tiles.block_m), H, B)](
        q, k, v, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(q.device), lnw, lnb,
        scalars, do, lse, delta, dq,
        *bhn_strides(q, k, v, do), stride_pad, stride_lnh,
        H, N, NG, cfg.window, cfg.half_width, cfg.chunk, max(cfg.rank, 1),
        HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None,
        BLOCK_N=tiles.block_n, BLOCK_G=block_g(NG, tiles.block_n), **_common(q, cfg, tiles),
    )
    return dq


def _dkv_global(q, do, lse, delta, *, cfg, projected, gvis, pad8, stride_pad, scalars, tiles):
    """Gradients of the projected kg, vg (B, H, NG, D, accumulation dtype): per-split partials of
    _ls_bwd_dkv_global_kernel summed in a fixed order (deterministic)."""
    B, H, N, D = q.shape
    NG = projected.kg.shape[2]
    BLOCK_G = block_g(NG, tiles.block_n)
    n_gblk = triton.cdiv(NG, BLOCK_G)
    n_split = 1 if cfg.causal else max(1, min(triton.cdiv(N, tiles.block_m), _DKV_GLOBAL_PROGRAMS // (B * H * n_gblk)))
    split_len = triton.cdiv(triton.cdiv(N, n_split), tiles.block_m) * tiles.block_m
    n_split = triton.cdiv(N, split_len)
    dkg_part = torch.empty(n_split, B, H, NG, D, dtype=scalars.dtype, device=q.device)
    dvg_part = torch.empty_like(dkg_part)
    _ls_bwd_dkv_global_kernel[(n_gblk, n_split, B * H)](
        q, projected.kg, projected.vg, gvis, pad8 if pad8 is not None else absent(q.device), scalars, do, lse,
        delta, dkg_part, dvg_part,
        *bhn_strides(q, do), stride_pad,
        H, N, NG, cfg.chunk, max(cfg.rank, 1), split_len,
        HAS_PAD=pad8 is not None, BLOCK_G=BLOCK_G, **_common(q, cfg, tiles),
    )
    return dkg_part.sum(0), dvg_part.sum(0)  # fixed-order reduction over the splits


def _dkv(q, k, v, do, lse, delta, *, cfg, pad8, stride_pad, ln_local, scalars, dk_src, dv_src, src_mode, tiles):
    """Window dK, dV (k's dtype) by _ls_bwd_dkv_kernel, with the LN_L backward and the projection's gradients
    dk_src, dv_src added (src_mode); also the per-block LN_L weight and bias gradient partials
    (B, H, n_kblk, D)."""
    B, H, N, D = q.shape
    acc = scalars.dtype
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, q.device)
    n_kblk = triton.cdiv(N, tiles.block_n)  # programs own BLOCK_N keys, visit BLOCK_M queries at a time
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=q.device)  # contiguous: the kernel indexes it so
    dv = torch.empty_like(dk)
    dlnw_part = torch.empty(B, H, n_kblk, D, dtype=acc, device=q.device)
    dlnb_part = torch.empty_like(dlnw_part)
    _ls_bwd_dkv_kernel[(n_kblk, H, B)](
        q, k, v, pad8 if pad8 is not None else absent(q.device), lnw, lnb, scalars, do, lse, delta,
        dk_src if dk_src is not None else absent(q.device), dv_src if dv_src is not None else absent(q.device),
        dk, dv, dlnw_part, dlnb_part,
        *bhn_strides(q, k, v, do), stride_pad, stride_lnh,
        H, N, cfg.window, cfg.half_width,
        HAS_LOCAL=cfg.window > 0, SRC_MODE=src_mode, HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None,
        BLOCK_N=tiles.block_n, **_common(q, cfg, tiles),
    )
    return dk, dv, dlnw_part, dlnb_part


def _ln_global_backward(projected, ln_global, dkg, dvg, eps):
    """(dk_raw, dv_raw, dweight, dbias) through LN_G on the small (B, H, NG, D) tensors, by autograd."""
    if ln_global is None:
        return dkg, dvg, None, None
    acc = projected.k_raw.dtype
    with torch.enable_grad():
        leaves = [x.detach().to(acc).requires_grad_() for x in (projected.k_raw, projected.v_raw, *ln_global)]
        ln = (leaves[2], leaves[3])
        outs = (layer_norm(leaves[0], ln, eps), layer_norm(leaves[1], ln, eps))
        return torch.autograd.grad(outs, leaves, (dkg, dvg))


def backward(do, q, k, v, *, cfg: LSConfig, o, lse, projected=None, proj=None, kg=None, vg=None, ln_local=None,
             ln_global=None, pad=None, gpu_tiles=GPU_TILES):
    """Gradients of ``forward``'s inputs: o is its o_acc (or its out), lse and projected what it returned (with
    proj), or kg, vg the projected keys and values it was given. Returns Grads: with proj, the gradients of
    proj and of the LayerNorm parameters; with kg, vg given, those of kg and vg."""
    q, k, v, do = _kernel_tensors(q, k, v, do)
    B, H, N, D = q.shape
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, q.device)
    acc = scalars.dtype
    if projected is None:
        projected = _given(kg, vg, acc, q)
    pad8, stride_pad = pad_int8(pad)
    delta = (do.to(acc) * o.to(acc)).sum(-1)  # (B, H, N): rowsum(dO * O), 0 at padded queries whatever dO holds
    delta = (delta if pad is None else delta.masked_fill(pad[:, None, :], 0.0)).contiguous()
    NG = projected.kg.shape[2]
    gvis = gvis_int8(pad, B, N, max(cfg.rank, 1), cfg.causal, cfg.chunk, NG, q.device)
    tiles = bwd_config(D, q.dtype, gpu_tiles)
    where = dict(cfg=cfg, pad8=pad8, stride_pad=stride_pad, scalars=scalars)
    dq = _dq(q, k, v, do, lse, delta, projected=projected, gvis=gvis, ln_local=ln_local, tiles=tiles["dq"], **where)

    grads = {}
    dk_src = dv_src = None
    if NG > 0:
        dkg, dvg = _dkv_global(q, do, lse, delta, projected=projected, gvis=gvis, tiles=tiles["dkv_global"], **where)
        if proj is None:
            grads.update(kg=dkg, vg=dvg)
        else:
            dk_raw, dv_raw, grads["ln_global_weight"], grads["ln_global_bias"] = _ln_global_backward(
                projected, ln_global, dkg, dvg, cfg.eps)
            grads["proj"], dk_src, dv_src = projection_backward(
                proj=_kernel_proj(proj, acc), k=k, v=v, pad8=pad8, stride_pad=stride_pad,
                ln_src=ln_local if cfg.project_after_ln else None, causal=cfg.causal, chunk=cfg.chunk,
                scalars=scalars, projected=projected, dk_raw=dk_raw, dv_raw=dv_raw)
    elif proj is not None:  # causal, no full chunk: proj is never used
        grads["proj"] = torch.zeros_like(proj)

    src_mode = SRC_NONE if dk_src is None else (SRC_AFTER_LN if cfg.project_after_ln else SRC_BEFORE_LN)
    dk, dv, dlnw_part, dlnb_part = _dkv(q, k, v, do, lse, delta, ln_local=ln_local, dk_src=dk_src, dv_src=dv_src,
                                        src_mode=src_mode, tiles=tiles["dkv"], **where)
    if ln_local is not None:
        dims = (0, 2) if ln_local[0].dim() == 2 else (0, 1, 2)
        grads.update(ln_local_weight=dlnw_part.sum(dims), ln_local_bias=dlnb_part.sum(dims))
    return Grads(q=dq, k=dk, v=dv, **grads)
