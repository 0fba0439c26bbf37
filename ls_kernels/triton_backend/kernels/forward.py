"""The forward kernel: for a block of queries, ONE online softmax over the projected vectors visible to the
block and its window keys (LN_L applied beforehand by the pre-pass). N queries, NK >= N keys (causal keys
beyond the queries, or a shard: query row i sits at key position i + Q_OFF, chunk position i + C_OFF).
Writes O and an fp32 logsumexp per query (+inf for queries that see nothing or are padded, so the backward
recomputes zero probabilities for them)."""
import triton
import triton.language as tl

from .common import _load_rows, _load_scalars, _query_block
from .visibility import _visit_keys


@triton.jit
def _ls_fwd_kernel(
    Q,  # [B, H, N, HEAD_DIM], unit last stride
    K, V,  # [B, H, NK, HEAD_DIM], unit last stride, q's dtype: the window keys and values (LN_L applied)
    KG, VG,  # [B, H, NG, HEAD_DIM] contiguous, q's dtype: projected keys and values
    GVIS,  # [B, NG] int8: the projected vector's sequence or chunk has a real token
    PAD,  # [B, NK] int8, nonzero = padding (query row i at position i + Q_OFF)
    SCALARS,  # [4]: _load_scalars
    O,  # [B, H, N, HEAD_DIM] output, q's dtype
    O_RES,  # [B, H, N, HEAD_DIM] contiguous, O's dtype: the output's rounding residual, out - round(out) (STORE_RES)
    LSE,  # [B, H, N] contiguous: row logsumexp in the scores' units
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_padb,
    H, N, NK, Q_OFF, C_OFF, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, STORE_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    off_b, off_h, start_m, offs_m, mask_m, offs_d, mask_d, last_m = _query_block(N, BLOCK_M, BLOCK_D, HEAD_DIM)
    qk_scale, _, zero, _ = _load_scalars(SCALARS)

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, mask_m, offs_d, mask_d)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32) + zero
    l_i = tl.zeros([BLOCK_M], tl.float32) + zero
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero  # [BLOCK_M, BLOCK_D]

    m_i, l_i, acc = _visit_keys(
        q, q, m_i, m_i, m_i, l_i, acc, qk_scale, K, V, KG, VG, GVIS, PAD, off_b, off_h, H, stride_kb, stride_kh,
        stride_kn, stride_vb, stride_vh, stride_vn, stride_padb, offs_m, start_m, last_m, offs_d, mask_d, NK, Q_OFF,
        C_OFF, NG,
        WINDOW, HALF, CHUNK, RANK, CAUSAL, HAS_LOCAL, HAS_GLOBAL, HAS_PAD, HEAD_DIM, HEAD_DIM == BLOCK_D, IS_FP64,
        PRECISION, BLOCK_N, BLOCK_G, DQ=False)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]  # one division per row, not per element
    if IS_FP64:  # the logsumexp in the scores' units
        log_l = tl.log(l_safe)
    else:
        log_l = tl.log2(l_safe)
    lse = tl.where(seen, m_i + log_l, float("inf"))
    if HAS_PAD:
        q_pad = tl.load(PAD + off_b * stride_padb + Q_OFF + offs_m, mask=mask_m, other=1) != 0
        out = tl.where(q_pad[:, None], 0.0, out)
        lse = tl.where(q_pad, float("inf"), lse)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if STORE_RES:  # what rounding to O's dtype dropped: the backward's rowsum(dO * O) adds it back
        res_ptrs = O_RES + ((off_b * H + off_h) * N + offs_m.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :]
        res = out - out.to(O.dtype.element_ty).to(out.dtype)
        tl.store(res_ptrs, res.to(O_RES.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + (off_b * H + off_h) * N + offs_m, lse, mask=mask_m)
