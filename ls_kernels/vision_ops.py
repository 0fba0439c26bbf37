"""torch.library custom ops of two-dimensional long-short attention on the Triton kernels, and the route
around them (``ls_attention_2d`` with ``backend="triton"``), as ``ops`` does for the one-dimensional ops:

=========================================  =====================================================
op                                         computes
=========================================  =====================================================
``ls_kernels::attention_2d_triton_fwd``    the 2D kernels' attention of normalised inputs -> out,
                                           o_res, lse
``ls_kernels::attention_2d_triton_bwd``    its gradients (q, window k and v, the keys every query
                                           sees, the expanded bias)
=========================================  =====================================================

The LayerNorms, the projection and the bias table's expansion run around them under autograd.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import torch_backend, triton_backend
from .common import layer_norm, zero_padded_unless_finite
from .config import HALF_DTYPES, LS2DConfig, acc_dtype
from .ops import _empty, _fake_grads, _grads_out, _none_if, no_autocast


def _cfg_2d(nx, ny, window, rank, num_global, has_bias, scale):
    return LS2DConfig(grid=(nx, ny), window=window, rank=rank, num_global=num_global, has_bias=has_bias, scale=scale)


@torch.library.custom_op("ls_kernels::attention_2d_triton_fwd", mutates_args=())
def attention_2d_triton_fwd(q: Tensor, k: Tensor, v: Tensor, kall: Optional[Tensor], vall: Optional[Tensor],
                            bias: Optional[Tensor], key_padding_mask: Optional[Tensor], nx: int, ny: int, window: int,
                            rank: int, num_global: int, scale: float, store_acc: bool
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The 2D kernels' attention of normalised inputs (triton_backend.vision.forward_2d) -> out, o_res (empty
    unless kept), lse."""
    cfg = _cfg_2d(nx, ny, window, rank, num_global, bias is not None, scale)
    with no_autocast(q):
        fwd = triton_backend.vision.forward_2d(q, k, v, kall, vall, bias, cfg=cfg, pad=key_padding_mask,
                                               store_acc=store_acc)
    return fwd.out.contiguous(), (fwd.o_res.contiguous() if fwd.o_res is not None else _empty(fwd.lse)), fwd.lse


@attention_2d_triton_fwd.register_fake
def _(q, k, v, kall, vall, bias, key_padding_mask, nx, ny, window, rank, num_global, scale, store_acc):
    B, H, N, D = q.shape
    o_res = q.new_empty((B, H, N, D) if store_acc and q.dtype in HALF_DTYPES else (0,),
                        dtype=triton_backend.kernel_dtype(q.dtype))
    return q.new_empty(q.shape), o_res, q.new_empty((B, H, N), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("ls_kernels::attention_2d_triton_bwd", mutates_args=())
def attention_2d_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kall: Optional[Tensor],
                            vall: Optional[Tensor], bias: Optional[Tensor], out: Tensor, o_res: Tensor, lse: Tensor,
                            key_padding_mask: Optional[Tensor], nx: int, ny: int, window: int, rank: int,
                            num_global: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, kall, vall, bias)
    cfg = _cfg_2d(nx, ny, window, rank, num_global, bias is not None, scale)
    with no_autocast(q):
        g = triton_backend.vision.backward_2d(grad_out.to(q.dtype), q, k, v, kall, vall, bias, cfg=cfg, o=out,
                                              o_res=o_res if o_res.numel() > 0 else None, lse=lse,
                                              pad=key_padding_mask)
    return _grads_out((g.q, g.k, g.v, g.kall, g.vall, g.bias), like)


@attention_2d_triton_bwd.register_fake
def _(grad_out, q, k, v, kall, vall, bias, *args):
    return _fake_grads((q, k, v, kall, vall, bias))


class _Attention2dSaved(NamedTuple):
    """What the 2D Triton attention's backward reads (ctx.saved_tensors, in this order)."""
    q: Tensor
    k: Tensor
    v: Tensor
    kall: Optional[Tensor]
    vall: Optional[Tensor]
    bias: Optional[Tensor]
    out: Tensor
    o_res: Tensor
    lse: Tensor
    pad: Optional[Tensor]


def _attention_2d_setup(ctx, inputs, output):
    q, k, v, kall, vall, bias, pad = inputs[:7]
    ctx.save_for_backward(*_Attention2dSaved(q, k, v, kall, vall, bias, *output, pad))
    ctx.cfg = inputs[7:13]


def _attention_2d_backward(ctx, grad_out, *unused):
    s = _Attention2dSaved(*ctx.saved_tensors)
    grads = attention_2d_triton_bwd(grad_out, *s, *ctx.cfg)
    return (*_none_if(grads, (s.q, s.k, s.v, s.kall, s.vall, s.bias), ctx.needs_input_grad), *[None] * 8)


attention_2d_triton_fwd.register_autograd(_attention_2d_backward, setup_context=_attention_2d_setup)


def attention_2d_triton(q, k, v, *, cfg: LS2DConfig, proj=None, kg=None, vg=None, global_k=None, global_v=None,
                        rel_pos_bias=None, ln_local=None, ln_global=None, pad=None):
    """``ls_attention_2d`` (or its projected form) of validated inputs on the Triton kernels: LN_L, the
    projection with LN_G, the global keys' LN_L and the bias table's expansion under autograd here (small:
    O(N r D) and O(w^2 S^2)), then the fused attention (custom ops above). Returns (B, H, N, D) in q's dtype."""
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
    mask = torch.zeros(B, N, dtype=torch.bool, device=q.device) if pad is None else pad
    if pad is not None:  # what padded positions hold never matters (0 * NaN would)
        q, k, v = (zero_padded_unless_finite(x, mask) for x in (q, k, v))
    with no_autocast(q):
        k_loc, v_loc = layer_norm(k.to(acc), ln_local, cfg.eps), layer_norm(v.to(acc), ln_local, cfg.eps)
        if proj is not None:
            k_src, v_src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
            kg, vg, _ = torch_backend.project(proj, k_src, v_src, mask, causal=False, chunk=1, ln_global=ln_global,
                                              eps=cfg.eps)
        keys, values = [], []
        if kg is not None and cfg.rank > 0:
            keys.append(kg.to(acc))
            values.append(vg.to(acc))
        if global_k is not None and cfg.num_global > 0:
            keys.append(layer_norm(global_k.to(acc), ln_local, cfg.eps))
            values.append(layer_norm(global_v.to(acc), ln_local, cfg.eps))
        kall, vall = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else (None, None)
        bias = None
        if rel_pos_bias is not None and cfg.window > 0:
            bias = triton_backend.vision.expand_bias(torch_backend.vision.window_bias(rel_pos_bias.to(acc), cfg), cfg,
                                                     q.dtype, D)
        needs_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k_loc, v_loc, kall, vall, bias))
        out, _, _ = attention_2d_triton_fwd(q, k_loc.to(q.dtype), v_loc.to(q.dtype), kall, vall, bias, pad,
                                            *cfg.grid, cfg.window, cfg.rank, cfg.num_global, cfg.scale, needs_grad)
    return out
