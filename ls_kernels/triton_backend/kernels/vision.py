"""Triton kernels of two-dimensional long-short attention (vision): a program's queries are one w x w patch of
the nx x ny grid (row-major tokens), padded to BLOCK_M; its window keys are the (w + 2s) x (w + 2s)
neighbourhood, swept in tiles of ROWS neighbourhood rows of SPAN_P slots (the span padded to a power of two);
the keys every query sees (projected vectors, then global keys) join the same online softmax. The
relative-position bias arrives expanded per patch query and neighbourhood slot (WB, in the kernels' exp units),
and its gradient leaves in the same layout, summed over a program's batches (no atomics)."""
import triton
import triton.language as tl

from .common import _dot, _exp, _load_scalars, _load_tile, _real_rows, _softmax_step
from .visibility import _projected_tiles


@triton.jit
def _patch_rows(p, part, PY, WINDOW, NX, NY, BLOCK: tl.constexpr):
    """Part `part` (BLOCK positions) of patch p of the grid (row-major over PY patch columns): (the patch's first
    row, first column, the local index m [BLOCK] of the part's positions in the patch (row m // w, column m % w),
    their tokens [BLOCK] and whether they exist (m < w * w, inside the grid))."""
    row0 = (p // PY) * WINDOW
    col0 = (p % PY) * WINDOW
    m = part * BLOCK + tl.arange(0, BLOCK)
    row = row0 + m // WINDOW
    col = col0 + m % WINDOW
    return row0, col0, m, row * NY + col, (m < WINDOW * WINDOW) & (row < NX) & (col < NY)


@triton.jit
def _seen_by_all(q, do, lse, delta, m_i, l_i, acc, qk_scale, KG, VG, GVIS, off_b, off_h, H, NG, offs_d, mask_d,
                 HAS_GVIS: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, IS_FP64: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, DQ: tl.constexpr):
    """The NG keys every query sees (KG, VG [B, H, NG, HEAD_DIM] contiguous) through visibility._projected_tiles:
    whole tiles unmasked (tensor-core dtypes), the rest masked."""
    g_base = (off_b * H + off_h) * NG * HEAD_DIM
    g_lim = tl.full([q.shape[0]], 0, tl.int32) + NG
    g_whole = (NG // BLOCK_G) * BLOCK_G
    if not (q.dtype.is_fp16() or q.dtype.is_bf16()):  # IEEE fp32 / fp64 dots: one masked loop, small code
        g_whole = 0
    m_i, l_i, acc = _projected_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, KG + g_base, VG + g_base,
                                     GVIS + off_b * NG, g_lim, 0, g_whole, offs_d, mask_d, HAS_GVIS, HEAD_DIM, EVEN_D,
                                     IS_FP64, PRECISION, BLOCK_G, DQ, MASKED=False)
    return _projected_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, KG + g_base, VG + g_base, GVIS + off_b * NG,
                            g_lim, g_whole, NG, offs_d, mask_d, HAS_GVIS, HEAD_DIM, EVEN_D, IS_FP64, PRECISION,
                            BLOCK_G, DQ, MASKED=True)


