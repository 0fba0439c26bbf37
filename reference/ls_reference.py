"""Dense pure-PyTorch statement of long-short attention.

This is the oracle every other path is tested against: it builds the full
(N, N) score matrix and an explicit mask over every key, so clarity beats speed.
It is differentiable by autograd and runs in any float dtype.

``upcast=True`` (default) computes everything in fp32 (fp64 for fp64 inputs).
``upcast=False`` mimics a mixed-precision kernel: LayerNorm and softmax in fp32,
matrix products in the input dtype (scores, and probabilities cast to the input
dtype before they multiply the values). It is the "same-dtype PyTorch path" of
the tolerance rule.
"""
import math

import torch


def _layer_norm(x, ln, eps):
    """LayerNorm over the last dim; ln = (weight, bias), each (D,) or (H, D); None = identity."""
    if ln is None:  # that side is not normalised
        return x
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    weight, bias = ln
    if weight.dim() == 2:  # per head: x is (B, H, ..., D)
        shape = (1, weight.shape[0]) + (1,) * (x.dim() - 3) + (weight.shape[1],)
        weight, bias = weight.view(shape), bias.view(shape)
    return y * weight.to(x.dtype) + bias.to(x.dtype)


def _masked_softmax(x, visible, dim):
    """Softmax over the visible entries; slices with nothing visible give zeros."""
    any_visible = visible.any(dim, keepdim=True)
    x = x.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    return torch.softmax(x, dim) * any_visible


