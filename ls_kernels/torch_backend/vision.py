"""Blocked PyTorch path of two-dimensional long-short attention (``ls_attention_2d``, ``backend="torch"``).

The grid is cut into w x w query patches (the last row and column of patches clipped: the grid is padded
at its end to whole patches, the padding never seen); each patch is scored against the (w + 2s) x (w + 2s)
keys around it, two strided ``unfold`` views of the zero-padded key grid, plus the relative-position bias of
each (query, key) offset. The window, the projected keys and the global keys are three partial softmaxes
merged into one, as the one-dimensional blocked path does (``blocked._merge``); memory grows linearly in
the number of tokens. Statistics and products in fp32 (fp64 for fp64 inputs); differentiable by autograd,
the bias table included.
"""
import torch
import torch.nn.functional as F

from ..common import all_finite, gather_rows, layer_norm, zero_padded_unless_finite
from ..config import LS2DConfig, acc_dtype, rel_pos_index
from .blocked import DEFAULT, _merge, _partial, project


def _to_grid(x, cfg, value=0.0):
    """(B, H, N, D) -> (B, H, Px * w, Py * w, D), or a (B, N) mask -> (B, Px * w, Py * w): the tokens on their
    grid (N = nx * ny row-major), padded at the end of both axes with `value` to whole patches."""
    nx, ny = cfg.grid
    (px, py), w = cfg.patches, cfg.window
    rest = _rest(x)
    g = x.reshape(*x.shape[:x.dim() - 1 - len(rest)], nx, ny, *rest)
    return F.pad(g, (0, 0) * len(rest) + (0, py * w - ny, 0, px * w - nx), value=value)


def _rest(x):
    """The dims after the token dim: (D,) of (B, H, N, D) tensors, none of (B, N) masks."""
    return tuple(x.shape[3:]) if x.dim() == 4 else ()


def _patches(x, cfg):
    """(B, H, N, D) -> (B, H, Px, Py, w * w, D): each patch's queries, row-major within the patch."""
    B, H, _, D = x.shape
    (px, py), w = cfg.patches, cfg.window
    x = _to_grid(x, cfg).reshape(B, H, px, w, py, w, D)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, px, py, w * w, D)


def _unpatch(x, cfg):
    """(B, H, Px, Py, w * w, *rest) -> (B, H, N, *rest): _patches undone, the padding dropped."""
    nx, ny = cfg.grid
    (px, py), w = cfg.patches, cfg.window
    B, H, rest = x.shape[0], x.shape[1], x.shape[5:]
    x = x.reshape(B, H, px, py, w, w, *rest).permute(0, 1, 2, 4, 3, 5, *range(6, 6 + len(rest)))
    return x.reshape(B, H, px * w, py * w, *rest)[:, :, :nx, :ny].reshape(B, H, nx * ny, *rest)


def _neighbourhoods(x, cfg, value=0.0):
    """(B, H, N, D) or a (B, N) mask -> (B, H, Px, Py, S * S, D) or (B, Px, Py, S * S): the keys around each
    patch, S = w + 2s, row-major, read from the grid padded with `value` (s before, s and the clip after)."""
    s, S, w = cfg.half_width, cfg.span, cfg.window
    g = _to_grid(x, cfg, value)
    n_rest = len(_rest(x))
    row_dim = g.dim() - 2 - n_rest
    g = F.pad(g, (0, 0) * n_rest + (s, s, s, s), value=value)
    g = g.unfold(row_dim, S, w).unfold(row_dim + 1, S, w)  # (..., Px, Py, *rest, S, S)
    if n_rest:
        g = g.movedim(row_dim + 2, -1)  # (..., Px, Py, S, S, D)
        return g.reshape(*g.shape[:row_dim + 2], S * S, g.shape[-1])
    return g.reshape(*g.shape[:row_dim + 2], S * S)


