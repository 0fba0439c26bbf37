"""Causal long-short attention of new tokens against a decoding cache (``ls_kernels.cache.LSCache``), in
PyTorch: the next T tokens of each sequence (T = 1 per decode step, the prompt for prefill, anything in
between), with per-sequence lengths. The chunks the new tokens finish are projected first, so that the
queries after them see their vectors; then one softmax per query over its window keys (cached and new) and
the projected vectors of the chunks before its own (``attend``; the cache's own update rules are its methods).

The cache's window rows are a ring (position p in slot p mod (w - 1)): a one-token step reads it in place, with
no reordering copy."""
import torch

from ..cache import LSCache, ring_order, rows
from ..common import masked_softmax
from ..config import LSConfig, acc_dtype

# score entries (batch x heads x queries x keys) per block of queries: bounds the temporaries of a long prefill
_SCORES_PER_BLOCK = 1 << 24


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


def attend(q, k_new, v_new, cache: LSCache, *, cfg: LSConfig, n_new):
    """Outputs (B, H, T, D) in the accumulation dtype of the next T tokens' queries q (B, H, T, D) of each
    sequence (n_new (B,) real ones, then right padding: zero rows), against the cache (its projected vectors
    already include the chunks these tokens finish, its lengths not yet advanced) and the new window keys and
    values k_new, v_new (B, H, T, D) in the cache's dtype (LN_L applied)."""
    B, H, T, D = q.shape
    L = cache.lengths
    pieces = [_projected_piece(cache, L, n_new, cfg, q.device)] if cfg.rank > 0 else []
    W1 = cache.win_k.shape[2]
    if cfg.window > 0 and T == 1:  # the ring as it is (slot s holds a position iff s < L) and the new key
        slots = torch.arange(W1, device=q.device)
        pieces.append((cache.win_k, cache.win_v, lambda i0, i1: (slots[None, :] < L[:, None])[:, None, None, :]))
        pieces.append((k_new, v_new, lambda i0, i1: torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)))
    elif cfg.window > 0:  # the ring in position order, then the new keys: query i sees indices i .. i + W1
        order = ring_order(L, W1)
        kw, vw = torch.cat([rows(cache.win_k, order), k_new], 2), torch.cat([rows(cache.win_v, order), v_new], 2)

        def band(i0, i1):
            i = torch.arange(i0, i1, device=q.device)[:, None]
            j = torch.arange(W1 + T, device=q.device)[None, :]
            started = (L[:, None] - W1 + j) >= 0  # (B, W1 + T): not before the sequence
            return ((j >= i) & (j <= i + W1))[None, None] & started[:, None, None, :]
        pieces.append((kw, vw, band))
    return _attend(q, pieces, lengths=L, n_new=n_new, cfg=cfg)