def window_mask(N, w, causal, device=None, n_keys=None):
    """(N, Nk) bool, [query i, key j]: j is in the window of query i. The queries are the last N of the Nk =
    n_keys (default N) positions: query i sits at t = Nk - N + i. Causal: t - w < j <= t. Bidirectional
    (Nk = N): j in t's segment of w positions extended by e = max(w // 2, 1) on both sides. w = 0: no window."""
    Nk = N if n_keys is None else n_keys
    t = torch.arange(Nk - N, Nk, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    if w == 0:
        return torch.zeros(N, Nk, dtype=torch.bool, device=device)
    if causal:
        return (j <= t) & (j > t - w)
    e = max(w // 2, 1)
    seg_start = (t // w) * w
    return (j >= seg_start - e) & (j < seg_start + w + e)


def ls_attention_ref(q, k, v, proj=None, *, window, causal=False, chunk=16,
                     ln_local=None, ln_global=None, project_after_ln=False,
                     key_padding_mask=None, scale=None, eps=1e-5, upcast=True):
    """Long-short attention, dense. Shapes as ``ls_kernels.ls_attention``.

    q: (B, H, N, D); k, v: (B, H, Nk, D); proj: (B, H, Nk, r) or None; key_padding_mask: (B, Nk) bool,
    True = padding. Nk = N, or causal Nk >= N: the queries are the last N positions (query i at
    t = Nk - N + i). Returns (B, H, N, D) in q's dtype.
    """
    B, H, N, D = q.shape
    Nk = k.shape[2]
    out_dtype = q.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm = acc if upcast else q.dtype  # dtype of the matrix products
    w = window or 0
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pad = (torch.zeros(B, Nk, dtype=torch.bool, device=q.device)
           if key_padding_mask is None else key_padding_mask)

    # keys and values of the window (LN_L), and what the projection reads
    k_loc = _layer_norm(k.to(acc), ln_local, eps)
    v_loc = _layer_norm(v.to(acc), ln_local, eps)
    k_src, v_src = (k_loc, v_loc) if project_after_ln else (k.to(acc), v.to(acc))

    t = torch.arange(Nk - N, Nk, device=q.device)[:, None]  # query positions
    local = window_mask(N, w, causal, q.device, n_keys=Nk)[None, None] & ~pad[:, None, None, :]  # (B, 1, N, Nk)

    keys, values, visible = [], [], []
    if proj is not None:
        r = proj.shape[-1]
        logits = proj.to(acc)
        if not causal:
            valid = ~pad[:, None, :, None]  # (B, 1, Nk, 1)
            P = _masked_softmax(logits, valid, dim=2)  # (B, H, N, r), over positions
            k_g = _layer_norm(P.transpose(-1, -2) @ k_src, ln_global, eps)  # (B, H, r, D)
            v_g = _layer_norm(P.transpose(-1, -2) @ v_src, ln_global, eps)
            seen = (~pad).any(1)[:, None, None, None].expand(B, 1, N, r)
        else:
            nc = Nk // chunk  # only full chunks are ever visible
            n_full = nc * chunk
            logits = logits[:, :, :n_full].reshape(B, H, nc, chunk, r)
            valid = ~pad[:, :n_full].reshape(B, 1, nc, chunk, 1)
            P = _masked_softmax(logits, valid, dim=3)  # (B, H, nc, l, r)
            k_c = k_src[:, :, :n_full].reshape(B, H, nc, chunk, D)
            v_c = v_src[:, :, :n_full].reshape(B, H, nc, chunk, D)
            k_g = _layer_norm(P.transpose(-1, -2) @ k_c, ln_global, eps).reshape(B, H, nc * r, D)
            v_g = _layer_norm(P.transpose(-1, -2) @ v_c, ln_global, eps).reshape(B, H, nc * r, D)
            key_chunk = torch.arange(nc * r, device=q.device) // r  # (nc * r,)
            chunk_valid = valid.reshape(B, nc, chunk).any(-1)  # (B, nc)
            seen = (key_chunk[None, :] < t // chunk)[None, None] \
                & chunk_valid[:, key_chunk][:, None, None, :]  # (B, 1, N, nc * r)
        keys.append(k_g)
        values.append(v_g)
        visible.append(seen)
    keys.append(k_loc)
    values.append(v_loc)
    visible.append(local)

    keys = torch.cat(keys, dim=2)
    values = torch.cat(values, dim=2)
    visible = torch.cat(visible, dim=3)
    scores = (q.to(mm) @ keys.to(mm).transpose(-1, -2)).to(acc) * scale
    probs = _masked_softmax(scores, visible, dim=3)
    out = (probs.to(mm) @ values.to(mm)).to(acc)
    out = out.masked_fill(pad[:, None, Nk - N:, None], 0.0)
    return out.to(out_dtype)


def window_mask_2d(grid, w, device=None):
    """(N, N) bool, N = nx * ny row-major, [query, key]: the key lies in the (w + 2s) x (w + 2s)
    neighbourhood of the query's w x w patch, s = max(w // 2, 1). w = 0: no window."""
    nx, ny = grid
    i = torch.arange(nx * ny, device=device)
    row, col = i // ny, i % ny
    if w == 0:
        return torch.zeros(nx * ny, nx * ny, dtype=torch.bool, device=device)
    s = max(w // 2, 1)

    def near(x):  # [query, key]: within the patch's span along one axis
        start = (x // w * w)[:, None]
        return (x[None, :] >= start - s) & (x[None, :] < start + w + s)

    return near(row) & near(col)


def rel_pos_bias_2d(table, grid, w):
    """(H, N, N): table[(dr + c) * (w + 2p) + dc + c, h] for the query dr rows and dc columns after the key
    (p = w // 2, c = w + p - 1, the official ViL-LS index); pairs out of its range read row 0 (never
    visible: the mask hides them)."""
    nx, ny = grid
    i = torch.arange(nx * ny, device=table.device)
    dr = (i // ny)[:, None] - (i // ny)[None, :]
    dc = (i % ny)[:, None] - (i % ny)[None, :]
    p = w // 2
    c = w + p - 1
    inside = (dr.abs() <= c) & (dc.abs() <= c)
    index = torch.where(inside, (dr + c) * (w + 2 * p) + dc + c, 0)
    return table[index].permute(2, 0, 1)


def ls_attention_2d_ref(q, k, v, proj=None, *, grid, window, k_proj=None, v_proj=None, global_k=None,
                        global_v=None, rel_pos_bias=None, ln_local=None, ln_global=None, project_after_ln=True,
                        key_padding_mask=None, scale=None, eps=1e-5, upcast=True):
    """Two-dimensional long-short attention, dense. Shapes as ``ls_kernels.ls_attention_2d``.

    q, k, v: (B, H, N, D), N = nx * ny; proj: (B, H, N, r) logits, or the projected keys and values given
    as k_proj, v_proj (B, H, r, D) (no LN_G applied to them), or neither; global_k, global_v: (B, H, G, D)
    (LN_L applied here); rel_pos_bias: (rows, H); key_padding_mask: (B, N). One softmax over the projected
    keys, the window keys (plus the bias) and the global keys. Returns (B, H, N, D) in q's dtype.
    """
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm = acc if upcast else q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    pad = torch.zeros(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    k_loc, v_loc = _layer_norm(k.to(acc), ln_local, eps), _layer_norm(v.to(acc), ln_local, eps)
    k_src, v_src = (k_loc, v_loc) if project_after_ln else (k.to(acc), v.to(acc))

    keys, values, visible, bias = [], [], [], []
    if proj is not None:
        r = proj.shape[-1]
        P = _masked_softmax(proj.to(acc), ~pad[:, None, :, None], dim=2)  # (B, H, N, r), over positions
        k_proj = _layer_norm(P.transpose(-1, -2) @ k_src, ln_global, eps)
        v_proj = _layer_norm(P.transpose(-1, -2) @ v_src, ln_global, eps)
    if k_proj is not None:
        r = k_proj.shape[2]
        keys.append(k_proj.to(acc))
        values.append(v_proj.to(acc))
        visible.append((~pad).any(1)[:, None, None, None].expand(B, 1, N, r))
        bias.append(torch.zeros(1, H, N, r, dtype=acc, device=q.device))
    keys.append(k_loc)
    values.append(v_loc)
    visible.append(window_mask_2d(grid, window, q.device)[None, None] & ~pad[:, None, None, :])
    bias.append(torch.zeros(1, H, N, N, dtype=acc, device=q.device) if rel_pos_bias is None
                else rel_pos_bias_2d(rel_pos_bias.to(acc), grid, window)[None])
    if global_k is not None:
        G = global_k.shape[2]
        keys.append(_layer_norm(global_k.to(acc), ln_local, eps))
        values.append(_layer_norm(global_v.to(acc), ln_local, eps))
        visible.append(torch.ones(B, 1, N, G, dtype=torch.bool, device=q.device))
        bias.append(torch.zeros(1, H, N, G, dtype=acc, device=q.device))

    keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    visible, bias = torch.cat(visible, dim=3), torch.cat(bias, dim=3)
    scores = (q.to(mm) @ keys.to(mm).transpose(-1, -2)).to(acc) * scale + bias
    probs = _masked_softmax(scores, visible, dim=3)
    out = (probs.to(mm) @ values.to(mm)).to(acc)
    return out.masked_fill(pad[:, None, :, None], 0.0).to(q.dtype)
