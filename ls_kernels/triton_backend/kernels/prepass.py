"""The forward's LN_L pre-pass: LN_L(k) and LN_L(v) written once in q's dtype, so that the attention kernels
read the window keys and values as stored instead of normalising every tile they visit, and each row's mean
and rstd, so that the backward normalises without reductions. With a projection, the projection's partial
kernel does this for the rows it reads (k and v read once); this kernel then takes only the rows past the last
full causal chunk."""
import triton
import triton.language as tl

from .common import _affine_rows, _batch_head, _load_ln, _load_rows, _load_scalars, _real_rows, _row_stats, _tile


@triton.jit
def _ln_local_kernel(
    K, V,  # [B, H, N, HEAD_DIM], unit last stride
    PAD,  # [B, N] int8, nonzero = padding
    LNW, LNB,  # [H or 1, HEAD_DIM]: LN_L weight and bias
    SCALARS,  # [4]: _load_scalars
    KN, VN,  # [B, H, N, HEAD_DIM] contiguous, q's dtype: LN_L(k), LN_L(v) (LN_L of zeros at padded positions)
    LN_STATS,  # [4, B, H, N] contiguous, accumulation dtype: k's row means, k's rstd, v's means, v's rstd
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_padb, stride_lnh,
    H, N, ROW0,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """LN_L of BLOCK_N rows of k and of v (programs from row ROW0 on), in the accumulation dtype, rounded to KN's
    dtype once; what is stored at padded positions is finite whatever k, v hold there."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = _batch_head(pid_bh, H)
    offs_n, mask_n = _tile(ROW0 + pid_n * BLOCK_N, BLOCK_N, N)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    _, eps, zero, _ = _load_scalars(SCALARS)
    ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, True)
    rows_ok = _real_rows(PAD + off_b * stride_padb, offs_n, mask_n, HAS_PAD)  # [BLOCK_N]
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, offs_n, stride_kn, rows_ok, offs_d, mask_d)
    row = pid_bh.to(tl.int64) * N + offs_n  # [BLOCK_N]
    out = row[:, None] * HEAD_DIM + offs_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    plane = tl.num_programs(1).to(tl.int64) * N
    k_mean, k_rstd = _row_stats(k + zero, mask_d, eps, HEAD_DIM)
    tl.store(KN + out, _affine_rows(k + zero, k_mean, k_rstd, ln_w, ln_b).to(KN.dtype.element_ty), mask=mask_nd)
    tl.store(LN_STATS + row, k_mean, mask=mask_n)
    tl.store(LN_STATS + plane + row, k_rstd, mask=mask_n)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, offs_n, stride_vn, rows_ok, offs_d, mask_d)
    v_mean, v_rstd = _row_stats(v + zero, mask_d, eps, HEAD_DIM)
    tl.store(VN + out, _affine_rows(v + zero, v_mean, v_rstd, ln_w, ln_b).to(VN.dtype.element_ty), mask=mask_nd)
    tl.store(LN_STATS + 2 * plane + row, v_mean, mask=mask_n)
    tl.store(LN_STATS + 3 * plane + row, v_rstd, mask=mask_n)
