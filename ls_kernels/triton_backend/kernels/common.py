"""Triton helpers shared by every kernel: the scalar slots, dots, masked row loads, LayerNorm, exp/log in
the kernels' units, one online-softmax step."""
import triton
import triton.language as tl


@triton.jit
def _load_scalars(SCALARS):  # [4]: the layout of launch.make_scalars
    """(qk_scale, eps, zero, scale): the score scale times log2(e) (fp64: times 1), the LayerNorm epsilon, 0 in
    the accumulation dtype (adding it promotes a tensor to that dtype), and the plain score scale."""
    return tl.load(SCALARS), tl.load(SCALARS + 1), tl.load(SCALARS + 2), tl.load(SCALARS + 3)


@triton.jit
def _tile(start, BLOCK: tl.constexpr, limit):
    """(offs [BLOCK], mask [BLOCK]): the indices start .. start + BLOCK - 1 and which lie below limit."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < limit


@triton.jit
def _query_block(N, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A program over (query block, head, batch): off_b, off_h (int64), the block's first query start_m, its
    queries offs_m with mask_m (inside N), the head-dim columns offs_d with mask_d, and its last real query."""
    off_b, off_h = tl.program_id(2).to(tl.int64), tl.program_id(1).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m, mask_m = _tile(start_m, BLOCK_M, N)
    offs_d, mask_d = _tile(0, BLOCK_D, HEAD_DIM)
    return off_b, off_h, start_m, offs_m, mask_m, offs_d, mask_d, tl.minimum(start_m + BLOCK_M, N) - 1


@triton.jit
def _batch_head(pid_bh, H):
    """(off_b, off_h), int64, of a program over the B * H sequences."""
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _dot(a, b, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N]; GPUs have no fp64 tl.dot, so fp64 multiplies and sums."""
    if IS_FP64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _exp(x, IS_FP64: tl.constexpr):
    """exp in the kernels' units: base 2 for fp32 (scores carry log2(e)), natural for fp64."""
    if IS_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _real_rows(pad_base, offs, mask_rows, HAS_PAD: tl.constexpr):
    """[R]: rows offs inside mask_rows that are not padding (pad_base: one int8 per position, nonzero = padding).
    Loads masked with it read 0 at padded positions, so that what they hold never matters."""
    if HAS_PAD:
        return mask_rows & (tl.load(pad_base + offs, mask=mask_rows, other=1) == 0)
    else:
        return mask_rows


@triton.jit
def _load_tile(ptr, offs, stride, mask_rows, offs_d, mask_d, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows offs (row stride `stride`, unit column stride) as [R, BLOCK_D]: zeros outside mask_rows when
    MASK_ROWS, and beyond the head dim unless EVEN_D (HEAD_DIM == BLOCK_D); unmasked loads otherwise."""
    ptrs = ptr + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=mask_d[None, :], other=0.0)


@triton.jit
def _load_rows(ptr, offs, stride, mask_rows, offs_d, mask_d):
    """Rows offs (row stride `stride`, unit column stride) as [R, BLOCK_D], zeros outside the masks."""
    return _load_tile(ptr, offs, stride, mask_rows, offs_d, mask_d, True, False)


@triton.jit
def _load_normed_rows(base, offs, stride, valid, offs_d, mask_d, zero, ln_w, ln_b, eps, HAS_LN: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """Rows as _load_rows (zeros where not valid), in the accumulation dtype, LayerNorm applied if HAS_LN."""
    x = _load_rows(base, offs, stride, valid, offs_d, mask_d) + zero
    if HAS_LN:
        x = _layer_norm_rows(x, ln_w, ln_b, mask_d, eps, HEAD_DIM)
    return x


@triton.jit
def _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN: tl.constexpr):
    """LayerNorm weight and bias [BLOCK_D] of head off_h (stride_lnh = 0 when shared); zeros without LN."""
    if HAS_LN:
        weight = tl.load(LNW + off_h * stride_lnh + offs_d, mask=mask_d, other=0.0) + zero
        bias = tl.load(LNB + off_h * stride_lnh + offs_d, mask=mask_d, other=0.0) + zero
    else:
        weight = tl.zeros(offs_d.shape, tl.float32) + zero
        bias = weight
    return weight, bias


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _sum_pair(a, b, axis: tl.constexpr):
    """(sum of a, sum of b) along axis in one reduction (one round of shuffles and barriers for both)."""
    return tl.reduce((a, b), axis, _add_pair)


@triton.jit
def _row_stats(x, mask_d, eps, HEAD_DIM: tl.constexpr):
    """(mean, rstd) [R] of each row of x [R, BLOCK_D] over its first HEAD_DIM columns (zeros beyond), in two
    passes (no cancellation)."""
    mean = tl.sum(x, axis=1) / HEAD_DIM
    xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / HEAD_DIM + eps)


@triton.jit
def _normalize_rows(x, mask_d, eps, HEAD_DIM: tl.constexpr):
    """(x_hat, rstd) of each row of x [R, BLOCK_D] over its first HEAD_DIM columns (zeros beyond)."""
    mean, rstd = _row_stats(x, mask_d, eps, HEAD_DIM)
    return tl.where(mask_d[None, :], (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _affine_rows(x, mean, rstd, weight, bias):
    """LayerNorm of the rows of x [R, BLOCK_D] from their statistics mean, rstd [R]: every kernel that
    normalises rows with given statistics computes it this way, so that they agree bit for bit (zero beyond the
    head dim, where weight and bias are)."""
    return (x - mean[:, None]) * rstd[:, None] * weight[None, :] + bias[None, :]


@triton.jit
def _load_ln_stats(LN_STATS, row, mask, plane):  # LN_STATS: [4, B, H, N], planes `plane` elements apart
    """(k mean, k rstd, v mean, v rstd) [R] of rows `row` (flat (b, h, n) indices), zeros outside mask."""
    return (tl.load(LN_STATS + row, mask=mask, other=0.0), tl.load(LN_STATS + plane + row, mask=mask, other=0.0),
            tl.load(LN_STATS + 2 * plane + row, mask=mask, other=0.0),
            tl.load(LN_STATS + 3 * plane + row, mask=mask, other=0.0))


@triton.jit
def _layer_norm_rows(x, weight, bias, mask_d, eps, HEAD_DIM: tl.constexpr):
    """LayerNorm of each row of x [R, BLOCK_D] over its first HEAD_DIM columns."""
    mean, rstd = _row_stats(x, mask_d, eps, HEAD_DIM)
    return _affine_rows(x, mean, rstd, weight, bias)


@triton.jit
def _layer_norm_rows_bwd(g, x_hat, rstd, HEAD_DIM: tl.constexpr):
    """dx of y = x_hat * w + b given g = dy * w (zero beyond the head dim, so x_hat there does not matter):
    rstd * (g - mean(g) - x_hat * mean(g * x_hat))."""
    sum_g, sum_gx = _sum_pair(g, g * x_hat, 1)
    return rstd[:, None] * (g - sum_g[:, None] / HEAD_DIM - x_hat * sum_gx[:, None] / HEAD_DIM)


@triton.jit
def _softmax_step(s, values, m_i, l_i, acc, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update with a tile of scores s [BLOCK_M, BLOCK_K] (-inf where invisible) and values
    [BLOCK_K, BLOCK_D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = _exp(m_i - m_safe, IS_FP64)
    p = _exp(s - m_safe[:, None], IS_FP64)  # [BLOCK_M, BLOCK_K]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, IS_FP64, PRECISION)
    return m_new, l_i, acc