@triton.jit
def _neighbourhood(q, do, lse, delta, m_i, l_i, acc, qk_scale, k_base, v_base, stride_kn, stride_vn, pad_base,
                   wb_base, dwb_base, bias_rows, row0, col0, offs_d, mask_d, NX, NY, SPAN, HAS_PAD: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                   ROWS: tl.constexpr, SPAN_P: tl.constexpr, DQ: tl.constexpr):
    """The window keys of a patch, the SPAN x SPAN positions from (row0, col0) clipped to the grid, in tiles of
    ROWS rows of SPAN_P slots [ROWS * SPAN_P], through one online-softmax step each (forward: m_i, l_i, acc),
    or (DQ) dS K added to acc with the probabilities recomputed from lse and, with HAS_BIAS, dS added to the
    bias gradient at dwb_base. bias_rows [BLOCK_M, 1]: each query's row of slots (slot a * SPAN_P + b:
    neighbourhood row a, column b) from wb_base and dwb_base, as int32 offsets."""
    n = tl.arange(0, ROWS * SPAN_P)
    b = n % SPAN_P
    col = col0 + b
    col_ok = (b < SPAN) & (col >= 0) & (col < NY)  # [ROWS * SPAN_P]
    for t in range(0, SPAN, ROWS):
        a = t + n // SPAN_P
        row = row0 + a
        key_ok = _real_rows(pad_base, row * NY + col, col_ok & (a < SPAN) & (row >= 0) & (row < NX), HAS_PAD)
        k = _load_tile(k_base, row * NY + col, stride_kn, key_ok, offs_d, mask_d, True, EVEN_D)
        v = _load_tile(v_base, row * NY + col, stride_vn, key_ok, offs_d, mask_d, True, EVEN_D)
        s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, ROWS * SPAN_P]
        slots = bias_rows + (t * SPAN_P + n)[None, :]  # [BLOCK_M, ROWS * SPAN_P]
        if HAS_BIAS:
            s += tl.load(wb_base + slots)
        if DQ:
            p = tl.where(key_ok[None, :], _exp(s - lse[:, None], IS_FP64), 0.0)
            ds = p * (_dot(do, tl.trans(v), IS_FP64, PRECISION) - delta[:, None])
            acc += _dot(ds.to(q.dtype), k, IS_FP64, PRECISION)
            if HAS_BIAS:  # this program's own rows: a plain read-modify-write
                tl.store(dwb_base + slots, tl.load(dwb_base + slots) + ds)
        else:
            m_i, l_i, acc = _softmax_step(tl.where(key_ok[None, :], s, float("-inf")), v, m_i, l_i, acc, IS_FP64,
                                          PRECISION)
    return m_i, l_i, acc


