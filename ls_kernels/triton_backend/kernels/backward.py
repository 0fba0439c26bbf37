"""Backward kernels, FlashAttention style: probabilities recomputed from the forward's logsumexp, delta =
rowsum(dO * O) by a pre-pass or, where one program of the projected vectors' kernel visits each query, there.
Window dK, dV per key block (with the LN_L backward, the projection's backward or its gradients of what it
read, and LN_L(k), LN_L(v) written for the dQ kernel); dQ per query block; the projected vectors' dKg, dVg as
per-split partials summed afterwards in a fixed order. Key or query tiles that every row of a block sees whole
run unmasked. No atomics: deterministic."""
import triton
import triton.language as tl

from .common import (_affine_rows, _batch_head, _dot, _exp, _layer_norm_rows_bwd, _load_ln, _load_ln_stats,
                     _load_rows, _load_scalars, _load_tile, _normalize_rows, _query_block, _real_rows, _sum_pair, _tile)
from .projection import _proj_rows_bwd
from .visibility import _query_bounds, _tile_split, _visit_keys


@triton.jit
def _ls_bwd_delta_kernel(
    O,  # [B, H, N, HEAD_DIM] contiguous: the forward's output as returned
    O_RES,  # [B, H, N, HEAD_DIM] contiguous: its rounding residual (HAS_RES): O + O_RES is the unrounded output
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    PAD,  # [B, NK] int8, nonzero = padding (query row i at position i + Q_OFF)
    DELTA,  # [B, H, N] contiguous, accumulation dtype: rowsum(dO * O), 0 at padded queries
    stride_dob, stride_doh, stride_don, stride_padb,
    H, N, Q_OFF,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    off_b, off_h, start_m, offs_m, mask_m, offs_d, mask_d, _ = _query_block(N, BLOCK_M, BLOCK_D, HEAD_DIM)
    q_ok = _real_rows(PAD + off_b * stride_padb + Q_OFF, offs_m, mask_m, HAS_PAD)  # [BLOCK_M]: dO at padding ignored
    row = (off_b * H + off_h) * N + offs_m.to(tl.int64)
    o = _load_rows(O, row, HEAD_DIM, q_ok, offs_d, mask_d).to(DELTA.dtype.element_ty)  # [BLOCK_M, BLOCK_D]
    if HAS_RES:
        o += _load_rows(O_RES, row, HEAD_DIM, q_ok, offs_d, mask_d).to(DELTA.dtype.element_ty)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, q_ok, offs_d, mask_d)
    delta = tl.sum(do.to(DELTA.dtype.element_ty) * o, axis=1)
    tl.store(DELTA + row, delta, mask=mask_m)


