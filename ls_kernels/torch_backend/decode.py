"""Causal long-short attention of new tokens against a decoding cache (``ls_kernels.cache.LSCache``), in
PyTorch: the next T tokens of each sequence (T = 1 per decode step, the prompt for prefill, anything in
between), with per-sequence lengths. The chunks the new tokens finish are projected first, so that the
queries after them see their vectors; then one softmax per query over its window keys (cached and new) and
the projected vectors of the chunks before its own; then the cache keeps the last w - 1 window keys."""
import torch

from ..cache import LSCache
from ..common import masked_softmax
from ..config import LSConfig, acc_dtype

# score entries (batch x heads x queries x keys) per block of queries: bounds the temporaries of a long prefill
_SCORES_PER_BLOCK = 1 << 24


def _gather_rows(x, idx):
    """x (B, H, N, C) gathered along positions by idx (B, M): (B, H, M, C)."""
    B, H, _, C = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], C))


def _logical_rows(a, n_rows, start, slots):
    """Indices into cat(partial chunk (slots rows), new rows) of the logical positions start + m, m < n_rows, of
    sequences whose partial chunk holds a (B,) rows: partial rows first, then the new ones. (B, n_rows)."""
    m = start[:, None] + torch.arange(n_rows, device=a.device)[None, :]
    return torch.where(m < a[:, None], m, slots + m - a[:, None])


