"""Which keys a block of queries sees: the window and projected-vector masks, the key ranges a block
visits, and the loads of one window or projected tile with its visibility. Shared by the forward and
backward kernels."""
import triton
import triton.language as tl

from .common import _dot, _layer_norm_rows, _load_rows, _real_rows, _tile


@triton.jit
def _local_visible(offs_m, offs_n, N, WINDOW, HALF, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: key offs_n lies in the window of query offs_m (and in the sequence)."""
    if CAUSAL:  # keys t - WINDOW + 1 .. t
        vis = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - WINDOW)
    else:  # the query's segment widened by HALF on both sides
        seg_start = (offs_m // WINDOW) * WINDOW
        vis = (offs_n[None, :] >= seg_start[:, None] - HALF) & (offs_n[None, :] < seg_start[:, None] + WINDOW + HALF)
    return vis & (offs_n < N)[None, :]


@triton.jit
def _global_visible(offs_m, offs_g, gvis, CHUNK, RANK, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_G]: projected vector offs_g is visible to query offs_m."""
    vis = (gvis != 0)[None, :]
    if CAUSAL:  # only chunks strictly before the query's own
        vis = vis & ((offs_g // RANK)[None, :] < (offs_m // CHUNK)[:, None])
    return vis


@triton.jit
def _window_range(start_m, last_m, N, WINDOW, HALF, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """[lo, hi): the key tiles holding a window key of any query start_m .. last_m, lo tile-aligned."""
    if CAUSAL:  # keys t - WINDOW + 1 .. t
        lo = tl.maximum(start_m - WINDOW + 1, 0)
        hi = last_m + 1
    else:  # keys of the segments of the first and last query, widened by HALF
        lo = tl.maximum((start_m // WINDOW) * WINDOW - HALF, 0)
        hi = tl.minimum((last_m // WINDOW) * WINDOW + WINDOW + HALF, N)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _projected_range(last_m, NG, CHUNK, RANK, CAUSAL: tl.constexpr):
    """Number of projected vectors any query up to last_m can see."""
    if CAUSAL:  # the chunks before the last query's own, RANK vectors each
        return tl.minimum((last_m // CHUNK) * RANK, NG)
    else:
        return NG


@triton.jit
def _window_scores(q, qk_scale, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m, start_n, offs_d, mask_d,
                   ln_w, ln_b, eps, zero, N, WINDOW, HALF, HAS_LN: tl.constexpr, HAS_PAD: tl.constexpr,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The window tile of keys start_n .. start_n + BLOCK_N - 1 for the queries offs_m: keys and values
    [BLOCK_N, BLOCK_D] (LN_L applied, in q's dtype; zeros at padded positions), their visibility
    [BLOCK_M, BLOCK_N] and the scores q k^T times qk_scale [BLOCK_M, BLOCK_N]."""
    offs_n, in_seq = _tile(start_n, BLOCK_N, N)
    key_ok = _real_rows(pad_base, offs_n, in_seq, HAS_PAD)  # [BLOCK_N]
    k = _load_rows(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d)
    v = _load_rows(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d)
    if HAS_LN:
        k = _layer_norm_rows(k + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
        v = _layer_norm_rows(v + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
    visible = _local_visible(offs_m, offs_n, N, WINDOW, HALF, CAUSAL) & key_ok[None, :]
    return k, v, visible, _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale


@triton.jit
def _projected_scores(q, qk_scale, KG, VG, GVIS, g_base, gvis_base, offs_m, start_g, g_hi, offs_d, mask_d, CHUNK,
                      RANK, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, IS_FP64: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_G: tl.constexpr):
    """The projected vectors start_g .. start_g + BLOCK_G - 1 (below g_hi) for the queries offs_m: keys and
    values [BLOCK_G, BLOCK_D] in q's dtype (zeros where invisible to every query), their visibility
    [BLOCK_M, BLOCK_G] and the scores q kg^T times qk_scale [BLOCK_M, BLOCK_G]."""
    offs_g, mask_g = _tile(start_g, BLOCK_G, g_hi)
    gvis = tl.load(GVIS + gvis_base + offs_g, mask=mask_g, other=0)  # its sequence or chunk has real tokens
    rows = (g_base + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (mask_g & (gvis != 0))[:, None] & mask_d[None, :]
    kg = tl.load(KG + rows, mask=ok, other=0.0).to(q.dtype)
    vg = tl.load(VG + rows, mask=ok, other=0.0).to(q.dtype)
    visible = _global_visible(offs_m, offs_g, gvis, CHUNK, RANK, CAUSAL)
    return kg, vg, visible, _dot(q, tl.trans(kg), IS_FP64, PRECISION) * qk_scale
