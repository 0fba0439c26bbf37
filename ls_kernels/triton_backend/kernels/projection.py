"""Triton kernels of the projection pre-pass of long-short attention and of its backward.

Turns the projection logits ``proj`` (B, H, N, r) into the projected keys and
values: P = softmax of ``proj`` over positions (the whole sequence when
bidirectional, each chunk of ``chunk`` positions when causal), then
Kg = LN_G(P^T k_P), Vg = LN_G(P^T v_P).

Two kernels. ``_proj_partial_kernel`` cuts the positions into segments (many per
sequence when bidirectional, so a long sequence fills the GPU; one per chunk when
causal) and keeps, per segment and rank column, an online softmax: the column max,
the normaliser and the unnormalised products with k_P and v_P (k_P = LN_L(k) is read
as the LN_L pre-pass wrote it). ``_proj_combine_kernel``
merges the segments of each group (the whole sequence, or one chunk) in a fixed
order, normalises, and applies LN_G. Everything runs in fp32 (dots as 3xTF32 on tensor cores: fp32's
accuracy) (fp64 for fp64); Kg and Vg are stored
in q's dtype, as the attention kernels read them.
"""
import triton
import triton.language as tl

from .common import (_affine_rows, _batch_head, _dot, _layer_norm_rows, _load_ln, _load_normed_rows,
                     _load_rows, _load_scalars, _real_rows, _row_stats, _tile)

# what _proj_partial_kernel does with LN_L: nothing (K, V are what the projection reads); or K, V are raw, and it
# writes LN_L(k), LN_L(v) and their row statistics (the forward's LN_L pre-pass, fused: k and v read once) and
# projects LN_L(k), LN_L(v) (project_after_ln) or the raw rows
LN_SRC_NONE, LN_SRC_PROJECT_NORMED, LN_SRC_PROJECT_RAW = 0, 1, 2  # the kernel tests LN_SRC != 0, == 1