@triton.jit
def _ls2d_fwd_kernel(
    Q,  # [B, H, N, HEAD_DIM], unit last stride, N = NX * NY row-major
    K, V,  # [B, H, N, HEAD_DIM], unit last stride, q's dtype: the window keys and values (normalised)
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, q's dtype: the keys and values every query sees
    GVIS,  # [B, NG] int8: whether each of them may be seen
    PAD,  # [B, N] int8, nonzero = padding
    WB,  # [H, M_ROWS, NBP] contiguous, accumulation dtype: window bias per patch position and slot, exp units
    SCALARS,  # [4]: _load_scalars
    O,  # [B, H, N, HEAD_DIM] contiguous, q's dtype
    O_RES,  # [B, H, N, HEAD_DIM] contiguous, q's dtype: out - round(out) (STORE_RES)
    LSE,  # [B, H, N] contiguous: row logsumexp in the kernels' exp units, +inf where nothing is seen
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_padb,
    H, N, NX, NY, PY, SPLIT, NG, WINDOW, HALF, SPAN, M_ROWS, NBP,
    HEAD_DIM: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, STORE_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, SPAN_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The outputs of one part of a patch (SPLIT parts of BLOCK_M positions): one online softmax over the NG
    keys every query sees and the patch's neighbourhood."""
    pid, off_h, off_b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    row0, col0, offs_m, tok, mask_m = _patch_rows(pid // SPLIT, pid % SPLIT, PY, WINDOW, NX, NY, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qk_scale, _, zero, _ = _load_scalars(SCALARS)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, tok, stride_qn, mask_m, offs_d, mask_d, True, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32) + zero
    l_i = tl.zeros([BLOCK_M], tl.float32) + zero
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero
    if HAS_GLOBAL:
        m_i, l_i, acc = _seen_by_all(q, q, m_i, m_i, m_i, l_i, acc, qk_scale, KG, VG, GVIS, off_b, off_h, H, NG,
                                     offs_d, mask_d, HAS_PAD, HEAD_DIM, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION,
                                     BLOCK_G, DQ=False)
    if HAS_LOCAL:
        wb_base = WB + off_h * M_ROWS * NBP
        m_i, l_i, acc = _neighbourhood(q, q, m_i, m_i, m_i, l_i, acc, qk_scale, K + off_b * stride_kb + off_h * stride_kh,
                                       V + off_b * stride_vb + off_h * stride_vh, stride_kn, stride_vn,
                                       PAD + off_b * stride_padb, wb_base, wb_base, offs_m[:, None] * NBP,
                                       row0 - HALF, col0 - HALF, offs_d,
                                       mask_d, NX, NY, SPAN, HAS_PAD, HAS_BIAS, HEAD_DIM == BLOCK_D, IS_FP64,
                                       PRECISION, ROWS, SPAN_P, DQ=False)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    if IS_FP64:
        lse = tl.where(seen, m_i + tl.log(l_safe), float("inf"))
    else:
        lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    if HAS_PAD:
        q_pad = tl.load(PAD + off_b * stride_padb + tok, mask=mask_m, other=1) != 0
        out = tl.where(q_pad[:, None], 0.0, out)
        lse = tl.where(q_pad, float("inf"), lse)
    rows = ((off_b * H + off_h) * N + tok.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(O + rows, out.to(O.dtype.element_ty), mask=mask_md)
    if STORE_RES:  # what rounding to O's dtype dropped: the backward's rowsum(dO * O) adds it back
        tl.store(O_RES + rows, (out - out.to(O.dtype.element_ty).to(out.dtype)).to(O_RES.dtype.element_ty),
                 mask=mask_md)
    tl.store(LSE + (off_b * H + off_h) * N + tok, lse, mask=mask_m)


@triton.jit
def _ls2d_bwd_dq_kernel(
    Q, K, V, KG, VG, GVIS, PAD, WB, SCALARS,  # as _ls2d_fwd_kernel's
    DO,  # [B, H, N, HEAD_DIM], unit last stride
    LSE, DELTA,  # [B, H, N] contiguous: the forward's logsumexp, rowsum(dO * O)
    DQ,  # [B, H, N, HEAD_DIM] contiguous, q's dtype
    DWB,  # [n_batch_groups, n_patches, H, M_ROWS, NBP] zeros, accumulation dtype: bias gradient partials
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_padb,
    B, H, N, NX, NY, PY, SPLIT, NG, WINDOW, HALF, SPAN, M_ROWS, NBP,
    HEAD_DIM: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, SPAN_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one part of a patch for the batches pid(2), pid(2) + n_batch_groups, ..., in that order, and
    (HAS_BIAS) the bias gradient those batches give its queries, summed in the same order into its rows of the
    group's partial."""
    pid, off_h, group = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    n_groups, n_patches = tl.num_programs(2), tl.num_programs(0) // SPLIT
    row0, col0, offs_m, tok, mask_m = _patch_rows(pid // SPLIT, pid % SPLIT, PY, WINDOW, NX, NY, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qk_scale, _, zero, scale = _load_scalars(SCALARS)
    wb_base = WB + off_h * M_ROWS * NBP
    dwb_base = DWB + ((group * n_patches + pid // SPLIT) * H + off_h) * M_ROWS * NBP
    for i in range(0, tl.cdiv(B - group, n_groups)):
        off_b = group.to(tl.int64) + i * n_groups
        q_ok = _real_rows(PAD + off_b * stride_padb, tok, mask_m, HAS_PAD)  # padded queries: q = dO = 0
        q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, tok, stride_qn, q_ok, offs_d, mask_d, True, False)
        do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, tok, stride_don, q_ok, offs_d, mask_d, True,
                        False)
        lse = tl.load(LSE + (off_b * H + off_h) * N + tok, mask=mask_m, other=float("inf"))  # [BLOCK_M]
        delta = tl.load(DELTA + (off_b * H + off_h) * N + tok, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero
        if HAS_GLOBAL:
            _m, _l, dq = _seen_by_all(q, do, lse, delta, lse, delta, dq, qk_scale, KG, VG, GVIS, off_b, off_h, H, NG,
                                    offs_d, mask_d, HAS_PAD, HEAD_DIM, HEAD_DIM == BLOCK_D, IS_FP64, PRECISION,
                                    BLOCK_G, DQ=True)
        if HAS_LOCAL:
            _m, _l, dq = _neighbourhood(q, do, lse, delta, lse, delta, dq, qk_scale,
                                      K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh,
                                      stride_kn, stride_vn, PAD + off_b * stride_padb, wb_base, dwb_base,
                                      offs_m[:, None] * NBP, row0 - HALF, col0 - HALF, offs_d, mask_d, NX, NY, SPAN, HAS_PAD, HAS_BIAS,
                                      HEAD_DIM == BLOCK_D, IS_FP64, PRECISION, ROWS, SPAN_P, DQ=True)
        rows = ((off_b * H + off_h) * N + tok.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DQ + rows, (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _ls2d_bwd_dkv_kernel(
    Q, K, V, PAD, WB, SCALARS, DO, LSE, DELTA,  # as _ls2d_bwd_dq_kernel's
    DK, DV,  # [B, H, N, HEAD_DIM] contiguous, k's dtype: gradients of the window keys and values
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_padb,
    H, N, NX, NY, PX, PY, SPLIT, WINDOW, HALF, SPAN, M_ROWS, NBP,
    HEAD_DIM: tl.constexpr, HAS_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, SPAN_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of the window keys of one part of a patch (SPLIT parts of BLOCK_M positions): summed over the
    parts of the 3 x 3 patches of queries around it (s <= w: no other patch's neighbourhood reaches it), each
    key masked by whether it lies in the query patch's neighbourhood."""
    pid, off_h, off_b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    pid_p = pid // SPLIT
    krow0, kcol0, offs_n, k_tok, mask_n = _patch_rows(pid_p, pid % SPLIT, PY, WINDOW, NX, NY, BLOCK_M)
    krow, kcol = krow0 + offs_n // WINDOW, kcol0 + offs_n % WINDOW
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    qk_scale, _, zero, scale = _load_scalars(SCALARS)
    key_ok = _real_rows(PAD + off_b * stride_padb, k_tok, mask_n, HAS_PAD)  # [BLOCK_M]
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, k_tok, stride_kn, key_ok, offs_d, mask_d, True, False)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, k_tok, stride_vn, key_ok, offs_d, mask_d, True, False)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero
    q_base, do_base = Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh
    stat_base = (off_b * H + off_h) * N
    for around in range(0, 9 * SPLIT):
        p_row, p_col = pid_p // PY + around // SPLIT // 3 - 1, pid_p % PY + around // SPLIT % 3 - 1
        if (p_row >= 0) & (p_row < PX) & (p_col >= 0) & (p_col < PY):
            row0, col0, offs_m, tok, mask_m = _patch_rows(p_row * PY + p_col, around % SPLIT, PY, WINDOW, NX, NY,
                                                          BLOCK_M)
            q_ok = _real_rows(PAD + off_b * stride_padb, tok, mask_m, HAS_PAD)
            q = _load_tile(q_base, tok, stride_qn, q_ok, offs_d, mask_d, True, False)
            do = _load_tile(do_base, tok, stride_don, q_ok, offs_d, mask_d, True, False)
            lse = tl.load(LSE + stat_base + tok, mask=mask_m, other=float("inf"))  # [BLOCK_M]
            delta = tl.load(DELTA + stat_base + tok, mask=mask_m, other=0.0)
            a, b = krow - (row0 - HALF), kcol - (col0 - HALF)  # each key's slot in this patch's neighbourhood
            seen = key_ok & (a >= 0) & (a < SPAN) & (b >= 0) & (b < SPAN)  # [BLOCK_M] keys
            s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M queries, BLOCK_M keys]
            if HAS_BIAS:
                s += tl.load(WB + off_h * M_ROWS * NBP + (offs_m[:, None] * NBP + (a * SPAN_P + b)[None, :]),
                             mask=seen[None, :], other=0.0)
            p = tl.where(seen[None, :], _exp(s - lse[:, None], IS_FP64), 0.0)
            dv += _dot(tl.trans(p.to(q.dtype)), do, IS_FP64, PRECISION)
            ds = p * (_dot(do, tl.trans(v), IS_FP64, PRECISION) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IS_FP64, PRECISION)
    rows = ((off_b * H + off_h) * N + k_tok.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
    mask_nd = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + rows, tl.where(key_ok[:, None], dk * scale, 0.0).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + rows, tl.where(key_ok[:, None], dv, 0.0).to(DV.dtype.element_ty), mask=mask_nd)
