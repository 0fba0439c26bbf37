"""Backward kernels, FlashAttention style: probabilities recomputed from the forward's logsumexp,
delta = rowsum(dO * O) computed beforehand. dQ per query block; window dK, dV per key block (with the
LN_L backward and the projection's gradients of what it read); the projected vectors' dKg, dVg as
per-split partials summed afterwards in a fixed order. No atomics: deterministic."""
import triton
import triton.language as tl

from .common import (_batch_head, _dot, _exp, _layer_norm_rows, _layer_norm_rows_bwd, _load_ln, _load_rows,
                     _load_scalars, _normalize_rows, _query_block, _real_rows, _tile)
from .visibility import _global_visible, _local_visible, _visit_keys


@triton.jit
def _ls_bwd_dq_kernel(
    Q, K, V,  # [B, H, N, HEAD_DIM], unit last stride
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, accumulation dtype
    GVIS,  # [B, NG] int8
    PAD,  # [B, N] int8, nonzero = padding
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_L weight and bias
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous: the forward's logsumexp, rowsum(dO * O)
    DQ,  # [B, H, N, HEAD_DIM] contiguous, q's dtype
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,  # (B, H, N) strides of Q, K, V, DO
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_padb, stride_lnh,
    H, N, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of a block of queries: probabilities recomputed from the logsumexp, same key sets as the forward."""
    off_b, off_h, start_m, offs_m, mask_m, offs_d, mask_d, last_m = _query_block(N, BLOCK_M, BLOCK_D, HEAD_DIM)
    qk_scale, eps, zero, scale = _load_scalars(SCALARS)
    q_ok = _real_rows(PAD + off_b * stride_padb, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, q_ok, offs_d, mask_d)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, q_ok, offs_d, mask_d)
    lse = tl.load(LSE + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(DELTA + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=0.0)
    _, _, dq = _visit_keys(  # dq: [BLOCK_M, BLOCK_D], from zeros
        q, do, lse, delta, lse, delta, tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero, qk_scale, eps, zero, K, V,
        KG, VG, GVIS, PAD, LNW, LNB, off_b, off_h, H, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_vn, stride_padb, stride_lnh, offs_m, start_m, last_m, offs_d, mask_d, N, NG, WINDOW, HALF, CHUNK,
        RANK, CAUSAL, HAS_LOCAL, HAS_GLOBAL, HAS_PAD, HAS_LN, HEAD_DIM, IS_FP64, PRECISION, BLOCK_N, BLOCK_G, DQ=True)
    dq = dq * scale
    dq_ptrs = DQ + ((off_b * H + off_h) * N + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _ls_bwd_dkv_kernel(
    Q, K, V,  # [B, H, N, HEAD_DIM], unit last stride
    PAD,  # [B, N] int8, nonzero = padding
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_L weight and bias
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous
    DK_SRC, DV_SRC,  # [B, H, N, HEAD_DIM] contiguous, accumulation dtype: the projection's gradients of k_P, v_P
    DK, DV,  # [B, H, N, HEAD_DIM] contiguous, k's dtype
    DLNW_PART, DLNB_PART,  # [B, H, n_key_blocks, HEAD_DIM]: LN_L weight and bias gradients per key block
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
    pid_n, off_h, off_b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n, mask_n = _tile(start_n, BLOCK_N, N)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    qk_scale, eps, zero, scale = _load_scalars(SCALARS)
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
            offs_m, mask_m = _tile(start_m, BLOCK_M, N)
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
        dk = dk * scale

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
    Q,  # [B, H, N, HEAD_DIM], unit last stride
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, accumulation dtype
    GVIS,  # [B, NG] int8
    PAD,  # [B, N] int8, nonzero = padding
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous
    DKG_PART, DVG_PART,  # [n_split, B, H, NG, HEAD_DIM]: per-split gradient partials
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
    off_b, off_h = _batch_head(pid_bh, H)
    offs_g, mask_g = _tile(pid_g * BLOCK_G, BLOCK_G, NG)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    mask_gd = mask_g[:, None] & mask_d[None, :]
    qk_scale, _, zero, scale = _load_scalars(SCALARS)
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
        offs_m, mask_m = _tile(start_m, BLOCK_M, hi)
        mask_m = mask_m & (offs_m >= pid_s * SPLIT_LEN)
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
    dkg = dkg * scale
    part = (pid_s.to(tl.int64) * tl.num_programs(2) + pid_bh) * NG * HEAD_DIM \
        + offs_g[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DKG_PART + part, dkg, mask=mask_gd)
    tl.store(DVG_PART + part, dvg, mask=mask_gd)
