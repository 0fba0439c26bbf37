"""Launchers of the two-dimensional kernels (``kernels/vision.py``): their tiles, the forward and the backward
of the attention of each patch token to its neighbourhood (normalised window keys, plus the expanded
relative-position bias) and to the keys every query sees (projected vectors and global keys, normalised).

The LayerNorms, the projection and the bias table's expansion run before these launchers (``vision_ops``), under
autograd; the gradients here are those of q, the window keys and values, the keys every query sees and the
expanded bias. Deterministic: the keys every query sees get theirs from the one-dimensional dKg/dVg kernels
(``launch``: the order of the queries does not matter to them), the bias from per-program partials summed
in a fixed order.
"""
from typing import NamedTuple, Optional

import torch

from ..config import HALF_DTYPES, LOG2E, LS2DConfig, LSConfig
from .args import absent, bhn_strides, block_d, block_g, kernel_dtype, make_scalars, next_pow2, pad_int8
from .kernels.vision import _ls2d_bwd_dkv_kernel, _ls2d_bwd_dq_kernel, _ls2d_fwd_kernel
from .launch import GPU_TILES, _delta, _dkv_global, bwd_config
from .projection import Projected

# window keys per tile of the forward and dQ kernels: whole neighbourhood rows of SPAN_P slots
TARGET_KEYS = 64
_MIN_TILE = 16  # tl.dot's smallest dimension
NO_WINDOW_SIDE = 8  # query patches of a call without a window
# per kernel (most positions per program, key slots per tile, warps, stages) by (dtype kind, D <= 64), chosen by
# ahead-of-time compilation (bench/aot_report.py): zero spills on sm_90a, and for fp16/bf16 the fewest
# warp-instructions per tile (4 warps issue 35-40% fewer than 8 on the same tile). The dQ kernel holds the bias
# and its gradient's tiles besides the attention's: narrower key tiles
_KERNEL_TILES = {
    ("half", True): dict(fwd=(64, 64, 4, 2), dq=(64, 16, 4, 1), dkv=(32, 0, 4, 1)),
    ("half", False): dict(fwd=(64, 32, 4, 2), dq=(32, 32, 4, 1), dkv=(32, 0, 4, 1)),
    ("fp32", True): dict(fwd=(32, 16, 8, 2), dq=(32, 16, 8, 2), dkv=(16, 0, 8, 1)),
    ("fp32", False): dict(fwd=(32, 16, 8, 1), dq=(32, 16, 8, 1), dkv=(16, 0, 8, 1)),
    ("fp64", True): dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkv=(16, 0, 4, 1)),
    ("fp64", False): dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkv=(16, 0, 4, 1)),
}
# the dQ kernel sums the bias gradient over batches in about this many programs (each walks its batches)
_BIAS_PROGRAMS = 1024


