"""Which keys a block of queries sees, and the sweep over them shared by the forward and dQ kernels.

Each query's window is an interval of keys [lo, hi), its projected vectors a prefix [0, lim) (both computed
once per query block: no integer division inside a loop). A block's key tiles split into edge tiles, masked
by those intervals, and interior tiles that every query of the block sees whole: those run unmasked, as in
plain FlashAttention. Window tiles start where the block's first window starts, not at a tile boundary."""
import triton
import triton.language as tl

from .common import _dot, _exp, _load_tile, _real_rows, _softmax_step, _tile


@triton.jit
def _window_bounds(offs_m, N, WINDOW, HALF, CAUSAL: tl.constexpr):
    """([BLOCK_M], [BLOCK_M]): each query's window keys [lo, hi), clipped to the sequence."""
    if CAUSAL:  # keys t - WINDOW + 1 .. t
        lo = offs_m - WINDOW + 1
        hi = offs_m + 1
    else:  # the query's segment widened by HALF on both sides
        seg_start = (offs_m // WINDOW) * WINDOW
        lo = seg_start - HALF
        hi = seg_start + WINDOW + HALF
    return tl.maximum(lo, 0), tl.minimum(hi, N)


@triton.jit
def _query_bounds(offs_n, N, WINDOW, HALF, CAUSAL: tl.constexpr):
    """([BLOCK_N], [BLOCK_N]): the queries [lo, hi) whose windows hold each key (the transpose of _window_bounds)."""
    if CAUSAL:  # queries t with t - WINDOW < key <= t
        lo = offs_n
        hi = offs_n + WINDOW
    else:  # segments s with s * WINDOW - HALF <= key < s * WINDOW + WINDOW + HALF, a run of whole segments
        lo = (tl.maximum(offs_n - HALF, 0) // WINDOW) * WINDOW
        hi = ((offs_n + HALF) // WINDOW) * WINDOW + WINDOW
    return lo, tl.minimum(hi, N)


@triton.jit
def _tile_split(lo, hi, inner_lo, inner_hi, BLOCK: tl.constexpr):
    """Tiles of BLOCK starting at lo and covering [lo, hi): the bounds (lo, a, b, hi) of the runs of edge,
    interior and edge tiles, an interior tile lying inside [inner_lo, inner_hi)."""
    n_tiles = tl.maximum(tl.cdiv(hi - lo, BLOCK), 0)
    first = tl.minimum(tl.maximum(tl.cdiv(inner_lo - lo, BLOCK), 0), n_tiles)
    last = tl.minimum(tl.maximum((inner_hi - lo) // BLOCK, first), n_tiles)
    last = tl.where(inner_hi - lo >= BLOCK, last, first)  # a negative numerator would round toward zero
    return lo, lo + first * BLOCK, lo + last * BLOCK, hi


@triton.jit
def _in_bounds(idx, lo, hi):
    """[R, C]: index idx [C] inside the interval [lo, hi) of each row [R]."""
    return (idx[None, :] >= lo[:, None]) & (idx[None, :] < hi[:, None])


@triton.jit
def _tile_update(s, visible, keys, values, q, do, lse, delta, m_i, l_i, acc, IS_FP64: tl.constexpr,
                 PRECISION: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
    """One key tile's contribution: the forward's online-softmax step on (m_i, l_i, acc); with DQ, dS K added
    to acc (the dQ sum; m_i, l_i pass through), probabilities recomputed from the logsumexp lse. Without
    MASKED, every score of the tile is visible."""
    if DQ:
        p = _exp(s - lse[:, None], IS_FP64)  # [BLOCK_M, BLOCK_K]
        if MASKED:
            p = tl.where(visible, p, 0.0)
        ds = p * (_dot(do, tl.trans(values), IS_FP64, PRECISION) - delta[:, None])
        acc += _dot(ds.to(q.dtype), keys, IS_FP64, PRECISION)
    else:
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, values, m_i, l_i, acc, IS_FP64, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _window_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, k_base, v_base, stride_kn, stride_vn, pad_base,
                  offs_m, win_lo, win_hi, start, stop, offs_d, mask_d, N, HAS_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
    """The window key tiles starting at start, start + BLOCK_N, .. below stop, through _tile_update. Keys and
    values [BLOCK_N, BLOCK_D] are read as stored (LN_L already applied), zeros at padded keys; MASKED tiles
    are masked by each query's window [win_lo, win_hi) [BLOCK_M], interior ones only by the padding."""
    for start_n in range(start, stop, BLOCK_N):
        offs_n, in_seq = _tile(start_n, BLOCK_N, N)
        key_ok = _real_rows(pad_base, offs_n, in_seq, HAS_PAD)  # [BLOCK_N]
        k = _load_tile(k_base, offs_n, stride_kn, key_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D)
        v = _load_tile(v_base, offs_n, stride_vn, key_ok, offs_d, mask_d, MASKED or HAS_PAD, EVEN_D)
        s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = key_ok[None, :]
        if MASKED:
            visible = visible & _in_bounds(offs_n, win_lo, win_hi)
        m_i, l_i, acc = _tile_update(s, visible, k, v, q, do, lse, delta, m_i, l_i, acc, IS_FP64, PRECISION, DQ,
                                     MASKED or HAS_PAD)
    return m_i, l_i, acc


@triton.jit
def _projected_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, kg_base, vg_base, gvis_base, g_lim, start, stop,
                     offs_d, mask_d, HAS_GVIS: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                     IS_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
    """The projected vectors start .. stop - 1 in tiles of BLOCK_G through _tile_update: keys and values
    [BLOCK_G, BLOCK_D] contiguous rows in q's dtype, zeros where invisible to every query (HAS_GVIS: their
    sequence or chunk is all padding). MASKED tiles are masked by each query's prefix g_lim [BLOCK_M]."""
    for start_g in range(start, stop, BLOCK_G):
        offs_g, mask_g = _tile(start_g, BLOCK_G, stop)
        rows_ok = mask_g
        if HAS_GVIS:
            rows_ok = rows_ok & (tl.load(gvis_base + offs_g, mask=mask_g, other=0) != 0)
        kg = _load_tile(kg_base, offs_g, HEAD_DIM, rows_ok, offs_d, mask_d, MASKED or HAS_GVIS, EVEN_D)
        vg = _load_tile(vg_base, offs_g, HEAD_DIM, rows_ok, offs_d, mask_d, MASKED or HAS_GVIS, EVEN_D)
        s = _dot(q, tl.trans(kg), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_G]
        visible = rows_ok[None, :]
        if MASKED:
            visible = visible & (offs_g[None, :] < g_lim[:, None])
        m_i, l_i, acc = _tile_update(s, visible, kg, vg, q, do, lse, delta, m_i, l_i, acc, IS_FP64, PRECISION, DQ,
                                     MASKED or HAS_GVIS)
    return m_i, l_i, acc


@triton.jit
def _visit_keys(q, do, lse, delta, m_i, l_i, acc, qk_scale, K, V, KG, VG, GVIS, PAD, off_b, off_h, H, stride_kb,
                stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_padb, offs_m, start_m, last_m, offs_d,
                mask_d, NK, Q_OFF, C_OFF, NG, WINDOW, HALF, CHUNK, RANK, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr,
                HAS_GLOBAL: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                IS_FP64: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                DQ: tl.constexpr):
    """Every key tile the queries start_m .. last_m of sequence (off_b, off_h) see through _tile_update: the
    projected vectors first (interior tiles, then the masked rest), then the window keys (edge, interior and
    edge tiles). q, do
    [BLOCK_M, BLOCK_D]; lse, delta, m_i, l_i [BLOCK_M]; acc [BLOCK_M, BLOCK_D] (the forward passes its state and
    q, m_i in place of do, lse, delta; the dQ kernel passes lse, delta in place of m_i, l_i). K, V: the window
    keys and values as the kernels read them (LN_L applied), NK rows; KG, VG [B, H, NG, HEAD_DIM] contiguous.
    Query row i sits at key position i + Q_OFF (its window) and chunk position i + C_OFF (its projected prefix):
    both are Nk - Nq for keys beyond the queries, 0 otherwise."""
    if HAS_GLOBAL:
        g_base = (off_b * H + off_h) * NG * HEAD_DIM
        if CAUSAL:  # the chunks before each query's own, RANK vectors each
            g_lim = tl.minimum(((offs_m + C_OFF) // CHUNK) * RANK, NG)  # [BLOCK_M]
            g_every = tl.minimum(((start_m + C_OFF) // CHUNK) * RANK, NG)  # seen by every query of the block
            g_any = tl.minimum(((last_m + C_OFF) // CHUNK) * RANK, NG)  # by some query
        else:
            g_lim = tl.full([offs_m.shape[0]], 0, tl.int32) + NG
            g_every = NG
            g_any = NG
        g_interior = (g_every // BLOCK_G) * BLOCK_G  # whole tiles every query sees, then the rest masked
        if not (q.dtype.is_fp16() or q.dtype.is_bf16()):  # IEEE fp32 / fp64 dots: one masked loop (see below)
            g_interior = 0
        m_i, l_i, acc = _projected_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, KG + g_base, VG + g_base,
                                         GVIS + off_b * NG, g_lim, 0, g_interior, offs_d, mask_d, HAS_PAD, HEAD_DIM,
                                         EVEN_D, IS_FP64, PRECISION, BLOCK_G, DQ, MASKED=False)
        m_i, l_i, acc = _projected_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, KG + g_base, VG + g_base,
                                         GVIS + off_b * NG, g_lim, g_interior, g_any, offs_d, mask_d, HAS_PAD,
                                         HEAD_DIM, EVEN_D, IS_FP64, PRECISION, BLOCK_G, DQ, MASKED=True)
    if HAS_LOCAL:
        win_lo, win_hi = _window_bounds(offs_m + Q_OFF, NK, WINDOW, HALF, CAUSAL)  # [BLOCK_M]
        first_lo, first_hi = _window_bounds(start_m + Q_OFF, NK, WINDOW, HALF, CAUSAL)
        last_lo, last_hi = _window_bounds(last_m + Q_OFF, NK, WINDOW, HALF, CAUSAL)
        n0, n1, n2, n3 = _tile_split(first_lo, last_hi, last_lo, first_hi, BLOCK_N)
        k_base, v_base = K + off_b * stride_kb + off_h * stride_kh, V + off_b * stride_vb + off_h * stride_vh
        pad_base = PAD + off_b * stride_padb
        if q.dtype.is_fp16() or q.dtype.is_bf16():  # tensor-core tiles: edge, interior (unmasked), edge runs
            for part in tl.static_range(3):
                if part == 0:
                    n_start, n_stop = n0, n1
                elif part == 1:
                    n_start, n_stop = n1, n2
                else:
                    n_start, n_stop = n2, n3
                m_i, l_i, acc = _window_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, k_base, v_base, stride_kn,
                                              stride_vn, pad_base, offs_m, win_lo, win_hi, n_start, n_stop, offs_d,
                                              mask_d, NK, HAS_PAD, HEAD_DIM, EVEN_D, IS_FP64, PRECISION, BLOCK_N, DQ,
                                              part != 1)
        else:  # IEEE fp32 dots hold their operands in registers (fp64: products): one masked loop, small code
            m_i, l_i, acc = _window_tiles(q, do, lse, delta, m_i, l_i, acc, qk_scale, k_base, v_base, stride_kn,
                                          stride_vn, pad_base, offs_m, win_lo, win_hi, n0, n3, offs_d, mask_d, NK,
                                          HAS_PAD, HEAD_DIM, EVEN_D, IS_FP64, PRECISION, BLOCK_N, DQ, True)
    return m_i, l_i, acc
