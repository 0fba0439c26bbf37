"""Triton projection pre-pass of long-short attention.

Turns the projection logits ``proj`` (B, H, N, r) into the projected keys and
values: P = softmax of ``proj`` over positions (the whole sequence when
bidirectional, each chunk of ``chunk`` positions when causal), then
Kg = LN_G(P^T k_P), Vg = LN_G(P^T v_P).

Two kernels. ``_proj_partial_kernel`` cuts the positions into segments (many per
sequence when bidirectional, so a long sequence fills the GPU; one per chunk when
causal) and keeps, per segment and rank column, an online softmax: the column max,
the normaliser and the unnormalised products with k_P and v_P. When k_P = LN_L(k)
the LayerNorm is applied in registers to each loaded tile. ``_proj_combine_kernel``
merges the segments of each group (the whole sequence, or one chunk) in a fixed
order, normalises, and applies LN_G. Everything runs in fp32 (fp64 for fp64).
"""
import torch
import triton
import triton.language as tl

from .kernel_utils import _dot, _layer_norm_rows, _load_ln, _load_rows, _real_rows, ln_params, next_pow2


@triton.jit
def _proj_partial_kernel(
    P, K, V, PAD, LNW, LNB, SCALARS,
    PART_M, PART_Z, PART_K, PART_V,
    stride_pb, stride_ph, stride_pn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_padb, stride_lnh,
    N, H, RANK, SEG_LEN,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s, pid_r, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_seg = tl.num_programs(0)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < RANK
    mask_d = offs_d < HEAD_DIM
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)  # 0 in the accumulation dtype
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)  # [BLOCK_D]
    m_col = tl.full([BLOCK_R], float("-inf"), tl.float32) + zero  # [BLOCK_R]
    z_col = tl.zeros([BLOCK_R], tl.float32) + zero
    acc_k = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    acc_v = tl.zeros([BLOCK_R, BLOCK_D], tl.float32) + zero
    p_base = P + off_b * stride_pb + off_h * stride_ph
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    seg_lo = pid_s * SEG_LEN
    seg_hi = tl.minimum(seg_lo + SEG_LEN, N)
    for start_n in range(seg_lo, seg_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seg_hi
        rows = offs_n.to(tl.int64)[:, None]
        valid = _real_rows(PAD + off_b * stride_padb, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]: padding reads as absent
        logits = tl.load(p_base + rows * stride_pn + offs_r[None, :], mask=valid[:, None] & mask_r[None, :],
                         other=float("-inf")) + zero  # [BLOCK_N, BLOCK_R]
        k = _load_rows(k_base, offs_n, stride_kn, valid, offs_d, mask_d) + zero  # [BLOCK_N, BLOCK_D]
        v = _load_rows(v_base, offs_n, stride_vn, valid, offs_d, mask_d) + zero
        if HAS_LN:
            k = _layer_norm_rows(k, ln_w, ln_b, mask_d, eps, HEAD_DIM)
            v = _layer_norm_rows(v, ln_w, ln_b, mask_d, eps, HEAD_DIM)
        m_new = tl.maximum(m_col, tl.max(logits, axis=0))  # [BLOCK_R]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_col - m_safe)
        p = tl.exp(logits - m_safe[None, :])  # [BLOCK_N, BLOCK_R]
        z_col = z_col * alpha + tl.sum(p, axis=0)
        p_t = tl.trans(p)  # [BLOCK_R, BLOCK_N]
        acc_k = acc_k * alpha[:, None] + _dot(p_t, k, IS_FP64, "ieee")
        acc_v = acc_v * alpha[:, None] + _dot(p_t, v, IS_FP64, "ieee")
        m_col = m_new
    # partials are contiguous (B, H, S, RANK) and (B, H, S, RANK, HEAD_DIM)
    row = (off_b * H + off_h) * n_seg + pid_s
    tl.store(PART_M + row * RANK + offs_r, m_col, mask=mask_r)
    tl.store(PART_Z + row * RANK + offs_r, z_col, mask=mask_r)
    out = (row * RANK + offs_r.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(PART_K + out, acc_k, mask=mask_r[:, None] & mask_d[None, :])
    tl.store(PART_V + out, acc_v, mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _proj_combine_kernel(
    PART_M, PART_Z, PART_K, PART_V, LNW, LNB, SCALARS,
    KG, VG, KRAW, VRAW, COL_LSE,
    H, RANK, SEGS_PER_GROUP, stride_lnh,
    HEAD_DIM: tl.constexpr, HAS_LN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g, pid_r, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_groups = tl.num_programs(0)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < RANK
    mask_d = offs_d < HEAD_DIM
    mask_rd = mask_r[:, None] & mask_d[None, :]
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)
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
    seen = z_col > 0  # a group whose positions are all padded projects nothing
    inv_z = tl.where(seen, 1.0 / tl.where(seen, z_col, 1.0), 0.0)
    k_raw = acc_k * inv_z[:, None]  # [BLOCK_R, BLOCK_D]
    v_raw = acc_v * inv_z[:, None]
    out_row = pid_bh.to(tl.int64) * n_groups * RANK + pid_g * RANK + offs_r  # row of (B, H, NG)
    out = out_row[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(KRAW + out, k_raw, mask=mask_rd)
    tl.store(VRAW + out, v_raw, mask=mask_rd)
    tl.store(COL_LSE + out_row, tl.where(seen, m_col + tl.log(tl.where(seen, z_col, 1.0)), float("inf")),
             mask=mask_r)
    if HAS_LN:
        ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        k_raw = _layer_norm_rows(k_raw, ln_w, ln_b, mask_d, eps, HEAD_DIM)
        v_raw = _layer_norm_rows(v_raw, ln_w, ln_b, mask_d, eps, HEAD_DIM)
    tl.store(KG + out, k_raw, mask=mask_rd)
    tl.store(VG + out, v_raw, mask=mask_rd)


@triton.jit
def _proj_bwd_kernel(
    P, K, V, PAD, LNW, LNB, SCALARS, COL_LSE, DK_RAW, DV_RAW, COL_DOT,
    DP, DK_SRC, DV_SRC,
    stride_pb, stride_ph, stride_pn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_padb, stride_lnh,
    N, H, RANK, SEG_LEN, NG, GROUP_IS_SEGMENT,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of the projection for one segment of positions.

    With c_i = Kraw_i . dKraw_i + Vraw_i . dVraw_i (the column sums of P * dP):
    dproj[n, i] = P[n, i] * (k_P[n] . dKraw_i + v_P[n] . dVraw_i - c_i),
    dk_P[n] = sum_i P[n, i] dKraw_i, dv_P likewise (gradients of what the projection read).
    """
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
    group = pid_s * GROUP_IS_SEGMENT  # causal: one chunk per segment; bidirectional: one group
    g_base = pid_bh.to(tl.int64) * NG + group * RANK  # first row of the group in (B, H, NG)
    p_base = P + off_b * stride_pb + off_h * stride_ph
    seg_lo = pid_s * SEG_LEN
    seg_hi = tl.minimum(seg_lo + SEG_LEN, N)
    for start_n in range(seg_lo, seg_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seg_hi
        rows = offs_n.to(tl.int64)[:, None]
        mask_nd = mask_n[:, None] & mask_d[None, :]
        valid = _real_rows(PAD + off_b * stride_padb, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]: zeros at padding
        k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, offs_n, stride_kn, valid, offs_d, mask_d) + zero
        v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, offs_n, stride_vn, valid, offs_d, mask_d) + zero
        if HAS_LN:
            k = _layer_norm_rows(k, ln_w, ln_b, mask_d, eps, HEAD_DIM)
            v = _layer_norm_rows(v, ln_w, ln_b, mask_d, eps, HEAD_DIM)
        dk_src = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
        dv_src = tl.zeros([BLOCK_N, BLOCK_D], tl.float32) + zero
        for start_r in range(0, RANK, BLOCK_R):
            offs_r = start_r + tl.arange(0, BLOCK_R)
            mask_r = offs_r < RANK
            logits = tl.load(p_base + rows * stride_pn + offs_r[None, :], mask=valid[:, None] & mask_r[None, :],
                             other=0.0) + zero  # [BLOCK_N, BLOCK_R]
            col_lse = tl.load(COL_LSE + g_base + offs_r, mask=mask_r, other=float("inf"))  # [BLOCK_R]
            prob = tl.where(valid[:, None] & mask_r[None, :], tl.exp(logits - col_lse[None, :]), 0.0)
            grid_rd = (g_base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
            mask_rd = mask_r[:, None] & mask_d[None, :]
            dk_raw = tl.load(DK_RAW + grid_rd, mask=mask_rd, other=0.0)  # [BLOCK_R, BLOCK_D]
            dv_raw = tl.load(DV_RAW + grid_rd, mask=mask_rd, other=0.0)
            col_dot = tl.load(COL_DOT + g_base + offs_r, mask=mask_r, other=0.0)  # [BLOCK_R]
            dprob = _dot(k, tl.trans(dk_raw), IS_FP64, "ieee") + _dot(v, tl.trans(dv_raw), IS_FP64, "ieee")
            dlogits = prob * (dprob - col_dot[None, :])  # [BLOCK_N, BLOCK_R]
            tl.store(DP + (pid_bh.to(tl.int64) * N + rows) * RANK + offs_r[None, :], dlogits.to(DP.dtype.element_ty),
                     mask=mask_n[:, None] & mask_r[None, :])
            dk_src += _dot(prob, dk_raw, IS_FP64, "ieee")
            dv_src += _dot(prob, dv_raw, IS_FP64, "ieee")
        out = (pid_bh.to(tl.int64) * N + offs_n.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK_SRC + out, dk_src, mask=mask_nd)
        tl.store(DV_SRC + out, dv_src, mask=mask_nd)


def proj_config(D, r, seg_len):
    """(BLOCK_N, BLOCK_R) of the pre-pass: IEEE fp32 dots, so small tiles (larger ones spill)."""
    cap = 32 if D <= 64 else 16
    BLOCK_R = max(16, min(cap, next_pow2(r)))
    BLOCK_N = max(16, min(cap, next_pow2(seg_len)))
    return BLOCK_N, BLOCK_R


def proj_bwd_config(D, r, seg_len):
    """(BLOCK_N, BLOCK_R, num_warps) of the projection backward (spill-free on sm_80 and sm_90a)."""
    BLOCK_N = 32 if seg_len >= 32 and D <= 64 else 16
    return BLOCK_N, 16, (4 if BLOCK_N == 32 else 8)


def projection_forward(proj, k, v, pad, ln_src, ln_global, causal, chunk, scalars):
    """Projected keys and values of validated inputs.

    proj (B, H, N, r); k, v (B, H, N, D) with stride(-1) == 1; pad (B, N) int8 or None;
    ln_src: LN_L when the projection reads LN_L(k), LN_L(v), else None; scalars: the
    accumulation-dtype tensor [qk_scale, eps, 0].
    Returns kg, vg, k_raw, v_raw (B, H, NG, D) and col_lse (B, H, NG), NG = r
    (bidirectional) or (N // chunk) * r (causal), chunk-major, in the accumulation dtype.
    """
    B, H, N, D = k.shape
    r = proj.shape[-1]
    acc = scalars.dtype
    device = k.device
    BLOCK_D = max(16, next_pow2(D))
    BLOCK_N, BLOCK_R = proj_config(D, r, chunk if causal else N)
    n_rblk = triton.cdiv(r, BLOCK_R)
    if causal:
        n_groups = N // chunk
        seg_len, segs_per_group = chunk, 1
        n_seg = n_groups
    else:
        # enough segments to fill a GPU; a few tiles each
        n_groups = 1
        n_seg = max(1, min(triton.cdiv(N, 64), 512 // max(1, B * H * n_rblk)))
        seg_len = triton.cdiv(triton.cdiv(N, n_seg), 16) * 16
        n_seg = triton.cdiv(N, seg_len)
        segs_per_group = n_seg
    NG = n_groups * r
    part_m = torch.empty(B, H, n_seg, r, dtype=acc, device=device)
    part_z = torch.empty_like(part_m)
    part_k = torch.empty(B, H, n_seg, r, D, dtype=acc, device=device)
    part_v = torch.empty_like(part_k)
    kg = torch.empty(B, H, NG, D, dtype=acc, device=device)
    vg, k_raw, v_raw = torch.empty_like(kg), torch.empty_like(kg), torch.empty_like(kg)
    col_lse = torch.empty(B, H, NG, dtype=acc, device=device)
    if NG == 0:
        return kg, vg, k_raw, v_raw, col_lse
    proj = proj if proj.stride(-1) == 1 else proj.contiguous()
    lnl_w, lnl_b, lnl_stride = ln_params(ln_src, H, D, acc, device)
    lng_w, lng_b, lng_stride = ln_params(ln_global, H, D, acc, device)
    pad_arg = pad if pad is not None else part_m
    is_fp64 = acc == torch.float64
    _proj_partial_kernel[(n_seg, n_rblk, B * H)](
        proj, k, v, pad_arg, lnl_w, lnl_b, scalars,
        part_m, part_z, part_k, part_v,
        proj.stride(0), proj.stride(1), proj.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pad.stride(0) if pad is not None else 0, lnl_stride,
        N, H, r, seg_len,
        HEAD_DIM=D, HAS_PAD=pad is not None, HAS_LN=ln_src is not None, IS_FP64=is_fp64,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4,
    )
    _proj_combine_kernel[(n_groups, n_rblk, B * H)](
        part_m, part_z, part_k, part_v, lng_w, lng_b, scalars,
        kg, vg, k_raw, v_raw, col_lse,
        H, r, segs_per_group, lng_stride,
        HEAD_DIM=D, HAS_LN=ln_global is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return kg, vg, k_raw, v_raw, col_lse


def projection_backward(proj, k, v, pad, ln_src, causal, chunk, scalars, col_lse, k_raw, v_raw, dk_raw, dv_raw):
    """Gradients of proj and of what the projection read (k_P, v_P), from dL/dKraw and dL/dVraw.

    dk_raw, dv_raw, k_raw, v_raw: (B, H, NG, D); col_lse: (B, H, NG). Returns dproj (B, H, N, r)
    in proj's dtype and dk_src, dv_src (B, H, N, D) in the accumulation dtype (zero past the
    last full chunk when causal).
    """
    B, H, N, D = k.shape
    r = proj.shape[-1]
    acc = scalars.dtype
    NG = k_raw.shape[2]
    proj = proj if proj.stride(-1) == 1 else proj.contiguous()
    dproj = torch.zeros(B, H, N, r, dtype=proj.dtype, device=proj.device)
    dk_src = torch.zeros(B, H, N, D, dtype=acc, device=k.device)
    dv_src = torch.zeros_like(dk_src)
    if NG == 0:
        return dproj, dk_src, dv_src
    col_dot = ((k_raw * dk_raw).sum(-1) + (v_raw * dv_raw).sum(-1)).contiguous()  # (B, H, NG)
    BLOCK_N, BLOCK_R, num_warps = proj_bwd_config(D, r, chunk if causal else N)
    if causal:
        seg_len, n_seg = chunk, N // chunk
    else:
        seg_len = triton.cdiv(N, max(1, min(triton.cdiv(N, 64), 512 // max(1, B * H))))
        seg_len = triton.cdiv(seg_len, 16) * 16
        n_seg = triton.cdiv(N, seg_len)
    lnl_w, lnl_b, lnl_stride = ln_params(ln_src, H, D, acc, k.device)
    _proj_bwd_kernel[(n_seg, B * H)](
        proj, k, v, pad if pad is not None else col_dot, lnl_w, lnl_b, scalars, col_lse,
        dk_raw.contiguous(), dv_raw.contiguous(), col_dot,
        dproj, dk_src, dv_src,
        proj.stride(0), proj.stride(1), proj.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pad.stride(0) if pad is not None else 0, lnl_stride,
        N, H, r, seg_len, NG, 1 if causal else 0,
        HEAD_DIM=D, HAS_PAD=pad is not None, HAS_LN=ln_src is not None, IS_FP64=acc == torch.float64,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_D=max(16, next_pow2(D)), num_warps=num_warps,
    )
    return dproj, dk_src, dv_src
