"""Long-short attention: fused Triton kernels, their autograd Function, and ``ls_attention``.

Forward: the projection pre-pass (``projection.py``) produces the projected keys
and values; ``_ls_fwd_kernel`` then runs, for a block of queries, ONE online
softmax over the projected keys visible to the block and its window keys, with
LN_L applied to every loaded key and value tile in registers. It writes O and an
fp32 logsumexp per query (+inf for queries that see nothing or are padded, so the
backward recomputes zero probabilities for them).
"""
import math
import os

import torch
import triton
import triton.language as tl

from .blocked import layer_norm, ls_attention_torch
from .checks import LOG2E, check_inputs, check_scores_fit, key_norm_bounds
from .kernel_utils import (_dot, _layer_norm_rows, _layer_norm_rows_bwd, _load_ln, _load_rows, _normalize_rows,
                           _real_rows, ln_params, next_pow2)
from .projected_torch import projected_visibility
from .projection import projection_backward, projection_forward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128


@triton.jit
def _exp(x, IS_FP64: tl.constexpr):
    """exp in the kernel's units: base 2 for fp32 (scores carry log2(e)), natural for fp64."""
    if IS_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def _softmax_step(s, visible, values, m_i, l_i, acc, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update with a tile of scores s [BLOCK_M, BLOCK_K] and values [BLOCK_K, BLOCK_D]."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = _exp(m_i - m_safe, IS_FP64)
    p = _exp(s - m_safe[:, None], IS_FP64)  # [BLOCK_M, BLOCK_K]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, IS_FP64, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _local_visible(offs_m, offs_n, N, WINDOW, HALF, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: key offs_n lies in the window of query offs_m (and in the sequence)."""
    if CAUSAL:  # keys t - WINDOW + 1 .. t
        vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - WINDOW)
    else:  # the query's segment widened by HALF on both sides
        seg_start = (offs_m // WINDOW) * WINDOW
        vis = (offs_n[None, :] >= seg_start[:, None] - HALF) & (offs_n[None, :] < seg_start[:, None] + WINDOW + HALF)
    return vis & (offs_n < N)[None, :]


@triton.jit
def _global_visible(offs_m, offs_g, gvis, CHUNK, RANK, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_G]: projected vector offs_g is visible to query offs_m."""
    vis = (gvis != 0)[None, :]
    if CAUSAL:  # only chunks strictly before the query's own
        vis = vis & ((offs_g // RANK)[None, :] < (offs_m // CHUNK)[:, None])
    return vis


@triton.jit
def _window_range(start_m, last_m, N, WINDOW, HALF, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi): the key tiles holding a window key of any query start_m .. last_m, lo tile-aligned."""
    if CAUSAL:  # keys t - WINDOW + 1 .. t
        lo = tl.maximum(start_m - WINDOW + 1, 0)
        hi = last_m + 1
    else:  # keys of the segments of the first and last query, widened by HALF
        lo = tl.maximum((start_m // WINDOW) * WINDOW - HALF, 0)
        hi = tl.minimum((last_m // WINDOW) * WINDOW + WINDOW + HALF, N)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _projected_range(last_m, NG, CHUNK, RANK, CAUSAL: tl.constexpr):
    """Number of projected vectors any query up to last_m can see."""
    if CAUSAL:  # the chunks before the last query's own, RANK vectors each
        return tl.minimum((last_m // CHUNK) * RANK, NG)
    else:
        return NG


@triton.jit
def _window_tile(k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, offs_n, offs_d, mask_d, ln_w, ln_b,
                 eps, zero, q, N, WINDOW, HALF, HAS_LN: tl.constexpr, HAS_PAD: tl.constexpr,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Window keys and values [BLOCK_N, BLOCK_D] (LN_L applied, in q's dtype; zeros at padded positions) and
    their visibility [BLOCK_M, BLOCK_N] to the queries offs_m."""
    key_ok = _real_rows(pad_base, offs_n, offs_n < N, HAS_PAD)  # [BLOCK_N]
    k = _load_rows(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d)
    v = _load_rows(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d)
    if HAS_LN:
        k = _layer_norm_rows(k + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
        v = _layer_norm_rows(v + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
    visible = _local_visible(offs_m, offs_n, N, WINDOW, HALF, CAUSAL) & key_ok[None, :]
    return k, v, visible


@triton.jit
def _projected_tile(KG, VG, GVIS, g_base, gvis_base, offs_m, offs_g, g_hi, offs_d, mask_d, q, CHUNK, RANK,
                    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Projected keys and values [BLOCK_G, BLOCK_D] in q's dtype (zeros where invisible to every query) and
    their visibility [BLOCK_M, BLOCK_G]."""
    mask_g = offs_g < g_hi
    gvis = tl.load(GVIS + gvis_base + offs_g, mask=mask_g, other=0)  # its sequence or chunk has real tokens
    rows = (g_base + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (mask_g & (gvis != 0))[:, None] & mask_d[None, :]
    kg = tl.load(KG + rows, mask=ok, other=0.0).to(q.dtype)
    vg = tl.load(VG + rows, mask=ok, other=0.0).to(q.dtype)
    return kg, vg, _global_visible(offs_m, offs_g, gvis, CHUNK, RANK, CAUSAL)


@triton.jit
def _ls_fwd_kernel(
    Q, K, V, KG, VG, GVIS, PAD, LNW, LNB, SCALARS, O, O_ACC, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_padb, stride_lnh,
    H, N, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    STORE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, off_h, off_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = off_b.to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    qk_scale = tl.load(SCALARS)  # scale, times log2(e) unless fp64
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)  # 0 in the accumulation dtype

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, mask_m, offs_d, mask_d)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32) + zero
    l_i = tl.zeros([BLOCK_M], tl.float32) + zero
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero  # [BLOCK_M, BLOCK_D]
    last_m = tl.minimum(start_m + BLOCK_M, N) - 1  # last real query of the block

    if HAS_GLOBAL:
        g_hi = _projected_range(last_m, NG, CHUNK, RANK, CAUSAL)
        for start_g in range(0, g_hi, BLOCK_G):
            offs_g = start_g + tl.arange(0, BLOCK_G)
            kg, vg, visible = _projected_tile(KG, VG, GVIS, (off_b * H + off_h) * NG, off_b * NG, offs_m, offs_g,
                                              g_hi, offs_d, mask_d, q, CHUNK, RANK, CAUSAL, HEAD_DIM)
            s = _dot(q, tl.trans(kg), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_G]
            m_i, l_i, acc = _softmax_step(s, visible, vg, m_i, l_i, acc, IS_FP64, PRECISION)

    if HAS_LOCAL:
        ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        lo, hi = _window_range(start_m, last_m, N, WINDOW, HALF, BLOCK_N, CAUSAL)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, visible = _window_tile(K + off_b * stride_kb + off_h * stride_kh,
                                         V + off_b * stride_vb + off_h * stride_vh, stride_kn, stride_vn,
                                         PAD + off_b * stride_padb, offs_m, offs_n, offs_d, mask_d, ln_w, ln_b,
                                         eps, zero, q, N, WINDOW, HALF, HAS_LN, HAS_PAD, CAUSAL, HEAD_DIM)
            s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            m_i, l_i, acc = _softmax_step(s, visible, v, m_i, l_i, acc, IS_FP64, PRECISION)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + _log(tl.where(seen, l_i, 1.0), IS_FP64), float("inf"))
    if HAS_PAD:
        q_pad = tl.load(PAD + off_b * stride_padb + offs_m, mask=mask_m, other=1) != 0
        out = tl.where(q_pad[:, None], 0.0, out)
        lse = tl.where(q_pad, float("inf"), lse)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if STORE_ACC:  # unrounded output, (B, H, N, HEAD_DIM): the backward's rowsum(dO * O) uses it
        acc_ptrs = O_ACC + ((off_b * H + off_h) * N + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, out, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + (off_b * H + off_h) * N + offs_m, lse, mask=mask_m)


@triton.jit
def _ls_bwd_dq_kernel(
    Q, K, V, KG, VG, GVIS, PAD, LNW, LNB, SCALARS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_padb, stride_lnh,
    H, N, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of a block of queries: probabilities recomputed from the logsumexp, same key sets as the forward."""
    pid_m, off_h, off_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = off_b.to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    qk_scale = tl.load(SCALARS)
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)
    q_ok = _real_rows(PAD + off_b * stride_padb, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, q_ok, offs_d, mask_d)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, q_ok, offs_d, mask_d)
    lse = tl.load(LSE + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(DELTA + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero  # [BLOCK_M, BLOCK_D]
    last_m = tl.minimum(start_m + BLOCK_M, N) - 1

    if HAS_GLOBAL:
        g_hi = _projected_range(last_m, NG, CHUNK, RANK, CAUSAL)
        for start_g in range(0, g_hi, BLOCK_G):
            offs_g = start_g + tl.arange(0, BLOCK_G)
            kg, vg, visible = _projected_tile(KG, VG, GVIS, (off_b * H + off_h) * NG, off_b * NG, offs_m, offs_g,
                                              g_hi, offs_d, mask_d, q, CHUNK, RANK, CAUSAL, HEAD_DIM)
            s = _dot(q, tl.trans(kg), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_G]
            p = tl.where(visible, _exp(s - lse[:, None], IS_FP64), 0.0)
            ds = p * (_dot(do, tl.trans(vg), IS_FP64, PRECISION) - delta[:, None])
            dq += _dot(ds.to(q.dtype), kg, IS_FP64, PRECISION)

    if HAS_LOCAL:
        ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        lo, hi = _window_range(start_m, last_m, N, WINDOW, HALF, BLOCK_N, CAUSAL)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v, visible = _window_tile(K + off_b * stride_kb + off_h * stride_kh,
                                         V + off_b * stride_vb + off_h * stride_vh, stride_kn, stride_vn,
                                         PAD + off_b * stride_padb, offs_m, offs_n, offs_d, mask_d, ln_w, ln_b,
                                         eps, zero, q, N, WINDOW, HALF, HAS_LN, HAS_PAD, CAUSAL, HEAD_DIM)
            s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            p = tl.where(visible, _exp(s - lse[:, None], IS_FP64), 0.0)
            ds = p * (_dot(do, tl.trans(v), IS_FP64, PRECISION) - delta[:, None])
            dq += _dot(ds.to(q.dtype), k, IS_FP64, PRECISION)

    dq = dq * tl.load(SCALARS + 3)  # the score scale
    dq_ptrs = DQ + ((off_b * H + off_h) * N + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _ls_bwd_dkv_kernel(
    Q, K, V, PAD, LNW, LNB, SCALARS, DO, LSE, DELTA, DK_SRC, DV_SRC, DK, DV, DLNW_PART, DLNB_PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_padb, stride_lnh,
    H, N, WINDOW, HALF,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, SRC_MODE: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of a block of window keys: visits exactly the query blocks whose windows hold a key of
    the block (no atomics), runs the LN_L backward in registers and writes per-block LN_L weight and
    bias sums. The projection's gradients of what it read are added before the LN_L backward when it
    read LN_L(k), LN_L(v) (SRC_MODE 1) or after it when it read raw k, v (SRC_MODE 2)."""
    pid_n, off_h, off_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = off_b.to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    qk_scale = tl.load(SCALARS)
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = PAD + off_b * stride_padb
    key_ok = _real_rows(pad_base, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]
    k = _load_rows(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d)
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
    if HAS_LN:
        k = _layer_norm_rows(k + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(Q.dtype.element_ty)
        v = _layer_norm_rows(v + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(Q.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero

    if HAS_LOCAL:
        last_n = tl.minimum(start_n + BLOCK_N, N) - 1
        if CAUSAL:  # queries t with t - WINDOW < key <= t
            lo = start_n
            hi = tl.minimum(last_n + WINDOW, N)
        else:  # segments g with g * WINDOW - HALF <= key < g * WINDOW + WINDOW + HALF
            g_lo = (tl.maximum(start_n - WINDOW - HALF + 1, 0) + WINDOW - 1) // WINDOW
            g_hi = (last_n + HALF) // WINDOW
            lo = g_lo * WINDOW
            hi = tl.minimum((g_hi + 1) * WINDOW, N)
        lo = (lo // BLOCK_M) * BLOCK_M
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q_ok = _real_rows(pad_base, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
            q = _load_rows(q_base, offs_m, stride_qn, q_ok, offs_d, mask_d)  # [BLOCK_M, BLOCK_D]
            do = _load_rows(do_base, offs_m, stride_don, q_ok, offs_d, mask_d)
            lse = tl.load(LSE + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(DELTA + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=0.0)
            visible = _local_visible(offs_m, offs_n, N, WINDOW, HALF, CAUSAL) & key_ok[None, :]
            s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            p = tl.where(visible, _exp(s - lse[:, None], IS_FP64), 0.0)
            dv += _dot(tl.trans(p.to(q.dtype)), do, IS_FP64, PRECISION)
            ds = p * (_dot(do, tl.trans(v), IS_FP64, PRECISION) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IS_FP64, PRECISION)
        dk = dk * tl.load(SCALARS + 3)

    out = ((off_b * H + off_h) * N + offs_n.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    if SRC_MODE == 1:  # gradients of LN_L(k), LN_L(v) through the projection
        dk += tl.load(DK_SRC + out, mask=mask_nd, other=0.0)
        dv += tl.load(DV_SRC + out, mask=mask_nd, other=0.0)
    if HAS_LN:  # statistics recomputed here rather than held in registers through the loop
        k_hat, k_rstd = _normalize_rows(_load_rows(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d) + zero,
                                        mask_d, eps, HEAD_DIM)
        v_hat, v_rstd = _normalize_rows(_load_rows(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d) + zero,
                                        mask_d, eps, HEAD_DIM)
        part = ((off_b * H + off_h) * tl.num_programs(0) + pid_n) * HEAD_DIM + offs_d
        tl.store(DLNW_PART + part, tl.sum(dk * k_hat + dv * v_hat, axis=0), mask=mask_d)
        tl.store(DLNB_PART + part, tl.sum(dk + dv, axis=0), mask=mask_d)
        dk = _layer_norm_rows_bwd(dk * ln_w[None, :], k_hat, k_rstd, HEAD_DIM)
        dv = _layer_norm_rows_bwd(dv * ln_w[None, :], v_hat, v_rstd, HEAD_DIM)
    if SRC_MODE == 2:  # gradients of raw k, v through the projection
        dk += tl.load(DK_SRC + out, mask=mask_nd, other=0.0)
        dv += tl.load(DV_SRC + out, mask=mask_nd, other=0.0)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _ls_bwd_dkv_global_kernel(
    Q, KG, VG, GVIS, PAD, SCALARS, DO, LSE, DELTA, DKG_PART, DVG_PART,
    stride_qb, stride_qh, stride_qn,
    stride_dob, stride_doh, stride_don,
    stride_padb,
    H, N, NG, CHUNK, RANK, SPLIT_LEN,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial dKg, dVg of a block of projected vectors over one split of the queries that see them.
    The splits are summed afterwards in a fixed order (deterministic, no atomics)."""
    pid_g, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < NG
    mask_d = offs_d < HEAD_DIM
    mask_gd = mask_g[:, None] & mask_d[None, :]
    qk_scale = tl.load(SCALARS)
    zero = tl.load(SCALARS + 2)
    rows = (pid_bh.to(tl.int64) * NG + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
    q_dtype = Q.dtype.element_ty
    gvis = tl.load(GVIS + off_b * NG + offs_g, mask=mask_g, other=0)
    seen_gd = (mask_g & (gvis != 0))[:, None] & mask_d[None, :]  # zeros where invisible to every query
    kg = tl.load(KG + rows, mask=seen_gd, other=0.0).to(q_dtype)  # [BLOCK_G, BLOCK_D]
    vg = tl.load(VG + rows, mask=seen_gd, other=0.0).to(q_dtype)
    dkg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    dvg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    lo = pid_s * SPLIT_LEN
    if CAUSAL:  # the first query that sees the block's first chunk
        lo = tl.maximum(lo, ((pid_g * BLOCK_G) // RANK + 1) * CHUNK)
    hi = tl.minimum(pid_s * SPLIT_LEN + SPLIT_LEN, N)
    lo = (lo // BLOCK_M) * BLOCK_M
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = (offs_m < hi) & (offs_m >= pid_s * SPLIT_LEN)
        q_ok = _real_rows(PAD + off_b * stride_padb, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
        q = _load_rows(q_base, offs_m, stride_qn, q_ok, offs_d, mask_d)  # [BLOCK_M, BLOCK_D]
        do = _load_rows(do_base, offs_m, stride_don, q_ok, offs_d, mask_d)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
        visible = _global_visible(offs_m, offs_g, gvis, CHUNK, RANK, CAUSAL) & mask_m[:, None]
        s = _dot(q, tl.trans(kg), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_G]
        p = tl.where(visible, _exp(s - lse[:, None], IS_FP64), 0.0)
        dvg += _dot(tl.trans(p.to(q_dtype)), do, IS_FP64, PRECISION)
        ds = p * (_dot(do, tl.trans(vg), IS_FP64, PRECISION) - delta[:, None])
        dkg += _dot(tl.trans(ds.to(q_dtype)), q, IS_FP64, PRECISION)
    dkg = dkg * tl.load(SCALARS + 3)
    part = (pid_s.to(tl.int64) * tl.num_programs(2) + pid_bh) * NG * HEAD_DIM \
        + offs_g[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DKG_PART + part, dkg, mask=mask_gd)
    tl.store(DVG_PART + part, dvg, mask=mask_gd)


# ----------------------------------------------------------------------------- launch wrappers

def _fwd_config(D, dtype):
    """Default (BLOCK_M, BLOCK_N, num_warps, num_stages) of the main forward kernel.

    Chosen by ahead-of-time compilation (bench/aot_report.py): zero spills on sm_90a.
    fp32 dots are IEEE FMA dots that hold whole rows of their operands in registers,
    hence the small tiles; fp64 has no dot at all (broadcast products).
    """
    if INTERPRET:
        return 32, 32, 4, 1
    if dtype == torch.float64:
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return (32, 16, 8, 2) if D <= 64 else (16, 16, 8, 2)
    return (64, 64, 4, 2) if D <= 64 else (64, 32, 8, 2)


def _bwd_config(D, dtype):
    """Default (BLOCK_M, BLOCK_N, num_warps, num_stages) of the backward kernels, by kernel.

    BLOCK_M counts queries and BLOCK_N keys (or projected vectors) in every kernel.
    Chosen by ahead-of-time compilation like the forward's: zero spills on sm_80 and sm_90a. The
    IEEE fp32 FMA dots need one stage (software pipelining doubles their registers).
    """
    if INTERPRET:
        return dict(dq=(32, 32, 4, 1), dkv=(32, 32, 4, 1), dkv_global=(32, 32, 4, 1))
    if dtype == torch.float64:
        return dict(dq=(16, 16, 4, 1), dkv=(16, 16, 4, 1), dkv_global=(16, 16, 4, 1))
    if dtype == torch.float32:
        if D <= 64:
            return dict(dq=(32, 16, 8, 2), dkv=(16, 16, 8, 2), dkv_global=(16, 16, 8, 2))
        return dict(dq=(16, 16, 8, 2), dkv=(32, 16, 8, 1), dkv_global=(16, 16, 8, 1))
    if D <= 64:
        return dict(dq=(64, 32, 4, 2), dkv=(32, 32, 4, 1), dkv_global=(32, 32, 4, 2))
    return dict(dq=(32, 32, 8, 2), dkv=(16, 32, 8, 2), dkv_global=(32, 32, 4, 2))


def _scalars(scale, eps, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qk_scale = scale if acc == torch.float64 else scale * LOG2E
    return torch.tensor([qk_scale, eps, 0.0, scale], dtype=acc, device=device)


def _projected_visibility(pad, B, N, r, causal, chunk, device, NG):
    """(B, NG) int8, contiguous: whether each projected vector comes from a sequence / chunk with real tokens."""
    if NG == 0:
        return torch.empty(B, 0, dtype=torch.int8, device=device)
    vis = projected_visibility(pad, B, N, r, causal=causal, chunk=chunk, device=device)
    return vis.to(torch.int8).contiguous()


def _delta(do, o, pad, acc):
    """(B, H, N) rowsum(dO * O) in acc, contiguous; 0 at padded queries (whatever dO holds there)."""
    delta = (do.to(acc) * o.to(acc)).sum(-1)
    return (delta if pad is None else delta.masked_fill(pad[:, None, :], 0.0)).contiguous()


def _bhn_strides(*xs):
    """Batch, head and row strides of (B, H, N, ...) tensors, in kernel argument order."""
    return [st for x in xs for st in x.stride()[:3]]


def _launch_fwd(q, k, v, kg, vg, gvis, pad8, ln_local, scalars, window, causal, chunk, r, store_acc):
    """_ls_fwd_kernel on q, k, v (B, H, N, D, last stride 1) and projected kg, vg (B, H, NG, D, contiguous,
    accumulation dtype) with their visibility gvis (B, NG) int8. Returns o, o_acc (the unrounded fp32
    output when store_acc and q is fp16/bf16, else o) and lse (B, H, N)."""
    B, H, N, D = q.shape
    acc, device, NG = scalars.dtype, q.device, kg.shape[2]
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _fwd_config(D, q.dtype)
    BLOCK_G = max(16, min(BLOCK_N, next_pow2(max(NG, 1))))
    o = torch.empty(B, H, N, D, dtype=q.dtype, device=device)
    store_acc = store_acc and q.dtype in (torch.float16, torch.bfloat16)
    o_acc = torch.empty(B, H, N, D, dtype=acc, device=device) if store_acc else o
    lse = torch.empty(B, H, N, dtype=acc, device=device)
    _ls_fwd_kernel[(triton.cdiv(N, BLOCK_M), H, B)](
        q, k, v, kg, vg, gvis, pad8 if pad8 is not None else gvis, lnw, lnb, scalars, o, o_acc, lse,
        *_bhn_strides(q, k, v, o),
        pad8.stride(0) if pad8 is not None else 0, stride_lnh,
        H, N, NG, window, max(window // 2, 1), chunk, r,
        HEAD_DIM=D, CAUSAL=causal, HAS_LOCAL=window > 0, HAS_GLOBAL=NG > 0,
        HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None, IS_FP64=q.dtype == torch.float64,
        PRECISION="ieee", STORE_ACC=store_acc, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
        BLOCK_D=max(16, next_pow2(D)), num_warps=num_warps, num_stages=num_stages,
    )
    return o, o_acc, lse


def _bwd_launch_args(q, causal, kernel):
    BLOCK_M, BLOCK_N, num_warps, num_stages = _bwd_config(q.shape[-1], q.dtype)[kernel]
    return BLOCK_N, dict(HEAD_DIM=q.shape[-1], CAUSAL=causal, IS_FP64=q.dtype == torch.float64, PRECISION="ieee",
                         BLOCK_M=BLOCK_M, BLOCK_D=max(16, next_pow2(q.shape[-1])), num_warps=num_warps,
                         num_stages=num_stages)


def _launch_bwd_dq(q, k, v, kg, vg, gvis, pad8, ln_local, scalars, do, lse, delta, window, causal, chunk, r):
    """dQ (q's dtype) by _ls_bwd_dq_kernel; inputs as _launch_fwd, delta = rowsum(dO * O) (B, H, N)."""
    B, H, N, D = q.shape
    NG = kg.shape[2]
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, scalars.dtype, q.device)
    BLOCK_N, common = _bwd_launch_args(q, causal, "dq")
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    _ls_bwd_dq_kernel[(triton.cdiv(N, common["BLOCK_M"]), H, B)](
        q, k, v, kg, vg, gvis, pad8 if pad8 is not None else gvis, lnw, lnb, scalars, do, lse, delta, dq,
        *_bhn_strides(q, k, v, do),
        pad8.stride(0) if pad8 is not None else 0, stride_lnh,
        H, N, NG, window, max(window // 2, 1), chunk, r,
        HAS_LOCAL=window > 0, HAS_GLOBAL=NG > 0, HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None,
        BLOCK_N=BLOCK_N, BLOCK_G=max(16, min(BLOCK_N, next_pow2(max(NG, 1)))), **common,
    )
    return dq


def _launch_bwd_dkv_global(q, kg, vg, gvis, pad8, scalars, do, lse, delta, causal, chunk, r):
    """Gradients of the projected kg, vg (B, H, NG, D, accumulation dtype) by _ls_bwd_dkv_global_kernel:
    per-split partials summed in a fixed order (deterministic)."""
    B, H, N, D = q.shape
    NG = kg.shape[2]
    BLOCK_N, common = _bwd_launch_args(q, causal, "dkv_global")
    BLOCK_M, BLOCK_G = common["BLOCK_M"], max(16, min(BLOCK_N, next_pow2(NG)))
    n_gblk = triton.cdiv(NG, BLOCK_G)
    n_split = 1 if causal else max(1, min(triton.cdiv(N, BLOCK_M), 512 // (B * H * n_gblk)))
    split_len = triton.cdiv(triton.cdiv(N, n_split), BLOCK_M) * BLOCK_M
    n_split = triton.cdiv(N, split_len)
    dkg_part = torch.empty(n_split, B, H, NG, D, dtype=scalars.dtype, device=q.device)
    dvg_part = torch.empty_like(dkg_part)
    _ls_bwd_dkv_global_kernel[(n_gblk, n_split, B * H)](
        q, kg, vg, gvis, pad8 if pad8 is not None else gvis, scalars, do, lse, delta, dkg_part, dvg_part,
        *_bhn_strides(q, do),
        pad8.stride(0) if pad8 is not None else 0,
        H, N, NG, chunk, r, split_len,
        HAS_PAD=pad8 is not None, BLOCK_G=BLOCK_G, **common,
    )
    return dkg_part.sum(0), dvg_part.sum(0)  # fixed-order reduction over the splits


def _launch_bwd_dkv(q, k, v, pad8, ln_local, scalars, do, lse, delta, dk_src, dv_src, src_mode, window, causal):
    """Window dK, dV (k's dtype) by _ls_bwd_dkv_kernel, with the LN_L backward and, by src_mode (1: after
    LN_L, 2: before), the projection's gradients dk_src, dv_src added; also the per-block LN_L weight and
    bias gradient partials (B, H, n_kblk, D)."""
    B, H, N, D = q.shape
    acc = scalars.dtype
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, q.device)
    BLOCK_N, common = _bwd_launch_args(q, causal, "dkv")  # programs own BLOCK_N keys, visit BLOCK_M queries
    n_kblk = triton.cdiv(N, BLOCK_N)
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=q.device)  # contiguous: the kernel indexes it so
    dv = torch.empty_like(dk)
    dlnw_part = torch.empty(B, H, n_kblk, D, dtype=acc, device=q.device)
    dlnb_part = torch.empty_like(dlnw_part)
    _ls_bwd_dkv_kernel[(n_kblk, H, B)](
        q, k, v, pad8 if pad8 is not None else torch.empty(1, dtype=torch.int8, device=q.device),
        lnw, lnb, scalars, do, lse, delta,
        dk_src if dk_src is not None else delta, dv_src if dv_src is not None else delta,
        dk, dv, dlnw_part, dlnb_part,
        *_bhn_strides(q, k, v, do),
        pad8.stride(0) if pad8 is not None else 0, stride_lnh,
        H, N, window, max(window // 2, 1),
        HAS_LOCAL=window > 0, SRC_MODE=src_mode, HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None,
        BLOCK_N=BLOCK_N, **common,
    )
    return dk, dv, dlnw_part, dlnb_part


def _ls_forward(q, k, v, proj, window, causal, chunk, ln_local, ln_global, project_after_ln, pad, scale, eps,
                store_acc=False):
    """Launch the pre-pass and the main kernel; returns o, lse and what the backward needs.

    store_acc: also return the output unrounded (fp32) for the backward; with fp16 and bf16 outputs,
    rowsum(dO * O) from the rounded O is the backward's largest error.
    """
    B, H, N, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    device = q.device
    scalars = _scalars(scale, eps, q.dtype, device)
    acc = scalars.dtype
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    r = proj.shape[-1] if proj is not None else 1
    if proj is not None:
        kg, vg, k_raw, v_raw, col_lse = projection_forward(
            proj, k, v, pad8, ln_local if project_after_ln else None, ln_global, causal, chunk, scalars)
    else:
        kg = vg = k_raw = v_raw = col_lse = torch.empty(B, H, 0, D, dtype=acc, device=device)
    gvis = _projected_visibility(pad, B, N, r, causal, chunk, device, kg.shape[2])
    o, o_acc, lse = _launch_fwd(q, k, v, kg, vg, gvis, pad8, ln_local, scalars, window, causal, chunk, r,
                                store_acc)
    return o, o_acc, lse, (kg, vg, k_raw, v_raw, col_lse)


def _ls_backward(do, q, k, v, proj, o, lse, saved_proj, window, causal, chunk, ln_local, ln_global,
                 project_after_ln, pad, scale, eps):
    """Gradients of q, k, v, proj and the LN weights and biases; deterministic (no atomics)."""
    B, H, N, D = q.shape
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    device = q.device
    scalars = _scalars(scale, eps, q.dtype, device)
    acc = scalars.dtype
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    delta = _delta(do, o, pad, acc)
    kg, vg, k_raw, v_raw, col_lse = saved_proj
    NG = kg.shape[2]
    r = proj.shape[-1] if proj is not None else 1
    gvis = _projected_visibility(pad, B, N, r, causal, chunk, device, NG)
    dq = _launch_bwd_dq(q, k, v, kg, vg, gvis, pad8, ln_local, scalars, do, lse, delta, window, causal, chunk, r)

    dproj = dlng_w = dlng_b = None
    dk_src = dv_src = None
    if proj is not None and NG == 0:  # causal, no full chunk: proj is never used
        dproj = torch.zeros_like(proj)
    elif proj is not None:
        dkg, dvg = _launch_bwd_dkv_global(q, kg, vg, gvis, pad8, scalars, do, lse, delta, causal, chunk, r)
        if ln_global is not None:  # LN_G backward on the small (B, H, NG, D) tensors
            with torch.enable_grad():
                leaves = [k_raw.detach(), v_raw.detach(), ln_global[0].detach().to(acc), ln_global[1].detach().to(acc)]
                leaves = [x.requires_grad_() for x in leaves]
                ln = (leaves[2], leaves[3])
                outs = (layer_norm(leaves[0], ln, eps), layer_norm(leaves[1], ln, eps))
                dk_raw, dv_raw, dlng_w, dlng_b = torch.autograd.grad(outs, leaves, (dkg, dvg))
        else:
            dk_raw, dv_raw = dkg, dvg
        dproj, dk_src, dv_src = projection_backward(
            proj, k, v, pad8, ln_local if project_after_ln else None, causal, chunk, scalars,
            col_lse, k_raw, v_raw, dk_raw, dv_raw)

    src_mode = 0 if dk_src is None else (1 if project_after_ln else 2)
    dk, dv, dlnw_part, dlnb_part = _launch_bwd_dkv(q, k, v, pad8, ln_local, scalars, do, lse, delta,
                                                   dk_src, dv_src, src_mode, window, causal)
    dlnl_w = dlnl_b = None
    if ln_local is not None:
        dims = (0, 2) if ln_local[0].dim() == 2 else (0, 1, 2)
        dlnl_w, dlnl_b = dlnw_part.sum(dims), dlnb_part.sum(dims)
    return dq, dk, dv, dproj, dlnl_w, dlnl_b, dlng_w, dlng_b


# ----------------------------------------------------------------------------- autograd

class LSAttentionFunction(torch.autograd.Function):
    """Triton long-short attention. LN weights and biases enter as four tensors (or None)."""

    @staticmethod
    def forward(ctx, q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, window, causal, chunk, project_after_ln,
                pad, scale, eps):
        ln_local = None if lnl_w is None else (lnl_w, lnl_b)
        ln_global = None if lng_w is None else (lng_w, lng_b)
        # the interpreter computes bf16 arithmetic on raw bit patterns: run it in fp32 there
        ctx.upcast = INTERPRET and q.dtype == torch.bfloat16
        if ctx.upcast:
            q, k, v = q.float(), k.float(), v.float()
            proj = proj.float() if proj is not None else None
        o, o_saved, lse, saved_proj = _ls_forward(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                                                  project_after_ln, pad, scale, eps,
                                                  store_acc=any(ctx.needs_input_grad[:8]))
        ctx.save_for_backward(q, k, v, proj, o_saved, lse, *saved_proj, lnl_w, lnl_b, lng_w, lng_b, pad)
        ctx.cfg = (window, causal, chunk, project_after_ln, scale, eps)
        return o.to(torch.bfloat16) if ctx.upcast else o

    @staticmethod
    def backward(ctx, do):
        q, k, v, proj, o, lse, kg, vg, k_raw, v_raw, col_lse, lnl_w, lnl_b, lng_w, lng_b, pad = ctx.saved_tensors
        window, causal, chunk, project_after_ln, scale, eps = ctx.cfg
        ln_local = None if lnl_w is None else (lnl_w, lnl_b)
        ln_global = None if lng_w is None else (lng_w, lng_b)
        grads = _ls_backward(do.to(q.dtype), q, k, v, proj, o, lse, (kg, vg, k_raw, v_raw, col_lse), window,
                             causal, chunk, ln_local, ln_global, project_after_ln, pad, scale, eps)
        like = (q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b)
        grads = [None if g is None or not need else g.to(x.dtype if not ctx.upcast or i >= 4 else torch.bfloat16)
                 for i, (g, x, need) in enumerate(zip(grads, like, ctx.needs_input_grad))]
        return (*grads, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- public function

def _use_triton(q, backend):
    if backend == "torch":
        return False
    if backend == "triton":
        if not (q.is_cuda or INTERPRET):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got q on {q.device}; move the inputs to a GPU, or set "
                "TRITON_INTERPRET=1 in the environment before importing ls_kernels to run the kernels in "
                "Triton's CPU interpreter (slow, for testing)")
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, q has shape "
                             f"{tuple(q.shape)}; use backend='torch'")
        return True
    return q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM  # auto


def ls_attention(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                 project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5, backend="auto"):
    """Long-short attention (Transformer-LS): each query attends, under one softmax, to its local
    window of keys and to keys projected from the whole sequence (or from earlier chunks, causal).

    Args:
        q, k, v: (B, H, N, D) queries, keys and values, one dtype (fp16, bf16, fp32 or fp64).
        proj: (B, H, N, r) dynamic-projection logits, or None for window-only attention.
        window: w >= 0, local segment size (bidirectional) or band width (causal); 0 = projection only.
        causal: bidirectional (False) or autoregressive (True).
        chunk: l >= 1, causal only: positions projected together; a query sees chunks before its own.
        ln_local, ln_global: (weight, bias) of LN_L and LN_G, each (D,) or (H, D), or None (no norm).
        project_after_ln: the projection reads LN_L(k), LN_L(v) (True) or raw k, v (False).
        key_padding_mask: (B, N) bool, True = padding; padded tokens are never attended to or projected,
            and their output rows are zero.
        scale: score scale, default 1 / sqrt(D).
        eps: LayerNorm epsilon.
        backend: "auto" (Triton on CUDA, else the blocked PyTorch path), "triton" or "torch".

    Returns:
        (B, H, N, D) tensor in q's dtype.
    """
    window = check_inputs(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                          key_padding_mask, scale, eps, backend)
    chunk = int(chunk)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    check_scores_fit(scale, q, lambda: key_norm_bounds(k, proj, ln_local, ln_global, project_after_ln))
    # through the torch.library ops of ops.py (one opaque node each under torch.compile)
    return _ops.attention(q, k, v, proj, ln_local, ln_global, key_padding_mask, window, causal, chunk,
                          bool(project_after_ln), scale, float(eps), _use_triton(q, backend))


# the custom ops call the launchers above; imported last because ops.py imports from this module
from . import ops as _ops  # noqa: E402
