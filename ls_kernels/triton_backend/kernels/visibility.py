"""Which keys a block of queries sees: the window and projected-vector masks, the key ranges a block
visits, the loads and scores of one window or projected tile, and the sweep over every tile a query
block sees (the forward's online softmax, or the dQ sum). Shared by the forward and backward kernels."""
import triton
import triton.language as tl

from .common import _dot, _exp, _layer_norm_rows, _load_ln, _load_rows, _real_rows, _softmax_step, _tile


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


@triton.jit
def _tile_update(s, visible, keys, values, q, do, lse, delta, m_i, l_i, acc, IS_FP64: tl.constexpr,
                 PRECISION: tl.constexpr, DQ: tl.constexpr):
    """One key tile's contribution: the forward's online-softmax step on (m_i, l_i, acc); with DQ, dS K added
    to acc (the dQ sum; m_i, l_i pass through), probabilities recomputed from the logsumexp lse."""
    if DQ:
        p = tl.where(visible, _exp(s - lse[:, None], IS_FP64), 0.0)  # [BLOCK_M, BLOCK_K]
        ds = p * (_dot(do, tl.trans(values), IS_FP64, PRECISION) - delta[:, None])
        acc += _dot(ds.to(q.dtype), keys, IS_FP64, PRECISION)
    else:
        m_i, l_i, acc = _softmax_step(s, visible, values, m_i, l_i, acc, IS_FP64, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _visit_keys(q, do, lse, delta, m_i, l_i, acc, qk_scale, eps, zero, K, V, KG, VG, GVIS, PAD, LNW, LNB, off_b,
                off_h, H, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_padb, stride_lnh,
                offs_m, start_m, last_m, offs_d, mask_d, N, NG, WINDOW, HALF, CHUNK, RANK, CAUSAL: tl.constexpr,
                HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr,
                HEAD_DIM: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_G: tl.constexpr, DQ: tl.constexpr):
    """Every key tile the queries start_m .. last_m of sequence (off_b, off_h) see, the projected vectors
    first, then the window keys, each through _tile_update. q, do [BLOCK_M, BLOCK_D]; lse, delta, m_i, l_i
    [BLOCK_M]; acc [BLOCK_M, BLOCK_D] (the forward passes its state and q, m_i in place of do, lse, delta; the
    dQ kernel passes lse, delta in place of m_i, l_i). Pointers and strides as the forward kernel's."""
    if HAS_GLOBAL:
        g_base, gvis_base = (off_b * H + off_h) * NG, off_b * NG
        g_hi = _projected_range(last_m, NG, CHUNK, RANK, CAUSAL)
        for start_g in range(0, g_hi, BLOCK_G):
            kg, vg, visible, s = _projected_scores(q, qk_scale, KG, VG, GVIS, g_base, gvis_base, offs_m, start_g,
                                                   g_hi, offs_d, mask_d, CHUNK, RANK, CAUSAL, HEAD_DIM, IS_FP64,
                                                   PRECISION, BLOCK_G)
            m_i, l_i, acc = _tile_update(s, visible, kg, vg, q, do, lse, delta, m_i, l_i, acc, IS_FP64, PRECISION, DQ)
    if HAS_LOCAL:
        ln_w, ln_b = _load_ln(LNW, LNB, off_h, stride_lnh, offs_d, mask_d, zero, HAS_LN)
        lo, hi = _window_range(start_m, last_m, N, WINDOW, HALF, BLOCK_N, CAUSAL)
        k_base, v_base = K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh
        pad_base = PAD + off_b * stride_padb
        for start_n in range(lo, hi, BLOCK_N):
            k, v, visible, s = _window_scores(q, qk_scale, k_base, v_base, stride_kn, stride_vn, pad_base, offs_m,
                                              start_n, offs_d, mask_d, ln_w, ln_b, eps, zero, N, WINDOW, HALF, HAS_LN,
                                              HAS_PAD, CAUSAL, HEAD_DIM, IS_FP64, PRECISION, BLOCK_N)
            m_i, l_i, acc = _tile_update(s, visible, k, v, q, do, lse, delta, m_i, l_i, acc, IS_FP64, PRECISION, DQ)
    return m_i, l_i, acc