def advance_projection(cache: LSCache, k_src, v_src, logits, n_new, *, norm_global):
    """Append to the cache the projected vectors of the chunks that the new rows finish, and keep the rows of
    the chunk left unfinished. k_src, v_src (B, H, T, D) and logits (B, H, T, r), accumulation dtype: what the
    projection reads of the T new positions (rows n_new (B,) and after are padding, never used).
    norm_global: LN_G of projected vectors (B, H, G, D) -> same."""
    l, r = cache.chunk, cache.rank
    B, H, T, D = k_src.shape
    a = cache.lengths % l  # rows of each sequence's unfinished chunk
    total = a + n_new
    n_done = total // l  # chunks finished by this call
    rows = [torch.cat([cache.part_k, k_src], 2), torch.cat([cache.part_v, v_src], 2),
            torch.cat([cache.part_logits, logits], 2)]
    max_done = int(n_done.max()) if B > 0 else 0
    if max_done > 0:
        cache.reserve(int((cache.lengths // l).max()) + max_done)
        idx = _logical_rows(a, max_done * l, torch.zeros_like(a), l).clamp(max=l + T - 1)
        kc, vc, pc = (_gather_rows(x, idx).reshape(B, H, max_done, l, x.shape[3]) for x in rows)
        P = torch.softmax(pc, dim=3).transpose(-1, -2)  # (B, H, max_done, r, l): each chunk's softmax over its l
        kg, vg = (norm_global((P @ x).reshape(B, H, max_done * r, D)) for x in (kc, vc))
        # chunk c of this call lands at (lengths // l + c) * r; slots past a sequence's finished chunks are
        # written too (never visible: a query sees only finished chunks)
        target = (cache.lengths // l * r)[:, None] + torch.arange(max_done * r, device=a.device)[None, :]
        target = target[:, None, :, None].expand(B, H, max_done * r, D)
        cache.kg.scatter_(2, target, kg.to(cache.kg.dtype))
        cache.vg.scatter_(2, target, vg.to(cache.vg.dtype))
    rem = total - n_done * l  # rows of the new unfinished chunk, < l
    idx = _logical_rows(a, l, n_done * l, l).clamp(max=l + T - 1)
    keep = (torch.arange(l, device=a.device)[None, :] < rem[:, None])[:, None, :, None]
    for part, x in zip((cache.part_k, cache.part_v, cache.part_logits), rows):
        part.copy_(torch.where(keep, _gather_rows(x, idx), 0.0))


def _spans(sizes):
    """[(start, stop)] of consecutive pieces of these sizes."""
    spans, start = [], 0
    for n in sizes:
        spans.append((start, start + n))
        start += n
    return spans


def attend(q, kw, vw, kg, vg, *, lengths, n_new, cfg: LSConfig):
    """Outputs (B, H, T, D) in the accumulation dtype of the new queries q (B, H, T, D) (rows n_new (B,) and
    after: padding, zeros), query i of sequence b at position lengths[b] + i. kw, vw (B, H, W1 + T, D): the
    cached last W1 = w - 1 window keys and values (oldest first), then the new ones; kg, vg (B, H, G, D): the
    projected vectors of every chunk finished so far (including by the new tokens), chunk-major."""
    B, H, T, D = q.shape
    acc = acc_dtype(q.dtype)
    W1 = kw.shape[2] - T
    l, r = cfg.chunk, max(cfg.rank, 1)
    has_window = cfg.window > 0
    G = int(((lengths + n_new) // l).max()) * r if cfg.rank > 0 and B > 0 else 0
    kg, vg = kg[:, :, :G].to(acc), vg[:, :, :G].to(acc)
    out = q.new_zeros(B, H, T, D, dtype=acc)
    per_query = B * H * (G + (W1 + 1 if has_window else 0)) + 1
    block = max(1, min(T, _SCORES_PER_BLOCK // per_query))
    for i0 in range(0, T, block):
        i1 = min(T, i0 + block)
        qb = q[:, :, i0:i1].to(acc)
        i = torch.arange(i0, i1, device=q.device)
        pos = lengths[:, None] + i[None, :]  # (B, Tb) query positions
        real = i[None, :] < n_new[:, None]  # (B, Tb)
        scores, visible, values = [], [], []
        if G > 0:
            scores.append(qb @ kg.transpose(-1, -2))
            g = torch.arange(G, device=q.device)
            visible.append((g[None, None, :] < (pos // l * r)[:, :, None])[:, None])  # (B, 1, Tb, G)
            values.append(vg)
        if has_window:  # window index j holds position lengths - W1 + j; query i sees j in [i, i + W1]
            j = torch.arange(i0, i1 + W1, device=q.device)
            kb, vb = kw[:, :, i0:i1 + W1].to(acc), vw[:, :, i0:i1 + W1].to(acc)
            band = (j[None, :] >= i[:, None]) & (j[None, :] <= i[:, None] + W1)  # (Tb, Tb + W1)
            started = (lengths[:, None] - W1 + j[None, :]) >= 0  # (B, Tb + W1): not before the sequence
            scores.append(qb @ kb.transpose(-1, -2))
            visible.append((band[None] & started[:, None, :])[:, None])
            values.append(vb)
        s = torch.cat(scores, -1) * cfg.scale
        seen = torch.cat([x.expand(B, 1, i1 - i0, x.shape[-1]) for x in visible], -1) & real[:, None, :, None]
        p = masked_softmax(s, seen, dim=-1)
        o = sum(p[..., a:b] @ x for (a, b), x in zip(_spans([x.shape[-1] for x in scores]), values))
        out[:, :, i0:i1] = o
    return out


def decode(q, k, v, proj, cache: LSCache, *, cfg: LSConfig, norm_local, norm_global, n_new):
    """Outputs (B, H, T, D) in q's dtype of the next T tokens of each sequence (n_new (B,) real ones, then
    right padding, whose rows are zero and never enter the cache), updating the cache in place. q, k, v
    (B, H, T, D), proj (B, H, T, r) or None (cfg.rank 0); norm_local: LN_L of keys or values (B, H, T, D)
    in the accumulation dtype -> same; norm_global: LN_G of projected vectors (B, H, G, D) -> same."""
    acc = acc_dtype(q.dtype)
    k_loc, v_loc = norm_local(k.to(acc)), norm_local(v.to(acc))
    if cfg.rank > 0:
        src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
        advance_projection(cache, *src, proj.to(acc), n_new, norm_global=norm_global)
    kw = torch.cat([cache.win_k, k_loc.to(cache.dtype)], 2)
    vw = torch.cat([cache.win_v, v_loc.to(cache.dtype)], 2)
    out = attend(q, kw, vw, cache.kg, cache.vg, lengths=cache.lengths, n_new=n_new, cfg=cfg)
    W1 = cache.win_k.shape[2]
    if W1 > 0:  # the last W1 window keys of each sequence: indices n_new .. n_new + W1 - 1 of kw
        idx = n_new[:, None] + torch.arange(W1, device=q.device)[None, :]
        cache.win_k.copy_(_gather_rows(kw, idx))
        cache.win_v.copy_(_gather_rows(vw, idx))
    cache.lengths += n_new
    return out.to(q.dtype)
