"""Checks of the tensors and settings of one two-dimensional call: the inputs of ``ls_attention_2d`` and
``ls_attention_2d_projected``."""
import numbers

import torch

from ..config import LS2DConfig, default_scale, rel_pos_rows
from .attention import (FLOAT_DTYPES, _check_backend, _check_key_pair, _check_eps, _check_ln, _check_mask,
                        _check_projected, _check_proj, _check_qkv, _check_scale, _check_scores_fit, _check_window,
                        _ln_norm_bound, _max_row_norm, use_triton)


def _check_grid(grid, N):
    """grid: (nx, ny) of ints >= 1 with nx * ny = N, the tokens of q."""
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in grid)):
        raise ValueError(f"grid must be a pair (nx, ny) of ints >= 1, got {grid!r}")
    nx, ny = int(grid[0]), int(grid[1])
    if nx * ny != N:
        raise ValueError(f"grid {(nx, ny)} holds {nx * ny} tokens but q has N = {N} (q, k, v must be "
                         "(B, H, nx * ny, D), row-major over the grid)")
    return nx, ny


def _check_global(q, global_k, global_v):
    """global_k, global_v: both None, or (B, H, G, D) in q's dtype and device; returns G."""
    return _check_key_pair(q, ("global_k", "global_v"), global_k, global_v, same_dtype=True) or 0


def _check_rel_pos_bias(table, window, H, q):
    """rel_pos_bias: None or the official (rows, H) table of a window w >= 2."""
    if table is None:
        return False
    if not isinstance(table, torch.Tensor):
        raise ValueError(f"rel_pos_bias must be None or a torch.Tensor, got {type(table).__name__}")
    if window < 2:
        raise ValueError(f"rel_pos_bias needs window >= 2, got window = {window}: the official table of patch "
                         "side w indexes offsets up to w // 2 beyond the patch, and windows of w < 2 see 1 beyond")
    rows = rel_pos_rows(window)
    if tuple(table.shape) != (rows, H):
        raise ValueError(f"rel_pos_bias must have shape (rows, H) = ({rows}, {H}) for window {window} (the "
                         f"official layout: 2 (w + p - 1)(w + 2p + 1) + 1 rows, p = w // 2), got "
                         f"{tuple(table.shape)}")
    if table.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rel_pos_bias must be a float tensor, got dtype {table.dtype}")
    if table.device != q.device:
        raise ValueError(f"rel_pos_bias is on {table.device} but q is on {q.device}")
    return True


def _check_common_2d(q, k, v, grid, window, global_k, global_v, rel_pos_bias, key_padding_mask, scale, backend):
    """The checks both entry points share; returns (grid, window, G, has_bias)."""
    _check_qkv(q, k, v)
    B, H, N, D = q.shape
    grid = _check_grid(grid, N)
    window = _check_window(window)
    n_global = _check_global(q, global_k, global_v)
    has_bias = _check_rel_pos_bias(rel_pos_bias, window, H, q)
    _check_mask(key_padding_mask, q)
    _check_scale(scale)
    _check_backend(backend)
    return grid, window, n_global, has_bias


def check_attention_2d(q, k, v, proj, *, grid, window, global_k, global_v, rel_pos_bias, ln_local, ln_global,
                       project_after_ln, key_padding_mask, scale, eps, backend):
    """Validate the arguments of ``ls_attention_2d``; returns (its LS2DConfig, whether Triton runs it)."""
    grid, window, n_global, has_bias = _check_common_2d(q, k, v, grid, window, global_k, global_v, rel_pos_bias,
                                                        key_padding_mask, scale, backend)
    B, H, N, D = q.shape
    if proj is not None:
        _check_proj(proj, k)
    if window == 0 and proj is None and n_global == 0:
        raise ValueError("window, proj and global_k are all absent (window=0, proj=None, global_k=None): nothing "
                         "to attend to")
    _check_ln("ln_local", ln_local, H, D, q)
    _check_ln("ln_global", ln_global, H, D, q)
    _check_eps(eps)
    cfg = LS2DConfig(grid=grid, window=window, rank=proj.shape[-1] if proj is not None else 0, num_global=n_global,
                     has_bias=has_bias, scale=default_scale(D) if scale is None else float(scale), eps=float(eps),
                     project_after_ln=bool(project_after_ln))

    def key_bounds():
        local = _ln_norm_bound(ln_local, D) if ln_local is not None else max(_max_row_norm(k), _global_norm(global_k))
        source = local if project_after_ln else _max_row_norm(k)
        return [local] + ([_ln_norm_bound(ln_global, D) if ln_global is not None else source] if proj is not None
                          else [])

    _check_scores_fit(cfg.scale, q, key_bounds)
    return cfg, use_triton(q, backend)


def check_projected_attention_2d(q, k, v, k_proj, v_proj, *, grid, window, global_k, global_v, rel_pos_bias,
                                 key_padding_mask, scale, backend):
    """Validate the arguments of ``ls_attention_2d_projected``; returns (its LS2DConfig, whether Triton runs
    it)."""
    grid, window, n_global, has_bias = _check_common_2d(q, k, v, grid, window, global_k, global_v, rel_pos_bias,
                                                        key_padding_mask, scale, backend)
    rank = _check_projected(q, k_proj, v_proj, causal=False, chunk=1)
    if window == 0 and rank == 0 and n_global == 0:
        raise ValueError("window, k_proj and global_k are all absent (window=0, k_proj=None, global_k=None): "
                         "nothing to attend to")
    D = q.shape[-1]
    cfg = LS2DConfig(grid=grid, window=window, rank=rank, num_global=n_global, has_bias=has_bias,
                     scale=default_scale(D) if scale is None else float(scale))
    _check_scores_fit(cfg.scale, q, lambda: [_max_row_norm(k), _global_norm(global_k)]
                      + ([_max_row_norm(k_proj)] if k_proj is not None else []))
    return cfg, use_triton(q, backend)


def _global_norm(global_k):
    return _max_row_norm(global_k) if global_k is not None else 0.0
