"""Causal long-short attention of new tokens against a decoding cache (``ls_kernels.cache.LSCache``), in
PyTorch: the next T tokens of each sequence (T = 1 per decode step, the prompt for prefill, anything in
between), with per-sequence lengths. The chunks the new tokens finish are projected first, so that the
queries after them see their vectors; then one softmax per query over its window keys (cached and new) and
the projected vectors of the chunks before its own; then the new keys go into the window ring.

The cache's window and unfinished-chunk rows are rings (position p in slot p mod size): a one-token step writes
one row of each and reads the rings in place, with no reordering copy."""
import torch

from ..cache import LSCache
from ..common import masked_softmax
from ..config import LSConfig, acc_dtype

# score entries (batch x heads x queries x keys) per block of queries: bounds the temporaries of a long prefill
_SCORES_PER_BLOCK = 1 << 24


def _rows(x, idx):
    """x (B, H, N, C) gathered along positions by idx (B, M): (B, H, M, C)."""
    B, H, _, C = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], C))


def _put_rows(x, idx, rows):
    """x (B, H, N, C) with rows (B, H, M, C) written at positions idx (B, M), in place."""
    B, H, M, C = rows.shape
    x.scatter_(2, idx[:, None, :, None].expand(B, H, M, C), rows.to(x.dtype))


def _ring_order(lengths, size):
    """(B, size): the ring slots of positions lengths - size .. lengths - 1, oldest first."""
    return (lengths[:, None] - size + torch.arange(size, device=lengths.device)[None, :]) % size


def _project_chunks(k, v, logits, norm_global):
    """Projected keys and values (B, H, n * r, D) of n chunks: k, v (B, H, n, l, D), logits (B, H, n, l, r)."""
    B, H, n, l, D = k.shape
    P = torch.softmax(logits, dim=3).transpose(-1, -2)  # (B, H, n, r, l): each chunk's softmax over its l rows
    return [norm_global((P @ x).reshape(B, H, -1, D)) for x in (k, v)]