@triton.jit
def _ls_bwd_dq_kernel(
    Q,  # [B, H, N, HEAD_DIM], unit last stride
    K, V,  # [B, H, NK, HEAD_DIM], unit last stride, q's dtype: the window keys and values (LN_L applied)
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, q's dtype
    GVIS,  # [B, NG] int8
    PAD,  # [B, NK] int8, nonzero = padding (query row i at position i + Q_OFF)
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous: the forward's logsumexp, rowsum(dO * O)
    DQ,  # [B, H, N, HEAD_DIM] contiguous, q's dtype
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,  # (B, H, N) strides of Q, K, V, DO
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_padb,
    H, N, NK, Q_OFF, C_OFF, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of a block of queries: probabilities recomputed from the logsumexp, same key sets as the forward."""
    off_b, off_h, start_m, offs_m, mask_m, offs_d, mask_d, last_m = _query_block(N, BLOCK_M, BLOCK_D, HEAD_DIM)
    qk_scale, _, zero, scale = _load_scalars(SCALARS)
    q_ok = _real_rows(PAD + off_b * stride_padb + Q_OFF, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, q_ok, offs_d, mask_d)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, q_ok, offs_d, mask_d)
    lse = tl.load(LSE + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(DELTA + (off_b * H + off_h) * N + offs_m, mask=mask_m, other=0.0)
    _, _, dq = _visit_keys(  # dq: [BLOCK_M, BLOCK_D], from zeros
        q, do, lse, delta, lse, delta, tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero, qk_scale, K, V, KG, VG,
        GVIS, PAD, off_b, off_h, H, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_padb,
        offs_m, start_m, last_m, offs_d, mask_d, NK, Q_OFF, C_OFF, NG, WINDOW, HALF, CHUNK, RANK, CAUSAL, HAS_LOCAL,
        HAS_GLOBAL,
        HAS_PAD, HEAD_DIM, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION, BLOCK_N, BLOCK_G, DQ=True)
    dq = dq * scale
    dq_ptrs = DQ + ((off_b * H + off_h) * N + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _key_block_grads(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base, delta_base, pad_base, qk_scale,
                     q_lo, q_hi, start, stop, offs_d, mask_d, N, o_base, res_base, stride_on, HAS_PAD: tl.constexpr,
                     EVEN_D: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     MASKED: tl.constexpr, DELTA_HERE: tl.constexpr, HAS_RES: tl.constexpr):
    """dk, dv [BLOCK_N, BLOCK_D] of keys k and values v [BLOCK_N, BLOCK_D], summed over the query tiles
    start, start + BLOCK_M, .. below stop. MASKED tiles keep only queries in each key's [q_lo, q_hi)
    [BLOCK_N]; other tiles are seen whole by every key (padded queries: zero q, dO and +inf logsumexp).
    DELTA_HERE: each query's delta = rowsum(dO * O) computed here from the output's rows at o_base (plus its
    rounding residual's at res_base with HAS_RES; row stride stride_on) and stored at delta_base (every query
    tile must then be visited once), else read there."""
    for start_m in range(start, stop, BLOCK_M):
        offs_m, mask_m = _tile(start_m, BLOCK_M, N)
        q_ok = _real_rows(pad_base, offs_m, mask_m, HAS_PAD)  # padded queries: q = dO = 0
        q = _load_tile(q_base, offs_m, stride_qn, q_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D)
        do = _load_tile(do_base, offs_m, stride_don, q_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf"))  # [BLOCK_M]
        else:
            lse = tl.load(lse_base + offs_m)
        if DELTA_HERE:  # 0 at padded queries, whose dO reads as 0
            acc = delta_base.dtype.element_ty
            o = _load_tile(o_base, offs_m, stride_on, q_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D).to(acc)
            if HAS_RES:
                o += _load_tile(res_base, offs_m, stride_on, q_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D).to(acc)
            delta = tl.sum(do.to(acc) * o, axis=1)  # [BLOCK_M]
            if MASKED:
                tl.store(delta_base + offs_m, delta, mask=mask_m)
            else:
                tl.store(delta_base + offs_m, delta)
        elif MASKED:
            delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = _exp(s - lse[:, None], IS_FP64)
        if MASKED:
            p = tl.where((offs_m[:, None] >= q_lo[None, :]) & (offs_m[:, None] < q_hi[None, :]), p, 0.0)
        dv += _dot(tl.trans(p.to(q.dtype)), do, IS_FP64, PRECISION)
        ds = p * (_dot(do, tl.trans(v), IS_FP64, PRECISION) - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IS_FP64, PRECISION)
    return dk, dv


@triton.jit
def _add_projection_grads(dk, dv, k_p, v_p, key_ok, mask_n, src_nd, offs_n, row, out, PROJ, off_b, off_h, stride_pb,
                          stride_ph, stride_pn, COL_LSE, DK_HI, DK_LO, DV_HI, DV_LO, COL_DOT, DPROJ, DK_SRC, DV_SRC,
                          offs_d, mask_d, zero, H, RANK, SRC_LEN, PROJ_BWD: tl.constexpr, IS_FP64: tl.constexpr,
                          PROJ_PRECISION: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
                          HEAD_DIM: tl.constexpr):
    """dk, dv [BLOCK_N, BLOCK_D] of a key block plus the projection's gradients of the rows k_p, v_p it read:
    computed here (PROJ_BWD: one group over every position, dproj stored at rows `row`) or read from DK_SRC,
    DV_SRC at `out` (below SRC_LEN)."""
    if PROJ_BWD:
        p_rows = PROJ + off_b * stride_pb + off_h * stride_ph + offs_n.to(tl.int64)[:, None] * stride_pn
        dk, dv = _proj_rows_bwd(dk, dv, k_p, v_p, key_ok, mask_n, p_rows, (off_b * H + off_h) * RANK, COL_LSE,
                                DK_HI, DK_LO, DV_HI, DV_LO, COL_DOT, DPROJ, row, offs_d, mask_d, zero, RANK, IS_FP64,
                                PROJ_PRECISION, SPLIT, BLOCK_R, HEAD_DIM)
    else:
        dk += tl.load(DK_SRC + out, mask=src_nd, other=0.0)
        dv += tl.load(DV_SRC + out, mask=src_nd, other=0.0)
    return dk, dv


@triton.jit
def _ln_rows_bwd(dy, x_base, offs_n, stride_xn, row_ok, offs_d, mask_d, mean, rstd, ln_w, HEAD_DIM: tl.constexpr):
    """LN_L backward of rows: dx [BLOCK_N, BLOCK_D] from dy = dL/d LN_L(x), the raw rows reloaded from x_base
    (their statistics mean, rstd [BLOCK_N]), and the rows' contributions to the weight and bias gradients
    [BLOCK_D]."""
    x_hat = (_load_rows(x_base, offs_n, stride_xn, row_ok, offs_d, mask_d) - mean[:, None]) * rstd[:, None]
    dlnw, dlnb = _sum_pair(dy * x_hat, dy, 0)
    return _layer_norm_rows_bwd(dy * ln_w[None, :], x_hat, rstd, HEAD_DIM), dlnw, dlnb


@triton.jit
def _ls_bwd_dkv_kernel(
    Q,  # [B, H, N, HEAD_DIM], unit last stride
    K, V,  # [B, H, NK, HEAD_DIM], unit last stride
    PAD,  # [B, NK] int8, nonzero = padding (query row i at position i + Q_OFF)
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_L weight and bias
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous
    DK_SRC, DV_SRC,  # [B, H, NK, HEAD_DIM] contiguous, k's dtype: the projection's gradients of k_P, v_P
    DK, DV,  # [B, H, NK, HEAD_DIM] contiguous, k's dtype
    KN, VN,  # [B, H, NK, HEAD_DIM] contiguous, q's dtype: LN_L(k), LN_L(v) for the dQ kernel (HAS_LN)
    LN_STATS,  # [4, B, H, NK] contiguous, accumulation dtype: the forward's _ln_local_kernel row statistics
    DLNW_PART, DLNB_PART,  # [B, H, n_key_blocks, HEAD_DIM]: LN_L weight and bias gradients per key block
    PROJ,  # [B, H, NK, RANK] logits, unit last stride (PROJ_BWD)
    COL_LSE, COL_DOT,  # [B, H, RANK] contiguous: as _proj_rows_bwd's (PROJ_BWD)
    DK_HI, DK_LO, DV_HI, DV_LO,  # [B, H, RANK, HEAD_DIM] contiguous: as _proj_rows_bwd's (PROJ_BWD)
    DPROJ,  # [B, H, NK, RANK] contiguous: the logits' gradient (PROJ_BWD)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_pb, stride_ph, stride_pn,
    stride_padb, stride_lnh,
    H, N, NK, Q_OFF, WINDOW, HALF, SRC_LEN, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, SRC_MODE: tl.constexpr,
    PROJ_BWD: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, PROJ_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of a block of window keys: visits exactly the query tiles whose windows hold a key of the block
    (no atomics), runs the LN_L backward in registers and writes per-block LN_L weight and bias sums. The
    projection's gradients of what it read (positions below SRC_LEN) are added before the LN_L backward when
    it read LN_L(k), LN_L(v) (SRC_MODE 1) or after it when it read raw k, v (SRC_MODE 2): read from DK_SRC,
    DV_SRC, or with PROJ_BWD (SRC_MODE 1 only; one group of RANK projected vectors over all NK positions:
    bidirectional) computed here, the projection's backward at the block's rows (dproj stored) in BLOCK_R rank
    columns at a time. The keys' gradients are finished and stored before the values' LN_L backward."""
    pid_n, off_h, off_b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n, mask_n = _tile(start_n, BLOCK_N, NK)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    qk_scale, eps, zero, scale = _load_scalars(SCALARS)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    pad_base = PAD + off_b * stride_padb
    key_ok = _real_rows(pad_base, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]
    k = _load_rows(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d)  # [BLOCK_N, BLOCK_D]
    v = _load_rows(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d)
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
    row = (off_b * H + off_h) * NK + offs_n.to(tl.int64)  # [BLOCK_N]
    out = row[:, None] * HEAD_DIM + offs_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    ln_plane = tl.num_programs(2).to(tl.int64) * H * NK  # LN_STATS' planes are B * H * NK apart
    if HAS_LN:  # the forward's statistics: no reductions here
        k_mean, k_rstd, v_mean, v_rstd = _load_ln_stats(LN_STATS, row, mask_n, ln_plane)
        k = _affine_rows(k + zero, k_mean, k_rstd, ln_w, ln_b).to(Q.dtype.element_ty)
        v = _affine_rows(v + zero, v_mean, v_rstd, ln_w, ln_b).to(Q.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero

    if HAS_LOCAL:
        # the query rows [q_lo, q_hi) whose windows hold each key: positions of the key frame less Q_OFF
        q_lo, q_hi = _query_bounds(offs_n, NK, WINDOW, HALF, CAUSAL)  # [BLOCK_N]
        q_lo, q_hi = tl.maximum(q_lo - Q_OFF, 0), q_hi - Q_OFF
        last_n = tl.minimum(start_n + BLOCK_N, NK) - 1
        first_lo, first_hi = _query_bounds(start_n, NK, WINDOW, HALF, CAUSAL)
        last_lo, last_hi = _query_bounds(last_n, NK, WINDOW, HALF, CAUSAL)
        m0, m1, m2, m3 = _tile_split(tl.maximum(first_lo - Q_OFF, 0), last_hi - Q_OFF, tl.maximum(last_lo - Q_OFF, 0),
                                     first_hi - Q_OFF, BLOCK_M)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base, delta_base = LSE + (off_b * H + off_h) * N, DELTA + (off_b * H + off_h) * N
        if k.dtype.is_fp16() or k.dtype.is_bf16():  # tensor-core tiles: edge, interior (unmasked), edge runs
            for part in tl.static_range(3):
                if part == 0:
                    m_start, m_stop = m0, m1
                elif part == 1:
                    m_start, m_stop = m1, m2
                else:
                    m_start, m_stop = m2, m3
                dk, dv = _key_block_grads(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base,
                                          delta_base, pad_base + Q_OFF, qk_scale, q_lo, q_hi, m_start, m_stop, offs_d,
                                          mask_d, N, DO, DO, 0, HAS_PAD, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION,
                                          BLOCK_M, part != 1, False, False)
        else:  # IEEE fp32 dots hold their operands in registers (fp64: products): one masked loop, small code
            dk, dv = _key_block_grads(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, lse_base, delta_base,
                                      pad_base + Q_OFF, qk_scale, q_lo, q_hi, m0, m3, offs_d, mask_d, N, DO, DO, 0,
                                      HAS_PAD, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION, BLOCK_M, True, False, False)
        if HAS_LN:  # after the loop: stored before it, the fp32 kernels spill
            tl.store(KN + out, k, mask=mask_nd)
            tl.store(VN + out, v, mask=mask_nd)
        dk = tl.where(key_ok[:, None], dk * scale, 0.0)  # padded keys and rows past NK have no gradient
        dv = tl.where(key_ok[:, None], dv, 0.0)

    src_nd = mask_nd & (offs_n < SRC_LEN)[:, None]  # the rows the projection read (DK_SRC, DV_SRC)
    if SRC_MODE == 1:  # gradients of LN_L(k), LN_L(v) (as above) through the projection
        dk, dv = _add_projection_grads(dk, dv, k, v, key_ok, mask_n, src_nd, offs_n, row, out, PROJ, off_b, off_h,
                                       stride_pb, stride_ph, stride_pn, COL_LSE, DK_HI, DK_LO, DV_HI, DV_LO, COL_DOT,
                                       DPROJ, DK_SRC, DV_SRC, offs_d, mask_d, zero, H, RANK, SRC_LEN, PROJ_BWD,
                                       IS_FP64, PROJ_PRECISION, SPLIT, BLOCK_R, HEAD_DIM)
    if HAS_LN:  # the statistics, the weight and x_hat reloaded rather than held in registers through the loops
        k_mean, k_rstd, v_mean, v_rstd = _load_ln_stats(LN_STATS, row, mask_n, ln_plane)
        ln_w, _ = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        part = ((off_b * H + off_h) * tl.num_programs(0) + pid_n) * HEAD_DIM + offs_d
        dk, dlnw, dlnb = _ln_rows_bwd(dk, k_base, offs_n, stride_kn, key_ok, offs_d, mask_d, k_mean, k_rstd, ln_w,
                                      HEAD_DIM)
    if SRC_MODE == 2:
        dk += tl.load(DK_SRC + out, mask=src_nd, other=0.0)
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_nd)  # final: its registers free for the values'
    if HAS_LN:
        dv, dlnw_v, dlnb_v = _ln_rows_bwd(dv, v_base, offs_n, stride_vn, key_ok, offs_d, mask_d, v_mean, v_rstd,
                                          ln_w, HEAD_DIM)
        tl.store(DLNW_PART + part, dlnw + dlnw_v, mask=mask_d)
        tl.store(DLNB_PART + part, dlnb + dlnb_v, mask=mask_d)
    if SRC_MODE == 2:
        dv += tl.load(DV_SRC + out, mask=src_nd, other=0.0)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _ls_bwd_dkv_global_kernel(
    Q,  # [B, H, N, HEAD_DIM], unit last stride
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, q's dtype
    GVIS,  # [B, NG] int8
    PAD,  # [B, NK] int8, nonzero = padding (query row i at position i + Q_OFF)
    SCALARS,  # [4]: _load_scalars
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous: DELTA written here with DELTA_HERE, else read
    O, O_RES,  # [B, H, N, HEAD_DIM] contiguous: the forward's output and its rounding residual (DELTA_HERE)
    DKG_PART, DVG_PART,  # [n_split, B, H, NG, HEAD_DIM]: per-split gradient partials
    stride_qb, stride_qh, stride_qn,
    stride_dob, stride_doh, stride_don,
    stride_padb,
    H, N, Q_OFF, C_OFF, NG, CHUNK, RANK, SPLIT_LEN,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, DELTA_HERE: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial dKg, dVg of a block of projected vectors over one split of the queries (SPLIT_LEN of them,
    from the first query that sees the block when causal). The splits are summed afterwards in a fixed order
    (deterministic, no atomics). DELTA_HERE (one block of vectors, every query visited by one program): each
    query's delta = rowsum(dO * O) is computed here from O (plus O_RES with HAS_RES) and stored."""
    pid_g, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b, off_h = _batch_head(pid_bh, H)
    start_g = pid_g * BLOCK_G
    offs_g, mask_g = _tile(start_g, BLOCK_G, NG)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    mask_gd = mask_g[:, None] & mask_d[None, :]
    qk_scale, _, zero, scale = _load_scalars(SCALARS)
    rows = (pid_bh.to(tl.int64) * NG + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
    g_ok = mask_g
    if HAS_PAD:  # zeros where invisible to every query (a sequence or chunk of padding only)
        g_ok = g_ok & (tl.load(GVIS + off_b * NG + offs_g, mask=mask_g, other=0) != 0)
    kg = tl.load(KG + rows, mask=g_ok[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    vg = tl.load(VG + rows, mask=g_ok[:, None] & mask_d[None, :], other=0.0)
    dkg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    dvg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    if CAUSAL:  # query row i sees vector g when g < ((i + C_OFF) // CHUNK) * RANK: from the end of g's chunk on
        q_first = tl.maximum((offs_g // RANK + 1) * CHUNK - C_OFF, 0)  # [BLOCK_G]
        first_seen = tl.maximum((start_g // RANK + 1) * CHUNK - C_OFF, 0)
        all_seen = tl.maximum(((tl.minimum(start_g + BLOCK_G, NG) - 1) // RANK + 1) * CHUNK - C_OFF, 0)
    else:
        q_first = tl.zeros([BLOCK_G], tl.int32)
        first_seen = 0
        all_seen = 0
    lo = first_seen + pid_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    m0, m1, m2, m3 = _tile_split(lo, hi, tl.maximum(all_seen, lo), hi, BLOCK_M)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base, delta_base = LSE + pid_bh.to(tl.int64) * N, DELTA + pid_bh.to(tl.int64) * N
    q_end = tl.zeros([BLOCK_G], tl.int32) + hi
    q_pad_base = PAD + off_b * stride_padb + Q_OFF  # query row i's padding flag
    o_base, res_base = O + pid_bh.to(tl.int64) * N * HEAD_DIM, O_RES + pid_bh.to(tl.int64) * N * HEAD_DIM
    if kg.dtype.is_fp16() or kg.dtype.is_bf16():  # tensor-core tiles: edge, interior (unmasked), edge runs
        for part in tl.static_range(3):
            if part == 0:
                m_start, m_stop = m0, m1
            elif part == 1:
                m_start, m_stop = m1, m2
            else:
                m_start, m_stop = m2, m3
            dkg, dvg = _key_block_grads(dkg, dvg, kg, vg, q_base, do_base, stride_qn, stride_don, lse_base,
                                        delta_base, q_pad_base, qk_scale, q_first, q_end, m_start, m_stop, offs_d,
                                        mask_d, N, o_base, res_base, HEAD_DIM, HAS_PAD, HEAD_DIM == BLOCK_D, IS_FP64,
                                        PRECISION, BLOCK_M, part != 1, DELTA_HERE, HAS_RES)
    else:  # IEEE fp32 dots hold their operands in registers (fp64: products): one masked loop, small code
        dkg, dvg = _key_block_grads(dkg, dvg, kg, vg, q_base, do_base, stride_qn, stride_don, lse_base, delta_base,
                                    q_pad_base, qk_scale, q_first, q_end, m0, m3, offs_d, mask_d, N, o_base, res_base,
                                    HEAD_DIM, HAS_PAD, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION, BLOCK_M, True,
                                    DELTA_HERE, HAS_RES)
    dkg = tl.where(g_ok[:, None], dkg * scale, 0.0)  # invisible vectors have no gradient
    dvg = tl.where(g_ok[:, None], dvg, 0.0)
    part_rows = (pid_s.to(tl.int64) * tl.num_programs(2) + pid_bh) * NG * HEAD_DIM \
        + offs_g[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DKG_PART + part_rows, dkg, mask=mask_gd)
    tl.store(DVG_PART + part_rows, dvg, mask=mask_gd)


@triton.jit
def _ls_bwd_dkv_global_combine_kernel(
    DKG_PART, DVG_PART,  # [n_split, B, H, NG, HEAD_DIM]: _ls_bwd_dkv_global_kernel's partials
    KRAW, VRAW,  # [B, H, NG, HEAD_DIM] contiguous, accumulation dtype: the projected vectors before LN_G
    LNW,  # [H or 1, HEAD_DIM]: LN_G weight
    SCALARS,  # [4]: _load_scalars
    DK_RAW, DV_RAW,  # [B, H, NG, HEAD_DIM] contiguous: gradients before LN_G (of kg, vg themselves without it)
    DK_HI, DK_LO, DV_HI, DV_LO,  # [B, H, NG, HEAD_DIM] contiguous, the inputs' dtype: the same, split (SPLIT)
    COL_DOT,  # [B, H, NG]: Kraw . dKraw + Vraw . dVraw per vector (HAS_COL_DOT)
    DLNW_PART, DLNB_PART,  # [B, H, n_g_blocks, HEAD_DIM]: LN_G weight and bias gradients per block of vectors
    N_SPLIT, NG, stride_lnh, H,
    HEAD_DIM: tl.constexpr, HAS_LN: tl.constexpr, HAS_COL_DOT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The splits' partial dKg, dVg of a block of projected vectors summed in a fixed order, then the LN_G
    backward, the per-vector dot the projection backward needs, and per-block LN_G parameter gradients. The
    gradients are stored in DK_RAW, DV_RAW or, with SPLIT (fp16/bf16 inputs, the projection backward follows),
    only as a high part rounded to the inputs' dtype and the rounded rest, as its dots read them
    (_proj_rows_bwd)."""
    pid_g, pid_bh = tl.program_id(0), tl.program_id(1)
    offs_g, mask_g = _tile(pid_g * BLOCK_G, BLOCK_G, NG)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    mask_gd = mask_g[:, None] & mask_d[None, :]
    _, eps, zero, _ = _load_scalars(SCALARS)
    rows = (pid_bh.to(tl.int64) * NG + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_G, BLOCK_D]
    split_stride = tl.num_programs(1).to(tl.int64) * NG * HEAD_DIM
    dkg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    dvg = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + zero
    for s in range(0, N_SPLIT):  # fixed order: deterministic
        dkg += tl.load(DKG_PART + s * split_stride + rows, mask=mask_gd, other=0.0)
        dvg += tl.load(DVG_PART + s * split_stride + rows, mask=mask_gd, other=0.0)
    if HAS_LN:
        k_raw = tl.load(KRAW + rows, mask=mask_gd, other=0.0)
        v_raw = tl.load(VRAW + rows, mask=mask_gd, other=0.0)
        ln_w, _ = _load_ln(LNW, LNW, (pid_bh % H).to(tl.int64), stride_lnh, offs_d, mask_d, zero, True)
        k_hat, k_rstd = _normalize_rows(k_raw, mask_d, eps, HEAD_DIM)
        v_hat, v_rstd = _normalize_rows(v_raw, mask_d, eps, HEAD_DIM)
        part = (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_g) * HEAD_DIM + offs_d
        tl.store(DLNW_PART + part, tl.sum(dkg * k_hat + dvg * v_hat, axis=0), mask=mask_d)
        tl.store(DLNB_PART + part, tl.sum(dkg + dvg, axis=0), mask=mask_d)
        dkg = _layer_norm_rows_bwd(dkg * ln_w[None, :], k_hat, k_rstd, HEAD_DIM)
        dvg = _layer_norm_rows_bwd(dvg * ln_w[None, :], v_hat, v_rstd, HEAD_DIM)
    if SPLIT:
        dk_hi = dkg.to(DK_HI.dtype.element_ty)
        dv_hi = dvg.to(DV_HI.dtype.element_ty)
        tl.store(DK_HI + rows, dk_hi, mask=mask_gd)
        tl.store(DV_HI + rows, dv_hi, mask=mask_gd)
        tl.store(DK_LO + rows, (dkg - dk_hi.to(tl.float32)).to(DK_LO.dtype.element_ty), mask=mask_gd)
        tl.store(DV_LO + rows, (dvg - dv_hi.to(tl.float32)).to(DV_LO.dtype.element_ty), mask=mask_gd)
    else:
        tl.store(DK_RAW + rows, dkg, mask=mask_gd)
        tl.store(DV_RAW + rows, dvg, mask=mask_gd)
    if HAS_COL_DOT:
        if not HAS_LN:
            k_raw = tl.load(KRAW + rows, mask=mask_gd, other=0.0)
            v_raw = tl.load(VRAW + rows, mask=mask_gd, other=0.0)
        tl.store(COL_DOT + pid_bh.to(tl.int64) * NG + offs_g, tl.sum(k_raw * dkg + v_raw * dvg, axis=1), mask=mask_g)
