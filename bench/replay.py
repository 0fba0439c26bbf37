"""Launch replay of the fused path for one configuration, without a GPU: for every kernel the forward and
backward launch, its grid and, per program, the iterations of each of its loops, mirroring the kernels' loop
bounds (``kernels/visibility.py`` and the backward kernels) and the launchers' tiles and splits; with the
bytes each iteration and each program moves and the tensor-core FLOPs of each iteration. bench/kernel_model.py
turns these into times with the compiled loops' instruction counts.

Each kernel is a ``KernelRun``: ``loops`` names its loops in SASS code order (the compiler keeps them in
source order), ``iters`` holds one row per program with the iterations of each loop (a nested loop's count is
per program, summed over the outer iterations).
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from ls_kernels.config import LSConfig, half_width
from ls_kernels.triton_backend import launch, projection
from ls_kernels.triton_backend.args import block_d, block_g
from ls_kernels.triton_backend.kernels import projection as prj_kernels

ACC_BYTES = 4  # fp32 statistics and partials
INT_BYTES = 1  # padding and visibility flags (absent here: no padding)
SPLIT_DOTS = 2  # dprob's fp16/bf16 dots with dKraw, dVraw split in a high and a low part


@dataclass
class KernelRun:
    """One launch: spec label (as bench/aot_report.py), pass, warps, constexpr overrides of the spec, loop
    names in code order, iterations [programs, loops], bytes per iteration of each loop, bytes and FLOPs per
    program outside the loops, tensor FLOPs per iteration of each loop, unique DRAM bytes."""
    label: str
    pass_name: str
    const: dict
    loops: list
    iters: np.ndarray
    loop_bytes: list
    program_bytes: float
    loop_flops: list
    dram_bytes: float
    extra: dict = field(default_factory=dict)


def _cdiv(a, b):
    return -(-a // b)


def tile_split(lo, hi, inner_lo, inner_hi, block):
    """(edge, interior, edge) tile counts of visibility._tile_split: tiles of `block` from lo covering [lo, hi),
    the interior ones inside [inner_lo, inner_hi)."""
    n = max(_cdiv(hi - lo, block), 0)
    first = min(max(_cdiv(inner_lo - lo, block), 0), n)
    last = min(max((inner_hi - lo) // block, first), n) if inner_hi - lo >= block else first
    return first, last - first, n - last


def window_bounds(t, N, w, half, causal):
    """visibility._window_bounds of one query t: its window keys [lo, hi)."""
    lo, hi = (t - w + 1, t + 1) if causal else ((t // w) * w - half, (t // w) * w + w + half)
    return max(lo, 0), min(hi, N)


def query_bounds(n, N, w, half, causal):
    """visibility._query_bounds of one key n: the queries [lo, hi) whose windows hold it."""
    lo, hi = (n, n + w) if causal else ((max(n - half, 0) // w) * w, ((n + half) // w) * w + w)
    return lo, min(hi, N)


def _query_blocks(N, block):
    return [(s, min(s + block, N) - 1) for s in range(0, N, block)]


def _attention_iters(cfg, N, NG, BM, BN, BG):
    """[programs, 5]: projected interior, projected masked, window edge, interior, edge tiles per query block
    (the forward's and the dQ kernel's _visit_keys)."""
    half, rows = half_width(cfg.window), []
    for start, last in _query_blocks(N, BM):
        if cfg.causal:
            g_every, g_any = min((start // cfg.chunk) * cfg.rank, NG), min((last // cfg.chunk) * cfg.rank, NG)
        else:
            g_every = g_any = NG
        interior = g_every // BG
        masked = max(_cdiv(g_any - interior * BG, BG), 0)
        fl, fh = window_bounds(start, N, cfg.window, half, cfg.causal)
        ll, lh = window_bounds(last, N, cfg.window, half, cfg.causal)
        rows.append((interior, masked, *tile_split(fl, lh, ll, fh, BN)))
    return np.array(rows)


ATTENTION_LOOPS = ["projected interior", "projected masked", "window edge", "window interior", "window edge"]


def _dkv_iters(cfg, N, BM, BN):
    half, rows = half_width(cfg.window), []
    for start, last in _query_blocks(N, BN):
        fl, fh = query_bounds(start, N, cfg.window, half, cfg.causal)
        ll, lh = query_bounds(last, N, cfg.window, half, cfg.causal)
        rows.append(tile_split(fl, lh, ll, fh, BM))
    return np.array(rows)


def _dkv_global_split(cfg, N, NG, BM, BG, B, H):
    """(n_split, split_len) as launch._dkv_global."""
    n_gblk = _cdiv(NG, BG)
    n_split = max(1, min(_cdiv(N, BM), launch._DKV_GLOBAL_PROGRAMS // (B * H * n_gblk), launch._DKV_GLOBAL_SPLITS))
    split_len = _cdiv(_cdiv(N, n_split), BM) * BM
    return _cdiv(N, split_len), split_len


def _dkv_global_iters(cfg, N, NG, BM, BG, n_split, split_len):
    rows = []
    for start_g in range(0, NG, BG):
        if cfg.causal:
            first_seen = (start_g // cfg.rank + 1) * cfg.chunk
            all_seen = ((min(start_g + BG, NG) - 1) // cfg.rank + 1) * cfg.chunk
        else:
            first_seen = all_seen = 0
        for s in range(n_split):
            lo = first_seen + s * split_len
            hi = min(lo + split_len, N)
            rows.append(tile_split(lo, hi, max(all_seen, lo), hi, BM))
    return np.array(rows)


def runs(pc):
    """The KernelRuns of one forward (training: the unrounded output kept) and one backward of perf_model
    config pc (no padding, LN_L and LN_G shared over heads)."""
    B, H, N, D, r = pc.batch, pc.heads, pc.seqlen, pc.dim, pc.rank
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[pc.dtype]
    es = dtype.itemsize
    BH = B * H
    cfg = LSConfig(window=pc.window, causal=pc.causal, chunk=pc.chunk, rank=r, scale=D ** -0.5,
                   project_after_ln=pc.project_after_ln)
    NG = cfg.num_projected(N)
    mode = "causal" if pc.causal else "bidir"
    row = D * es  # bytes of one (D,) row in the input dtype
    acc_row = D * ACC_BYTES
    qkv = BH * N * row  # bytes of one (B, H, N, D) tensor
    out = []

    def add(label, pass_name, const, loops, iters, loop_bytes, program_bytes, loop_flops, dram, bh=BH, **extra):
        iters = np.repeat(iters, bh, axis=0) if bh > 1 else iters  # the same bounds in every sequence
        out.append(KernelRun(label, pass_name, const, loops, iters, loop_bytes, program_bytes, loop_flops, dram,
                             extra))

    # forward: projection partials with the LN_L pre-pass of their rows (the LN_L kernel takes the rows past the
    # last full causal chunk), combine, attention
    rows = launch.ROWS_PER_PROGRAM
    tail = N - (N // pc.chunk) * pc.chunk if pc.causal else 0
    if tail:
        add("_ln_local_kernel", "forward", {}, [], np.zeros((_cdiv(tail, rows), 0), int), [],
            rows * (4 * row + 4 * ACC_BYTES), [], BH * tail * (4 * row + 4 * ACC_BYTES))
    PBN, PBR = projection.proj_config(D, r)
    n_rblk = _cdiv(r, PBR)
    if pc.causal:
        n_seg, seg_len, n_groups = N // pc.chunk, pc.chunk, N // pc.chunk
    else:
        seg_len, n_seg = projection._bidirectional_segments(N, BH * n_rblk)
        n_groups = 1
    ranks = min(r, PBR)  # the rank columns a program stores (masked beyond r)
    part_row = ranks * (2 + 2 * D) * ACC_BYTES  # column max, normaliser and two products
    out_row = ranks * (2 * row + 2 * acc_row + ACC_BYTES)  # kg, vg, k_raw, v_raw, col_lse
    final = pc.causal or n_seg == 1  # whole groups: no combine
    per_seg = np.array([[_cdiv(min(seg_len, N - s * seg_len), PBN)] for s in range(n_seg) for _ in range(n_rblk)])
    ln_src = prj_kernels.LN_SRC_PROJECT_NORMED if pc.project_after_ln else prj_kernels.LN_SRC_PROJECT_RAW
    ln_rows = N - tail  # LN_L(k), LN_L(v) and their statistics written by the first rank block's programs
    add(f"_proj_partial_kernel[{'final' if final else 'segment'}]", "forward",
        dict(BLOCK_N=PBN, BLOCK_R=PBR, LN_SRC=ln_src), ["positions"], per_seg,
        [PBN * (PBR * es + 4 * row + 4 * ACC_BYTES)], out_row if final else part_row,
        [2 * 2 * PBR * PBN * block_d(D)],
        BH * N * (r * es + 2 * row) + BH * ln_rows * (2 * row + 4 * ACC_BYTES)
        + BH * n_seg * n_rblk * (out_row if final else part_row))
    if not final:
        CBR = projection.COMBINE_BLOCK_R
        c_ranks = min(r, CBR)
        c_part_row = c_ranks * (2 + 2 * D) * ACC_BYTES
        add("_proj_combine_kernel", "forward", dict(BLOCK_R=CBR), ["segments"],
            np.full((n_groups * _cdiv(r, CBR), 1), n_seg), [c_part_row], c_ranks * (2 * row + 2 * acc_row + ACC_BYTES),
            [0], BH * n_seg * n_rblk * part_row + BH * NG * (2 * row + 2 * acc_row + ACC_BYTES))
    fwd_tiles = launch.fwd_config(D, dtype, window_span=cfg.window_span)
    BM, BN = fwd_tiles.block_m, fwd_tiles.block_n
    BG = block_g(NG, BN)
    iters = _attention_iters(cfg, N, NG, BM, BN, BG)
    issued = (iters[:, :2].sum() * BG + iters[:, 2:].sum() * BN) * BM * BH
    add(f"_ls_fwd_kernel[{mode}]", "forward", dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_G=BG), ATTENTION_LOOPS, iters,
        [2 * BG * row] * 2 + [2 * BN * row] * 3, BM * (3 * row + ACC_BYTES),  # q in; o, its residual, lse out
        [4 * BM * BG * block_d(D)] * 2 + [4 * BM * BN * block_d(D)] * 3,
        3 * qkv + 2 * BH * NG * row + 2 * qkv + BH * N * ACC_BYTES, issued_scores=issued)

    # backward: delta, dKg/dVg (+ combine with the LN_G backward), projection backward, dK/dV, dQ
    tiles = launch.bwd_config(D, dtype)
    delta_here = launch.delta_in_dkv_global(cfg, NG, tiles, D, dtype)
    if not delta_here:  # dO, o, its residual in; delta out
        add("_ls_bwd_delta_kernel", "backward", {}, [], np.zeros((_cdiv(N, rows), 0), int), [],
            rows * (3 * row + ACC_BYTES), [], BH * N * (3 * row + ACC_BYTES))
    t = tiles["dkv_global"]
    GBG = block_g(NG, t.block_n)
    n_split, split_len = _dkv_global_split(cfg, N, NG, t.block_m, GBG, B, H)
    iters = _dkv_global_iters(cfg, N, NG, t.block_m, GBG, n_split, split_len)
    qrow_bytes = t.block_m * (2 * row + 2 * ACC_BYTES)  # q, dO, logsumexp, delta (read, or written)
    o_rows = 2 * row if delta_here else 0  # o and its residual read to compute delta
    add(f"_ls_bwd_dkv_global_kernel[{mode}]", "backward",
        dict(BLOCK_M=t.block_m, BLOCK_G=GBG, DELTA_HERE=delta_here),
        ["edge", "interior", "edge"], iters, [qrow_bytes + t.block_m * o_rows] * 3, GBG * (2 * row + 2 * acc_row),
        [8 * t.block_m * GBG * block_d(D)] * 3,
        2 * qkv + 2 * BH * N * ACC_BYTES + BH * N * o_rows + 2 * BH * NG * row + n_split * BH * NG * 2 * acc_row)
    CBG = launch.COMBINE_ROWS
    add("_ls_bwd_dkv_global_combine_kernel", "backward", dict(BLOCK_G=CBG), ["splits"],
        np.full((_cdiv(NG, CBG), 1), n_split), [CBG * 2 * acc_row], CBG * (4 * acc_row + ACC_BYTES), [0],
        BH * NG * (n_split * 2 * acc_row + 4 * acc_row + ACC_BYTES))
    t = tiles["dkv"]
    iters = _dkv_iters(cfg, N, t.block_m, t.block_n)
    loops, loop_bytes, loop_flops = ["edge", "interior", "edge"], [t.block_m * (2 * row + 2 * ACC_BYTES)] * 3, \
        [8 * t.block_m * t.block_n * block_d(D)] * 3
    # q, dO, logsumexp and delta; k, v (read twice, the second time from L2) and their LN_L statistics;
    # LN_L(k), LN_L(v) written; dk, dv
    dkv_dram = 2 * qkv + 2 * BH * N * ACC_BYTES + 2 * qkv + 4 * BH * N * ACC_BYTES + 2 * qkv + 2 * qkv
    dkv_program = t.block_n * (8 * row + 4 * ACC_BYTES) + 2 * acc_row
    # dKraw, dVraw (a high and a low part in the inputs' dtype), logsumexp, col_dot of one rank column
    proj_rank_bytes = 4 * row + 2 * ACC_BYTES
    # the projection backward's own kernel; dK/dV reads its gradients
    if not projection.runs_in_kernel(pc.causal, D, pc.project_after_ln):
        bseg = pc.chunk if pc.causal else N
        RBN, RBR, _, _ = projection.proj_bwd_config(D, r, bseg, dtype)
        b_seg_len, b_n_seg = (pc.chunk, N // pc.chunk) if pc.causal else projection._bidirectional_segments(N, BH)
        outer = np.array([_cdiv(min(b_seg_len, N - s * b_seg_len), RBN) for s in range(b_n_seg)])
        add("_proj_bwd_kernel", "backward", dict(BLOCK_N=RBN, BLOCK_R=RBR), ["positions", "rank columns"],
            np.stack([outer, outer * _cdiv(r, RBR)], axis=1),
            [RBN * 4 * row, RBN * RBR * 2 * es + RBR * proj_rank_bytes], 0,
            [0, 2 * 2 * RBN * RBR * block_d(D) * SPLIT_DOTS + 2 * 2 * RBN * RBR * block_d(D)],
            BH * N * (4 * row + 2 * r * es) + BH * NG * proj_rank_bytes, seg=b_seg_len)
        dkv_dram += 2 * qkv
        dkv_program += t.block_n * 2 * row
        const = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n)
    else:  # the projection backward at each key block's rows: proj read, dproj written
        _, RBR, _, _ = projection.proj_bwd_config(D, r, N, dtype)
        iters = np.concatenate([iters, np.full((len(iters), 1), _cdiv(r, RBR))], axis=1)
        loops = loops + ["rank columns"]
        loop_bytes = loop_bytes + [t.block_n * RBR * 2 * es + RBR * proj_rank_bytes]
        loop_flops = loop_flops + [2 * 2 * t.block_n * RBR * block_d(D) * SPLIT_DOTS
                                   + 2 * 2 * t.block_n * RBR * block_d(D)]
        dkv_dram += 2 * BH * N * r * es + BH * NG * proj_rank_bytes
        const = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_R=RBR)
    add(f"_ls_bwd_dkv_kernel[{mode}]", "backward", const, loops, iters, loop_bytes, dkv_program, loop_flops, dkv_dram)
    t = tiles["dq"]
    DBG = block_g(NG, t.block_n)
    iters = _attention_iters(cfg, N, NG, t.block_m, t.block_n, DBG)
    add(f"_ls_bwd_dq_kernel[{mode}]", "backward", dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_G=DBG),
        ATTENTION_LOOPS, iters, [2 * DBG * row] * 2 + [2 * t.block_n * row] * 3,
        t.block_m * (3 * row + 2 * ACC_BYTES), [6 * t.block_m * DBG * block_d(D)] * 2
        + [6 * t.block_m * t.block_n * block_d(D)] * 3,
        4 * qkv + 2 * BH * NG * row + 2 * BH * N * ACC_BYTES)
    return out