def advance_projection(cache: LSCache, k_src, v_src, logits, n_new, *, norm_global):
    """Append to the cache the projected vectors of the chunks that the new rows finish, and keep the rows of
    the chunk left unfinished (ring of l slots). k_src, v_src (B, H, T, D) and logits (B, H, T, r),
    accumulation dtype: what the projection reads of the T new positions (rows n_new (B,) and after are
    padding, never used). norm_global: LN_G of projected vectors (B, H, G, D) -> same.

    Chunk c of a sequence lands at rows c r .. c r + r - 1 of kg, vg; rows past a sequence's finished chunks
    may be written with unfinished sums (never visible: a query sees only finished chunks)."""
    l, r = cache.chunk, cache.rank
    B, H, T, D = k_src.shape
    L = cache.lengths
    parts = (cache.part_k, cache.part_v, cache.part_logits)
    if T == 1:  # one row into slot L mod l; a chunk finishes where that slot is the last
        slot = (L % l)[:, None]
        for part, x in zip(parts, (k_src, v_src, logits)):
            _put_rows(part, slot, x)
        if bool(((L + n_new) % l == 0).logical_and(n_new > 0).any()):
            cache.reserve(int((L // l).max()) + 1)
            kg, vg = _project_chunks(*(p.unsqueeze(2) for p in parts), norm_global)
            target = (L // l * r)[:, None] + torch.arange(r, device=L.device)[None, :]
            _put_rows(cache.kg, target, kg)
            _put_rows(cache.vg, target, vg)
        return
    a = L % l  # rows of each sequence's unfinished chunk, in slots 0 .. a - 1 (the chunk starts at a slot 0)
    n_done = (a + n_new) // l  # chunks finished by this call
    rows = [torch.cat([p, x], 2) for p, x in zip(parts, (k_src, v_src, logits))]
    m = torch.arange(((l - 1 + T) // l + 1) * l, device=L.device)[None, :]  # logical rows from the chunk's start
    idx = torch.where(m < a[:, None], m, l + m - a[:, None]).clamp(max=l + T - 1)  # into cat(part, new)
    max_done = int(n_done.max()) if B > 0 else 0
    if max_done > 0:
        cache.reserve(int((L // l).max()) + max_done)
        chunks = [_rows(x, idx[:, :max_done * l]).reshape(B, H, max_done, l, x.shape[3]) for x in rows]
        kg, vg = _project_chunks(*chunks, norm_global)
        target = (L // l * r)[:, None] + torch.arange(max_done * r, device=L.device)[None, :]
        _put_rows(cache.kg, target, kg)
        _put_rows(cache.vg, target, vg)
    rem = a + n_new - n_done * l  # rows of the new unfinished chunk, < l
    left = idx.gather(1, (n_done * l)[:, None] + torch.arange(l, device=L.device)[None, :])
    keep = (torch.arange(l, device=L.device)[None, :] < rem[:, None])[:, None, :, None]
    for part, x in zip(parts, rows):
        part.copy_(torch.where(keep, _rows(x, left), 0.0))


def _attend(q, pieces, *, lengths, n_new, cfg: LSConfig):
    """Outputs (B, H, T, D) in the accumulation dtype of the new queries q (B, H, T, D) (rows n_new (B,) and
    after: padding, zeros), query i of sequence b at position lengths[b] + i: one softmax over the pieces,
    each (keys (B, H, K, D), values, visible(i0, i1) -> (B, 1, i1 - i0, K) bool for queries i0 .. i1 - 1)."""
    B, H, T, D = q.shape
    acc = acc_dtype(q.dtype)
    out = q.new_zeros(B, H, T, D, dtype=acc)
    per_query = B * H * sum(keys.shape[2] for keys, _, _ in pieces) + 1
    block = max(1, min(T, _SCORES_PER_BLOCK // per_query))
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        qb = q[:, :, i0:i1].to(acc)
        real = (torch.arange(i0, i1, device=q.device)[None, :] < n_new[:, None])[:, None, :, None]
        s = torch.cat([qb @ keys.to(acc).transpose(-1, -2) for keys, _, _ in pieces], -1) * cfg.scale
        seen = torch.cat([vis(i0, i1).expand(B, 1, i1 - i0, keys.shape[2]) for keys, _, vis in pieces], -1) & real
        p = masked_softmax(s, seen, dim=-1)
        start = 0
        for keys, values, _ in pieces:
            out[:, :, i0:i1] += p[..., start:start + keys.shape[2]] @ values.to(acc)
            start += keys.shape[2]
    return out


def _projected_piece(cache, lengths, n_new, cfg, device):
    """The projected vectors of every finished chunk, as an _attend piece: query i sees those of chunks before
    floor((lengths + i) / l)."""
    l, r = cfg.chunk, cfg.rank
    G = int(((lengths + n_new) // l).max()) * r
    g = torch.arange(G, device=device)

    def visible(i0, i1):
        pos = lengths[:, None] + torch.arange(i0, i1, device=device)[None, :]
        return (g[None, None, :] < (pos // l * r)[:, :, None])[:, None]
    return cache.kg[:, :, :G], cache.vg[:, :, :G], visible


def decode(q, k, v, proj, cache: LSCache, *, cfg: LSConfig, norm_local, norm_global, n_new):
    """Outputs (B, H, T, D) in q's dtype of the next T tokens of each sequence (n_new (B,) real ones, then
    right padding, whose rows are zero and never enter the cache), updating the cache in place. q, k, v
    (B, H, T, D), proj (B, H, T, r) or None (cfg.rank 0); norm_local: LN_L of keys or values (B, H, T, D)
    in the accumulation dtype -> same; norm_global: LN_G of projected vectors (B, H, G, D) -> same."""
    acc = acc_dtype(q.dtype)
    B, H, T, D = q.shape
    L = cache.lengths
    k_loc, v_loc = norm_local(k.to(acc)), norm_local(v.to(acc))
    if cfg.rank > 0:
        src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
        advance_projection(cache, *src, proj.to(acc), n_new, norm_global=norm_global)
    pieces = [_projected_piece(cache, L, n_new, cfg, q.device)] if cfg.rank > 0 else []
    W1 = cache.win_k.shape[2]
    k_new, v_new = k_loc.to(cache.dtype), v_loc.to(cache.dtype)
    if cfg.window > 0 and T == 1:  # the ring as it is (slot s holds a position iff s < L) and the new key
        slots = torch.arange(W1, device=q.device)
        pieces.append((cache.win_k, cache.win_v, lambda i0, i1: (slots[None, :] < L[:, None])[:, None, None, :]))
        pieces.append((k_new, v_new, lambda i0, i1: torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)))
    elif cfg.window > 0:  # the ring in position order, then the new keys: query i sees indices i .. i + W1
        order = _ring_order(L, W1)
        kw, vw = torch.cat([_rows(cache.win_k, order), k_new], 2), torch.cat([_rows(cache.win_v, order), v_new], 2)

        def band(i0, i1):
            i = torch.arange(i0, i1, device=q.device)[:, None]
            j = torch.arange(W1 + T, device=q.device)[None, :]
            started = (L[:, None] - W1 + j) >= 0  # (B, W1 + T): not before the sequence
            return ((j >= i) & (j <= i + W1))[None, None] & started[:, None, None, :]
        pieces.append((kw, vw, band))
    out = _attend(q, pieces, lengths=L, n_new=n_new, cfg=cfg)
    if W1 > 0:  # the new keys into the ring: positions L .. L + n_new - 1, the last W1 of them
        n_keep = min(T, W1)
        j = torch.arange(n_keep, device=q.device)[None, :]
        first = (n_new - n_keep).clamp(min=0)[:, None] + j  # (B, n_keep) new rows, padding rows included
        slots = torch.where(first < n_new[:, None], (L[:, None] + first) % W1, -1)
        # padding rows (first >= n_new) go to a scratch slot: rewrite those slots with what they hold
        src_k, src_v = _rows(k_new, first.clamp(max=T - 1)), _rows(v_new, first.clamp(max=T - 1))
        hold = slots < 0
        slots = torch.where(hold, (L[:, None] + first) % W1, slots)
        keep_old = hold[:, None, :, None]
        src_k = torch.where(keep_old, _rows(cache.win_k, slots), src_k)
        src_v = torch.where(keep_old, _rows(cache.win_v, slots), src_v)
        _put_rows(cache.win_k, slots, src_k)
        _put_rows(cache.win_v, slots, src_v)
    cache.lengths += n_new
    return out.to(q.dtype)
