"""Triton helpers shared by the projection and attention kernels, and their host-side twins."""
import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N]; GPUs have no fp64 tl.dot, so fp64 multiplies and sums."""
    if IS_FP64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, offs, stride, mask_rows, offs_d, mask_d):
    """Rows offs (row stride `stride`, unit column stride) as [R, BLOCK_D], zeros outside the masks."""
    return tl.load(ptr + offs.to(tl.int64)[:, None] * stride + offs_d[None, :],
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _real_rows(pad_base, offs, mask_rows, HAS_PAD: tl.constexpr):
    """[R]: rows offs inside mask_rows that are not padding (pad_base: one int8 per position, nonzero = padding).
    Loads masked with it read 0 at padded positions, so that what they hold never matters."""
    if HAS_PAD:
        return mask_rows & (tl.load(pad_base + offs, mask=mask_rows, other=1) == 0)
    else:
        return mask_rows


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
def _normalize_rows(x, mask_d, eps, HEAD_DIM: tl.constexpr):
    """(x_hat, rstd) of each row of x [R, BLOCK_D] over its first HEAD_DIM columns (zeros beyond)."""
    xc = tl.where(mask_d[None, :], x - tl.sum(x, axis=1)[:, None] / HEAD_DIM, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / HEAD_DIM + eps)  # [R]
    return xc * rstd[:, None], rstd


@triton.jit
def _layer_norm_rows(x, weight, bias, mask_d, eps, HEAD_DIM: tl.constexpr):
    """LayerNorm of each row of x [R, BLOCK_D] over its first HEAD_DIM columns."""
    x_hat, _ = _normalize_rows(x, mask_d, eps, HEAD_DIM)
    return x_hat * weight[None, :] + bias[None, :]


@triton.jit
def _layer_norm_rows_bwd(g, x_hat, rstd, HEAD_DIM: tl.constexpr):
    """dx of y = x_hat * w + b given g = dy * w: rstd * (g - mean(g) - x_hat * mean(g * x_hat))."""
    return rstd[:, None] * (g - tl.sum(g, axis=1)[:, None] / HEAD_DIM
                            - x_hat * tl.sum(g * x_hat, axis=1)[:, None] / HEAD_DIM)


def next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def ln_params(ln, H, D, dtype, device):
    """(weight, bias, stride_h) as contiguous (H or 1, D) tensors in dtype; dummies when ln is None."""
    if ln is None:
        dummy = torch.empty(1, dtype=dtype, device=device)
        return dummy, dummy, 0
    weight, bias = (x.to(dtype).reshape(-1, D).contiguous() for x in ln)
    return weight, bias, (D if ln[0].dim() == 2 else 0)