def query_patches(cfg: LS2DConfig):
    """(side, patch rows, patch columns) of the kernels' query blocks: the window's patches, or without a window
    (projected and global keys only) patches of NO_WINDOW_SIDE."""
    side = cfg.window if cfg.window > 0 else NO_WINDOW_SIDE
    nx, ny = cfg.grid
    return side, -(-nx // side), -(-ny // side)


class KernelTiles(NamedTuple):
    """One kernel's tiles: block_m positions of a patch per program (queries of the forward and dQ kernels;
    keys of dK/dV, which visits the queries around in the same parts), split programs per patch, rows
    neighbourhood rows per key tile (forward, dQ), warps, stages."""
    block_m: int
    split: int
    rows: int
    num_warps: int
    num_stages: int


class PatchTiles(NamedTuple):
    """The two-dimensional kernels' tiles: m_rows, a patch's w * w positions padded (rows of the expanded bias,
    a multiple of every block_m); span_p, the neighbourhood's side padded to a power of two (slots per
    neighbourhood row); nbp, slots per position of the expanded bias (whole key tiles of every kernel); the
    forward's, dQ's and dK/dV's KernelTiles."""
    m_rows: int
    span_p: int
    nbp: int
    fwd: KernelTiles
    dq: KernelTiles
    dkv: KernelTiles


def patch_tiles(cfg: LS2DConfig, dtype, D):
    """The kernels' tiles for patch side w (the neighbourhood side S = cfg.span) and head dim D, from
    _KERNEL_TILES: key tiles of whole neighbourhood rows."""
    w, S = query_patches(cfg)[0], max(cfg.span, 1)
    span_p = next_pow2(S)
    m_rows = max(_MIN_TILE, next_pow2(w * w))
    kind = "half" if dtype in HALF_DTYPES else "fp64" if dtype == torch.float64 else "fp32"
    chosen = {}
    for kernel, (most, keys, warps, stages) in _KERNEL_TILES[kind, D <= 64].items():
        block_m = min(most, m_rows)
        rows = max(min(next_pow2(S), max(1, keys // span_p)), -(-_MIN_TILE // span_p))
        chosen[kernel] = KernelTiles(block_m, -(-w * w // block_m), rows, warps, stages)
    rows = max(t.rows for t in chosen.values())
    return PatchTiles(m_rows=m_rows, span_p=span_p, nbp=-(-S // rows) * rows * span_p, **chosen)


def expand_bias(wb, cfg, dtype, D):
    """(H, w * w, S * S) window bias -> (H, m_rows, nbp) contiguous, the layout of the tiles of the kernels that
    compute inputs of dtype and head dim D: position m's bias of slot a * span_p + b (neighbourhood row a,
    column b), zeros at padding slots. Differentiable."""
    tiles = patch_tiles(cfg, kernel_dtype(dtype), D)
    H, S, w = wb.shape[0], cfg.span, cfg.window
    out = wb.new_zeros(H, tiles.m_rows, tiles.nbp // tiles.span_p, tiles.span_p)
    out[:, :w * w, :S, :S] = wb.reshape(H, w * w, S, S)
    return out.reshape(H, tiles.m_rows, tiles.nbp)


class Forward2d(NamedTuple):
    """forward_2d's results: out (B, H, N, D) in q's dtype, its rounding residual (or None), lse (B, H, N)."""
    out: torch.Tensor
    o_res: Optional[torch.Tensor]
    lse: torch.Tensor


class Grads2d(NamedTuple):
    """backward_2d's results: q, k, v (window keys and values) in the kernels' dtype; kall, vall (the keys every
    query sees) and the expanded bias in the accumulation dtype (None where absent)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kall: Optional[torch.Tensor]
    vall: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _visible_all(pad, B, rank, NG, device):
    """(B, NG) int8: the projected vectors of an image with no real token are invisible; global keys never."""
    vis = torch.ones(B, NG, dtype=torch.int8, device=device)
    if pad is not None and rank > 0:
        vis[:, :rank] = (~pad).any(1, keepdim=True).to(torch.int8)
    return vis


def _kernel_bias(wb, scalars):
    """The expanded bias as the kernels add it: in their exp units (times log2(e) unless fp64), contiguous; a
    stand-in when absent."""
    if wb is None:
        return absent(scalars.device)
    return (wb.to(scalars.dtype) * (1.0 if scalars.dtype == torch.float64 else LOG2E)).contiguous()


def forward_2d(q, k, v, kall, vall, wb, *, cfg: LS2DConfig, pad=None, store_acc=False):
    """The attention of validated, normalised inputs: q, k, v (B, H, N, D) (k, v the window keys and values),
    kall, vall (B, H, NG, D) the keys every query sees (the cfg.rank projected vectors first, then global keys)
    or None, wb (H, block_m, nbp) the expanded window bias in natural units (expand_bias) or None, pad (B, N)
    bool. store_acc: also keep the output's rounding residual (fp16/bf16) for the backward. Returns
    Forward2d."""
    dtype = q.dtype
    q, k, v = ((x if x.stride(-1) == 1 else x.contiguous()).to(kernel_dtype(x.dtype)) for x in (q, k, v))
    B, H, N, D = q.shape
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, q.device)
    tiles = patch_tiles(cfg, q.dtype, D)
    NG = kall.shape[2] if kall is not None else 0
    kall, vall = ((x.to(q.dtype).contiguous() if NG else q.new_empty(B, H, 0, D)) for x in (kall, vall))
    pad8, stride_pad = pad_int8(pad)
    side, px, py = query_patches(cfg)
    out = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    keep_res = store_acc and dtype in HALF_DTYPES
    res_in_kernel = keep_res and q.dtype == dtype  # (the interpreter computes bf16 in fp32: residual below)
    o_res = torch.empty_like(out) if keep_res else None
    lse = torch.empty(B, H, N, dtype=scalars.dtype, device=q.device)
    t = tiles.fwd
    _ls2d_fwd_kernel[(px * py * t.split, H, B)](
        q, k, v, kall, vall, _visible_all(pad, B, cfg.rank, NG, q.device),
        pad8 if pad8 is not None else absent(q.device), _kernel_bias(wb, scalars), scalars,
        out, o_res if res_in_kernel else absent(q.device), lse,
        *bhn_strides(q, k, v), stride_pad,
        H, N, *cfg.grid, py, t.split, NG, side, cfg.half_width, cfg.span, tiles.m_rows, tiles.nbp,
        HEAD_DIM=D, HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None, HAS_BIAS=wb is not None,
        IS_FP64=q.dtype == torch.float64, PRECISION="ieee", STORE_RES=res_in_kernel,
        BLOCK_M=t.block_m, ROWS=t.rows, SPAN_P=tiles.span_p, BLOCK_G=block_g(NG, TARGET_KEYS),
        BLOCK_D=block_d(D), num_warps=t.num_warps, num_stages=t.num_stages,
    )
    if keep_res and not res_in_kernel:
        o_res = out - out.to(dtype).to(out.dtype)
    return Forward2d(out=out.to(dtype), o_res=o_res, lse=lse)


def _bias_groups(B, H, n_patches):
    """Programs of the dQ kernel per patch and head over the batches: each sums the bias gradient of its
    batches (batch b goes to group b % groups) into its own partial."""
    return max(1, min(B, _BIAS_PROGRAMS // max(H * n_patches, 1)))


def backward_2d(do, q, k, v, kall, vall, wb, *, cfg: LS2DConfig, o, o_res, lse, pad=None, gpu_tiles=GPU_TILES):
    """Gradients of forward_2d's inputs (its out, o_res and lse given). Returns Grads2d."""
    q, k, v, do = ((x if x.stride(-1) == 1 else x.contiguous()).to(kernel_dtype(x.dtype)) for x in (q, k, v, do))
    B, H, N, D = q.shape
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, q.device)
    acc = scalars.dtype
    tiles = patch_tiles(cfg, q.dtype, D)
    NG = kall.shape[2] if kall is not None else 0
    kall_k, vall_k = ((x.to(q.dtype).contiguous() if NG else q.new_empty(B, H, 0, D)) for x in (kall, vall))
    pad8, stride_pad = pad_int8(pad)
    gvis = _visible_all(pad, B, cfg.rank, NG, q.device)
    delta = _delta(o, o_res, do, pad8=pad8, stride_pad=stride_pad, q_off=0, acc=acc)
    grads = dict(kall=None, vall=None, bias=None)
    if NG > 0:  # every query sees them: the one-dimensional bidirectional kernels, queries in any order
        flat = LSConfig(window=0, causal=False, chunk=1, rank=NG, scale=cfg.scale, eps=cfg.eps)
        glob = _dkv_global(q, do, lse, delta, cfg=flat, projected=Projected(kall_k, vall_k, *(kall_k[:, :, :0],) * 2,
                                                                            lse[:, :, :0]),
                           gvis=gvis, pad8=pad8, stride_pad=stride_pad, offsets=(0, 0), scalars=scalars,
                           ln_global=None, tiles=bwd_config(D, q.dtype, gpu_tiles)["dkv_global"])
        grads.update(kall=glob.dk_raw, vall=glob.dv_raw)
    side, px, py = query_patches(cfg)
    wb_k = _kernel_bias(wb, scalars)
    none = absent(q.device)
    groups = _bias_groups(B, H, px * py) if wb is not None else B
    dwb_part = torch.zeros(groups, px * py, H, tiles.m_rows, tiles.nbp, dtype=acc, device=q.device) \
        if wb is not None else none
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    common = dict(HEAD_DIM=D, HAS_PAD=pad8 is not None, HAS_BIAS=wb is not None, IS_FP64=q.dtype == torch.float64,
                  PRECISION="ieee", SPAN_P=tiles.span_p, BLOCK_D=block_d(D))
    t = tiles.dq
    _ls2d_bwd_dq_kernel[(px * py * t.split, H, groups)](
        q, k, v, kall_k, vall_k, gvis, pad8 if pad8 is not None else none, wb_k, scalars, do, lse, delta, dq,
        dwb_part, *bhn_strides(q, k, v, do), stride_pad,
        B, H, N, *cfg.grid, py, t.split, NG, side, cfg.half_width, cfg.span, tiles.m_rows, tiles.nbp,
        HAS_LOCAL=cfg.window > 0, HAS_GLOBAL=NG > 0, BLOCK_M=t.block_m, ROWS=t.rows, BLOCK_G=block_g(NG, TARGET_KEYS),
        num_warps=t.num_warps, num_stages=t.num_stages, **common,
    )
    if wb is not None:
        grads["bias"] = dwb_part.sum((0, 1))
    if cfg.window > 0:
        dk, dv = torch.empty(B, H, N, D, dtype=k.dtype, device=q.device), torch.empty(B, H, N, D, dtype=v.dtype,
                                                                                      device=q.device)
        t = tiles.dkv
        _ls2d_bwd_dkv_kernel[(px * py * t.split, H, B)](
            q, k, v, pad8 if pad8 is not None else none, wb_k, scalars, do, lse, delta, dk, dv,
            *bhn_strides(q, k, v, do), stride_pad,
            H, N, *cfg.grid, px, py, t.split, cfg.window, cfg.half_width, cfg.span, tiles.m_rows, tiles.nbp,
            BLOCK_M=t.block_m, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        )
    else:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    return Grads2d(q=dq, k=dk, v=dv, **grads)