def window_bias(table, cfg):
    """(H, w * w, S * S): the relative-position bias of each query of a patch against each key around it,
    from the table (rows, H) by the official index of their offset (``config.rel_pos_index``)."""
    s, S, w = cfg.half_width, cfg.span, cfg.window
    q_pos = torch.arange(w, device=table.device)
    k_pos = torch.arange(-s, w + s, device=table.device)
    d = q_pos[:, None] - k_pos[None, :]  # (w, S): query minus key, one axis
    index = rel_pos_index(w, d[:, None, :, None], d[None, :, None, :])  # (w, w, S, S): [qr, qc, kr, kc]
    return gather_rows(table, index.reshape(w * w, S * S)).permute(2, 0, 1)


def local_2d(q, k, v, pad, bias_table, cfg, opts=DEFAULT):
    """Partial softmax of every query over the window keys around its patch: (lse (B, H, N), o (B, H, N, D)),
    as blocked._partial. pad (B, N) bool; bias_table (rows, H) or None."""
    visible = ~_neighbourhoods(pad, cfg, value=True)[:, None, :, :, None, :]  # (B, 1, Px, Py, 1, S * S)
    bias = None if bias_table is None else window_bias(bias_table, cfg)[None, :, None, None]
    lse, o = _partial(_patches(q, cfg), _neighbourhoods(k, cfg), _neighbourhoods(v, cfg), visible, cfg.scale,
                      opts, bias=bias)
    return _unpatch(lse, cfg), _unpatch(o, cfg)


def attention_2d(q, k, v, *, cfg: LS2DConfig, proj=None, kg=None, vg=None, global_k=None, global_v=None,
                 rel_pos_bias=None, ln_local=None, ln_global=None, pad=None, opts=DEFAULT):
    """Two-dimensional long-short attention of validated inputs, in q's dtype.

    q, k, v (B, H, N, D), N = nx * ny; proj (B, H, N, r): the projection runs here (over LN_L(k), LN_L(v)
    when cfg.project_after_ln, then LN_G); or kg, vg (B, H, r, D) as given; or neither. global_k, global_v
    (B, H, G, D), normalised by LN_L here; rel_pos_bias (rows, H) or None; ln_local, ln_global: (weight,
    bias) of (D,) or (H, D), or None; pad (B, N) bool.
    """
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
    mask = torch.zeros(B, N, dtype=torch.bool, device=q.device) if pad is None else pad
    if pad is not None:  # what padded positions hold never matters (0 * NaN would)
        q = zero_padded_unless_finite(q, mask)
        k, v = (zero_padded_unless_finite(x, mask) for x in (k, v))
    k_loc, v_loc = layer_norm(k.to(acc), ln_local, cfg.eps), layer_norm(v.to(acc), ln_local, cfg.eps)
    seen = (~mask).any(1, keepdim=True).expand(B, cfg.rank)  # a fully padded grid projects nothing
    if proj is not None:
        k_src, v_src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
        kg, vg, _ = project(proj, k_src, v_src, mask, causal=False, chunk=1, ln_global=ln_global, eps=cfg.eps)
    elif kg is not None:
        kg, vg = (x if all_finite(x) else x.masked_fill(~seen[:, None, :, None], 0.0) for x in (kg, vg))
    parts = []
    if kg is not None and cfg.rank > 0:
        parts.append(_partial(q, kg.to(q.dtype), vg.to(q.dtype), seen[:, None, None, :], cfg.scale, opts))
    if cfg.window > 0:
        parts.append(local_2d(q, k_loc.to(q.dtype), v_loc.to(q.dtype), mask, rel_pos_bias, cfg, opts))
    if global_k is not None and cfg.num_global > 0:
        gk, gv = (layer_norm(x.to(acc), ln_local, cfg.eps).to(q.dtype) for x in (global_k, global_v))
        parts.append(_partial(q, gk, gv, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device), cfg.scale, opts))
    out = _merge(parts)
    if pad is not None:
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    return out.to(q.dtype)