@triton.jit
def _store_group(m_col, z_col, acc_k, acc_v, out_row, offs_d, mask_d, mask_r, LNW, LNB, off_h, stride_lnh, eps, zero,
                 KG, VG, KRAW, VRAW, COL_LSE, HAS_LN: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A group's projected vectors from its online-softmax state (column max m_col, normaliser z_col [BLOCK_R],
    unnormalised products acc_k, acc_v [BLOCK_R, BLOCK_D]): P^T k_P, P^T v_P and each column's logsumexp
    stored at rows out_row of (B, H, NG), then LN_G of them as the attention reads them."""
    mask_rd = mask_r[:, None] & mask_d[None, :]
    seen = z_col > 0  # a group whose positions are all padded projects nothing
    inv_z = tl.where(seen, 1.0 / tl.where(seen, z_col, 1.0), 0.0)
    k_raw = acc_k * inv_z[:, None]  # [BLOCK_R, BLOCK_D]
    v_raw = acc_v * inv_z[:, None]
    out = out_row[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(KRAW + out, k_raw, mask=mask_rd)
    tl.store(VRAW + out, v_raw, mask=mask_rd)
    tl.store(COL_LSE + out_row, tl.where(seen, m_col + tl.log(tl.where(seen, z_col, 1.0)), float("inf")),
             mask=mask_r)
    if HAS_LN:
        ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        k_raw = _layer_norm_rows(k_raw, ln_w, ln_b, mask_d, eps, HEAD_DIM)
        v_raw = _layer_norm_rows(v_raw, ln_w, ln_b, mask_d, eps, HEAD_DIM)
    tl.store(KG + out, k_raw.to(KG.dtype.element_ty), mask=mask_rd)
    tl.store(VG + out, v_raw.to(VG.dtype.element_ty), mask=mask_rd)


@triton.jit
def _dot_split(x, hi, lo_ptrs, mask, zero, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """x [M, D] (the inputs' dtype) @ g^T for g [R, D] given as its high part hi and, with SPLIT, its rounded
    rest at lo_ptrs (two tensor-core dots: fp32's accuracy); else hi is g in the accumulation dtype."""
    if SPLIT:
        return tl.dot(x, tl.trans(hi)) + tl.dot(x, tl.trans(tl.load(lo_ptrs, mask=mask, other=0.0)))
    else:
        return _dot(x + zero, tl.trans(hi), IS_FP64, PRECISION)


@triton.jit
def _proj_rows_bwd(dk_src, dv_src, k, v, valid, mask_n, p_rows, g_base, COL_LSE, DK_HI, DK_LO, DV_HI, DV_LO, COL_DOT,
                   DP, dp_row, offs_d, mask_d, zero, RANK, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Backward of the projection at BLOCK_N positions of one group, whose rows k_P, v_P [BLOCK_N, BLOCK_D] (in
    the inputs' dtype) it read; valid [BLOCK_N]: not padding, mask_n: inside the sequence.

    p_rows [BLOCK_N, 1]: pointers to the positions' logits; g_base: the group's first row of (B, H, NG) in
    COL_LSE [B, H, NG], COL_DOT [B, H, NG] (c_i = Kraw_i . dKraw_i + Vraw_i . dVraw_i, the column sums of
    P * dP) and the gradients of P^T k_P, P^T v_P, [B, H, NG, HEAD_DIM] contiguous: with SPLIT (fp16/bf16
    inputs) as a high part DK_HI (dKraw rounded to the inputs' dtype) and the rounded rest DK_LO, so that the
    dots with k_P keep fp32's accuracy (with one position per column, dprob and c_i cancel exactly); else
    DK_HI is dKraw in the accumulation dtype (DK_LO unread). DP [B, H, N, RANK] contiguous at rows dp_row
    [BLOCK_N]. Stores dproj[n, i] = P[n, i] * (k_P[n] . dKraw_i + v_P[n] . dVraw_i - c_i) and adds
    dk_P[n] = sum_i P[n, i] dKraw_i and dv_P to dk_src, dv_src [BLOCK_N, BLOCK_D] (accumulation dtype),
    returned."""
    for start_r in range(0, RANK, BLOCK_R):
        offs_r, mask_r = _tile(start_r, BLOCK_R, RANK)
        logits = tl.load(p_rows + offs_r[None, :], mask=valid[:, None] & mask_r[None, :], other=0.0) + zero
        col_lse = tl.load(COL_LSE + g_base + offs_r, mask=mask_r, other=float("inf"))  # [BLOCK_R]
        prob = tl.where(valid[:, None] & mask_r[None, :], tl.exp(logits - col_lse[None, :]), 0.0)  # [BLOCK_N, BLOCK_R]
        prob_in = prob.to(k.dtype)  # the dots with dk_P, dv_P in the inputs' dtype
        grid_rd = (g_base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
        mask_rd = mask_r[:, None] & mask_d[None, :]
        dk_hi = tl.load(DK_HI + grid_rd, mask=mask_rd, other=0.0)  # [BLOCK_R, BLOCK_D]
        dv_hi = tl.load(DV_HI + grid_rd, mask=mask_rd, other=0.0)
        dprob = _dot_split(k, dk_hi, DK_LO + grid_rd, mask_rd, zero, IS_FP64, PRECISION, SPLIT) \
            + _dot_split(v, dv_hi, DV_LO + grid_rd, mask_rd, zero, IS_FP64, PRECISION, SPLIT)  # [BLOCK_N, BLOCK_R]
        dk_src += _dot(prob_in, dk_hi.to(k.dtype), IS_FP64, PRECISION)
        dv_src += _dot(prob_in, dv_hi.to(k.dtype), IS_FP64, PRECISION)
        col_dot = tl.load(COL_DOT + g_base + offs_r, mask=mask_r, other=0.0)  # [BLOCK_R]
        dlogits = prob * (dprob - col_dot[None, :])  # [BLOCK_N, BLOCK_R]
        tl.store(DP + dp_row.to(tl.int64)[:, None] * RANK + offs_r[None, :], dlogits.to(DP.dtype.element_ty),
                 mask=mask_n[:, None] & mask_r[None, :])
    return dk_src, dv_src


@triton.jit
def _proj_partial_kernel(
    P,  # [B, H, N, RANK] logits, unit last stride
    K, V,  # [B, H, N, HEAD_DIM], unit last stride: what the projection reads (k, v or LN_L(k), LN_L(v)); raw
    # k, v with LN_SRC
    PAD,  # [B, N] int8, nonzero = padding
    SCALARS,  # [4]: _load_scalars
    PART_M, PART_Z,  # [B, H, n_seg, RANK]: per-segment column max and normaliser (not FINAL)
    PART_K, PART_V,  # [B, H, n_seg, RANK, HEAD_DIM]: per-segment unnormalised P^T k_P, P^T v_P (not FINAL)
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_G weight and bias (FINAL)
    KG, VG, KRAW, VRAW, COL_LSE,  # as _proj_combine_kernel's (FINAL)
    LNLW, LNLB,  # [H or 1, HEAD_DIM]: LN_L weight and bias (LN_SRC)
    KN, VN,  # [B, H, N, HEAD_DIM] contiguous, q's dtype: LN_L(k), LN_L(v) written (LN_SRC), as _ln_local_kernel
    LN_STATS,  # [4, B, H, N] contiguous, accumulation dtype: their row statistics (LN_SRC), as _ln_local_kernel
    stride_pb, stride_ph, stride_pn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,  # (B, H, N)
    stride_padb, stride_lnh, stride_lnlh,
    N, H, RANK, SEG_LEN,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, FINAL: tl.constexpr, LN_SRC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One segment's online softmax over its positions. FINAL: the segment is a whole group (a causal chunk,
    or a sequence of one segment), whose projected vectors are stored here (no combine). With LN_SRC the
    segment's rows are normalised here and LN_L(k), LN_L(v) and their statistics stored (by the programs of
    the first rank block), bit for bit as _ln_local_kernel stores them."""
    pid_s, pid_r, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_seg = tl.num_programs(0)
    off_b, off_h = _batch_head(pid_bh, H)
    offs_r, mask_r = _tile(pid_r * BLOCK_R, BLOCK_R, RANK)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    _, eps, zero, _ = _load_scalars(SCALARS)
    m_col = tl.full([BLOCK_R], float("-inf"), tl.float32) + zero  # [BLOCK_R]
    z_col = tl.zeros([BLOCK_R], tl.float32) + zero
    acc_k = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    acc_v = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    p_base = P + off_b * stride_pb + off_h * stride_ph
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    seg_lo = pid_s * SEG_LEN  # this program's positions: seg_lo .. seg_hi - 1
    if LN_SRC != 0:
        lnl_w, lnl_b = _load_ln(LNLW, LNLB, off_h, stride_lnlh, offs_d, mask_d, zero, True)
        plane = tl.num_programs(2).to(tl.int64) * N  # LN_STATS: [4, B, H, N]
        writes = pid_r == 0
    for start_n in range(seg_lo, tl.minimum(seg_lo + SEG_LEN, N), BLOCK_N):
        offs_n, mask_n = _tile(start_n, BLOCK_N, tl.minimum(seg_lo + SEG_LEN, N))
        rows = offs_n.to(tl.int64)[:, None]
        valid = _real_rows(PAD + off_b * stride_padb, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]: padding reads as absent
        logits = tl.load(p_base + rows * stride_pn + offs_r[None, :], mask=valid[:, None] & mask_r[None, :],
                         other=float("-inf")) + zero  # [BLOCK_N, BLOCK_R]
        k = _load_rows(k_base, offs_n, stride_kn, valid, offs_d, mask_d)  # [BLOCK_N, BLOCK_D]
        v = _load_rows(v_base, offs_n, stride_vn, valid, offs_d, mask_d)
        if LN_SRC != 0:  # the LN_L pre-pass of these rows
            row = pid_bh.to(tl.int64) * N + offs_n  # [BLOCK_N]
            out_ln = row[:, None] * HEAD_DIM + offs_d[None, :]
            k_mean, k_rstd = _row_stats(k + zero, mask_d, eps, HEAD_DIM)
            v_mean, v_rstd = _row_stats(v + zero, mask_d, eps, HEAD_DIM)
            kn = _affine_rows(k + zero, k_mean, k_rstd, lnl_w, lnl_b).to(KN.dtype.element_ty)
            vn = _affine_rows(v + zero, v_mean, v_rstd, lnl_w, lnl_b).to(VN.dtype.element_ty)
            if writes:
                mask_nd = mask_n[:, None] & mask_d[None, :]
                tl.store(KN + out_ln, kn, mask=mask_nd)
                tl.store(VN + out_ln, vn, mask=mask_nd)
                tl.store(LN_STATS + row, k_mean, mask=mask_n)
                tl.store(LN_STATS + plane + row, k_rstd, mask=mask_n)
                tl.store(LN_STATS + 2 * plane + row, v_mean, mask=mask_n)
                tl.store(LN_STATS + 3 * plane + row, v_rstd, mask=mask_n)
            if LN_SRC == 1:  # the projection reads LN_L(k), LN_L(v) as stored
                k = tl.where(valid[:, None], kn, 0.0)
                v = tl.where(valid[:, None], vn, 0.0)
        m_new = tl.maximum(m_col, tl.max(logits, axis=0))  # [BLOCK_R]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_col - m_safe)
        p = tl.exp(logits - m_safe[None, :])  # [BLOCK_N, BLOCK_R]
        z_col = z_col * alpha + tl.sum(p, axis=0)
        p_t = tl.trans(p)  # [BLOCK_R, BLOCK_N]
        p_t = p_t.to(K.dtype.element_ty)  # fp16/bf16 dots for fp16/bf16 inputs (fp32 accumulation)
        acc_k = acc_k * alpha[:, None] + _dot(p_t, k, IS_FP64, PRECISION)
        acc_v = acc_v * alpha[:, None] + _dot(p_t, v, IS_FP64, PRECISION)
        m_col = m_new
    row = (off_b * H + off_h) * n_seg + pid_s
    if FINAL:  # the group's vectors are rows row * RANK + offs_r of (B, H, NG)
        _store_group(m_col, z_col, acc_k, acc_v, row * RANK + offs_r.to(tl.int64), offs_d, mask_d, mask_r, LNW, LNB,
                     off_h, stride_lnh, eps, zero, KG, VG, KRAW, VRAW, COL_LSE, HAS_LN, HEAD_DIM)
    else:  # partials are contiguous (B, H, S, RANK) and (B, H, S, RANK, HEAD_DIM)
        tl.store(PART_M + row * RANK + offs_r, m_col, mask=mask_r)
        tl.store(PART_Z + row * RANK + offs_r, z_col, mask=mask_r)
        out = (row * RANK + offs_r.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(PART_K + out, acc_k, mask=mask_r[:, None] & mask_d[None, :])
        tl.store(PART_V + out, acc_v, mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _proj_combine_kernel(
    PART_M, PART_Z,  # [B, H, n_seg, RANK]
    PART_K, PART_V,  # [B, H, n_seg, RANK, HEAD_DIM]
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_G weight and bias
    SCALARS,  # [4]: _load_scalars
    KG, VG,  # [B, H, NG, HEAD_DIM], q's dtype: projected keys and values after LN_G, as the attention reads them
    KRAW, VRAW,  # [B, H, NG, HEAD_DIM], accumulation dtype: before LN_G
    COL_LSE,  # [B, H, NG]: each column's logsumexp over its positions
    H, RANK, SEGS_PER_GROUP, stride_lnh,
    HEAD_DIM: tl.constexpr, HAS_LN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g, pid_r, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_groups = tl.num_programs(0)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r, mask_r = _tile(pid_r * BLOCK_R, BLOCK_R, RANK)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    mask_rd = mask_r[:, None] & mask_d[None, :]
    _, eps, zero, _ = _load_scalars(SCALARS)
    m_col = tl.full([BLOCK_R], float("-inf"), tl.float32) + zero  # [BLOCK_R]
    z_col = tl.zeros([BLOCK_R], tl.float32) + zero
    acc_k = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    acc_v = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    first = pid_bh.to(tl.int64) * n_groups * SEGS_PER_GROUP + pid_g * SEGS_PER_GROUP
    for s in range(0, SEGS_PER_GROUP):  # fixed order: deterministic
        row = first + s
        m_s = tl.load(PART_M + row * RANK + offs_r, mask=mask_r, other=float("-inf"))
        z_s = tl.load(PART_Z + row * RANK + offs_r, mask=mask_r, other=0.0)
        part = (row * RANK + offs_r.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        k_s = tl.load(PART_K + part, mask=mask_rd, other=0.0)
        v_s = tl.load(PART_V + part, mask=mask_rd, other=0.0)
        m_new = tl.maximum(m_col, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, beta = tl.exp(m_col - m_safe), tl.exp(m_s - m_safe)
        z_col = z_col * alpha + z_s * beta
        acc_k = acc_k * alpha[:, None] + k_s * beta[:, None]
        acc_v = acc_v * alpha[:, None] + v_s * beta[:, None]
        m_col = m_new
    out_row = pid_bh.to(tl.int64) * n_groups * RANK + pid_g * RANK + offs_r  # row of (B, H, NG)
    _store_group(m_col, z_col, acc_k, acc_v, out_row, offs_d, mask_d, mask_r, LNW, LNB, off_h, stride_lnh, eps, zero,
                 KG, VG, KRAW, VRAW, COL_LSE, HAS_LN, HEAD_DIM)


@triton.jit
def _proj_bwd_kernel(
    P,  # [B, H, N, RANK] logits, unit last stride
    K, V,  # [B, H, N, HEAD_DIM], unit last stride
    PAD,  # [B, N] int8, nonzero = padding
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_L weight and bias
    SCALARS,  # [4]: _load_scalars
    COL_LSE,  # [B, H, NG]
    DK_HI, DK_LO, DV_HI, DV_LO,  # [B, H, NG, HEAD_DIM] contiguous: gradients of P^T k_P, P^T v_P (_proj_rows_bwd)
    COL_DOT,  # [B, H, NG]: Kraw . dKraw + Vraw . dVraw per column
    DP,  # [B, H, N, RANK] contiguous: gradient of the logits
    DK_SRC, DV_SRC,  # [B, H, N, HEAD_DIM] contiguous, k's dtype: gradients of k_P, v_P
    stride_pb, stride_ph, stride_pn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_padb, stride_lnh,
    N, H, RANK, SEG_LEN, NG, GROUP_IS_SEGMENT,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Backward of the projection for one segment of positions.

    With c_i = Kraw_i . dKraw_i + Vraw_i . dVraw_i (the column sums of P * dP):
    dproj[n, i] = P[n, i] * (k_P[n] . dKraw_i + v_P[n] . dVraw_i - c_i),
    dk_P[n] = sum_i P[n, i] dKraw_i, dv_P likewise (gradients of what the projection read).
    """
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = _batch_head(pid_bh, H)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    _, eps, zero, _ = _load_scalars(SCALARS)
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
    group = pid_s * GROUP_IS_SEGMENT  # causal: one chunk per segment; bidirectional: one group
    g_base = pid_bh.to(tl.int64) * NG + group * RANK  # first row of the group in (B, H, NG)
    p_base = P + off_b * stride_pb + off_h * stride_ph
    seg_lo = pid_s * SEG_LEN
    seg_hi = tl.minimum(seg_lo + SEG_LEN, N)
    for start_n in range(seg_lo, seg_hi, BLOCK_N):
        offs_n, mask_n = _tile(start_n, BLOCK_N, seg_hi)
        rows = offs_n.to(tl.int64)[:, None]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        valid = _real_rows(PAD + off_b * stride_padb, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]: zeros at padding
        k = _load_normed_rows(K + off_b * stride_kb + off_h * stride_kh, offs_n, stride_kn, valid, offs_d, mask_d,
                              zero, ln_w, ln_b, eps, HAS_LN, HEAD_DIM).to(K.dtype.element_ty)  # [BLOCK_N, BLOCK_D]
        v = _load_normed_rows(V + off_b * stride_vb + off_h * stride_vh, offs_n, stride_vn, valid, offs_d, mask_d,
                              zero, ln_w, ln_b, eps, HAS_LN, HEAD_DIM).to(K.dtype.element_ty)
        dk_src = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
        dv_src = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
        dk_src, dv_src = _proj_rows_bwd(dk_src, dv_src, k, v, valid, mask_n, p_base + rows * stride_pn, g_base,
                                        COL_LSE, DK_HI, DK_LO, DV_HI, DV_LO, COL_DOT, DP,
                                        pid_bh.to(tl.int64) * N + offs_n, offs_d, mask_d, zero, RANK, IS_FP64,
                                        PRECISION, SPLIT, BLOCK_R, HEAD_DIM)
        out = (pid_bh.to(tl.int64) * N + offs_n.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK_SRC + out, dk_src.to(DK_SRC.dtype.element_ty), mask=mask_nd)
        tl.store(DV_SRC + out, dv_src.to(DV_SRC.dtype.element_ty), mask=mask_nd)
