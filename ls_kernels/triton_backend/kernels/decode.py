"""The decode kernels: one new query per sequence and head against its cache, split over the cached keys for
parallelism (flash-decoding). Each program of _decode_split_kernel runs an online softmax over one span of the
sequence's key list [window ring | projected vectors] (the first span also takes the new token's own key) and
writes its partial result as (logsumexp, normalised output); _decode_combine_kernel merges a sequence's
partials in a fixed order (deterministic)."""
import triton
import triton.language as tl

from .common import _exp, _load_scalars, _tile


@triton.jit
def _decode_split_kernel(
    Q,  # [B, H, HEAD_DIM] (row strides given), unit last stride: the new queries
    KN, VN,  # [B, H, HEAD_DIM] contiguous, the cache's dtype: the new tokens' window keys and values (LN_L applied)
    WK, WV,  # [B, H, W1, HEAD_DIM] contiguous: the window ring (position p in slot p mod W1)
    KG, VG,  # [B, H, CAP, HEAD_DIM] contiguous: projected vectors of finished chunks, chunk-major
    LENGTHS,  # [B] int64: each new token's position (the sequence's length before it)
    REAL,  # [B] int8: 1 for a real new token, 0 for padding (its output is zero)
    SCALARS,  # [4]: _load_scalars
    O_PART,  # [B, H, N_SPLITS, HEAD_DIM] contiguous, accumulation dtype: each span's normalised output
    LSE_PART,  # [B, H, N_SPLITS] contiguous, accumulation dtype: each span's logsumexp (-inf: nothing seen)
    stride_qb, stride_qh,
    H, W1, CAP, CHUNK, RANK, SPLIT, N_SPLITS,
    HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    off_h, off_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    qk_scale, _eps, zero, _scale = _load_scalars(SCALARS)
    length = tl.load(LENGTHS + off_b)
    real = tl.load(REAL + off_b) != 0
    n_ring = tl.minimum(length, W1)  # ring slots holding a position (all of them once length >= W1)
    n_proj = (length // CHUNK) * RANK  # projected vectors of the chunks before the query's own
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    bh = off_b * H + off_h
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_d, mask=mask_d, other=0.0) + zero  # [BLOCK_D]

    m_i = zero + float("-inf")
    l_i = zero
    acc = tl.zeros([BLOCK_D], tl.float32) + zero  # [BLOCK_D]
    if HAS_WINDOW and pid_s == 0:  # the new token's own key (w >= 1)
        k = tl.load(KN + bh * HEAD_DIM + offs_d, mask=mask_d, other=0.0) + zero
        v = tl.load(VN + bh * HEAD_DIM + offs_d, mask=mask_d, other=0.0) + zero
        m_i = tl.sum(q * k, axis=0) * qk_scale
        l_i = zero + 1.0
        acc = v
    # the span [pid_s * SPLIT, (pid_s + 1) * SPLIT) of the key list: ring slots below W1, then projected vectors
    span_end = tl.minimum((pid_s + 1) * SPLIT, W1 + n_proj)
    for start in range(pid_s * SPLIT, span_end, BLOCK_N):
        offs, in_span = _tile(start, BLOCK_N, span_end)  # span_end <= W1 + n_proj
        in_ring = offs < n_ring
        in_proj = (offs >= W1) & in_span
        ring_ptr = bh * W1 * HEAD_DIM + offs.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        proj_ptr = bh * CAP * HEAD_DIM + (offs - W1).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        # each row from the ring or from the projected vectors (the other load masked off), in the acc dtype
        k = (tl.load(WK + ring_ptr, mask=in_ring[:, None] & mask_d[None, :], other=0.0) + zero) \
            + (tl.load(KG + proj_ptr, mask=in_proj[:, None] & mask_d[None, :], other=0.0) + zero)  # [BLOCK_N, BLOCK_D]
        v = (tl.load(WV + ring_ptr, mask=in_ring[:, None] & mask_d[None, :], other=0.0) + zero) \
            + (tl.load(VG + proj_ptr, mask=in_proj[:, None] & mask_d[None, :], other=0.0) + zero)
        s = tl.sum(q[None, :] * k, axis=1) * qk_scale  # [BLOCK_N]
        s = tl.where(in_ring | in_proj, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet
        alpha = _exp(m_i - m_safe, IS_FP64)
        p = _exp(s - m_safe, IS_FP64)  # [BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    seen = real & (l_i > 0)
    l_safe = tl.where(seen, l_i, 1.0)
    if IS_FP64:
        lse = m_i + tl.log(l_safe)
    else:
        lse = m_i + tl.log2(l_safe)
    tl.store(LSE_PART + bh * N_SPLITS + pid_s, tl.where(seen, lse, float("-inf")))
    tl.store(O_PART + (bh * N_SPLITS + pid_s) * HEAD_DIM + offs_d, tl.where(seen, acc / l_safe, 0.0), mask=mask_d)


@triton.jit
def _decode_combine_kernel(
    O_PART,  # [B, H, N_SPLITS, HEAD_DIM] contiguous, accumulation dtype
    LSE_PART,  # [B, H, N_SPLITS] contiguous, accumulation dtype
    O,  # [B, H, HEAD_DIM] contiguous: the output, in its dtype
    N_SPLITS,
    HEAD_DIM: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per sequence and head: sum over the spans of exp(lse - max) * output, over the sum of the
    weights, BLOCK_S spans at a time; zeros where no span saw a key."""
    bh = tl.program_id(0).to(tl.int64)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    m = tl.max(tl.load(LSE_PART + bh * N_SPLITS + tl.arange(0, BLOCK_S), mask=tl.arange(0, BLOCK_S) < N_SPLITS,
                       other=float("-inf")), axis=0)
    for start in range(BLOCK_S, N_SPLITS, BLOCK_S):
        offs_s, mask_s = _tile(start, BLOCK_S, N_SPLITS)
        m = tl.maximum(m, tl.max(tl.load(LSE_PART + bh * N_SPLITS + offs_s, mask=mask_s, other=float("-inf")), 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = m_safe * 0  # 0 in the accumulation dtype
    acc = tl.zeros([BLOCK_D], tl.float32) + den  # [BLOCK_D]
    for start in range(0, N_SPLITS, BLOCK_S):
        offs_s, mask_s = _tile(start, BLOCK_S, N_SPLITS)
        w = _exp(tl.load(LSE_PART + bh * N_SPLITS + offs_s, mask=mask_s, other=float("-inf")) - m_safe, IS_FP64)
        o = tl.load(O_PART + (bh * N_SPLITS + offs_s.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        den += tl.sum(w, axis=0)
        acc += tl.sum(w[:, None] * o, axis=0)
    out = tl.where(den > 0, acc / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(O + bh * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=mask_d)
