"""torch.library custom ops of long-short attention (``torch.compile`` sees each as one opaque node).

Two computations, two backends each, a forward op and a backward op for every pair:

=========================================  =====================================================
op                                         computes
=========================================  =====================================================
``ls_kernels::attention_torch_fwd``        ``ls_attention``, blocked PyTorch path -> out
``ls_kernels::attention_torch_bwd``        its gradients (recomputes the blocked forward)
``ls_kernels::attention_triton_fwd``       ``ls_attention``, Triton kernels -> out and what the
                                           backward needs (o_res, lse, projected keys, ...)
``ls_kernels::attention_triton_bwd``       its gradients (Triton backward kernels)
``ls_kernels::projected_torch_fwd``        ``ls_attention_projected`` (projected keys and values
                                           given by the caller), blocked PyTorch path -> out
``ls_kernels::projected_torch_bwd``        its gradients (recomputes)
``ls_kernels::projected_triton_fwd``       ``ls_attention_projected``, Triton -> out, o_res, lse
``ls_kernels::projected_triton_bwd``       its gradients
=========================================  =====================================================

The api calls the Triton ops always, the blocked ops while torch.compile traces or for meta tensors
(in eager mode the blocked path runs under plain autograd, with no recomputation).

Conventions: optional tensors (``proj``, the LN weights and biases, the padding mask) are ``Tensor?``;
scalar settings are ``int``/``float``/``bool`` (an op rebuilds the LSConfig from them). Ops never return
None or aliases: an absent gradient (or an unneeded saved tensor) is an empty tensor, mapped back to None
by the autograd formula. Every tensor an op returns is contiguous, and every fake (meta) implementation
gives the exact shapes, dtypes and strides of the real one. Ops run with autocast disabled inside (their
inputs arrive already cast; statistics are fp32 in every path); the backward ops re-enable the autograd
dispatch keys inside, because the blocked backward recomputes the forward under autograd and the Triton
backward runs the small LN_G backward with autograd.
"""
import contextlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import torch_backend, triton_backend
from .config import HALF_DTYPES, LSConfig, acc_dtype
from .triton_backend import Projected


@contextlib.contextmanager
def no_autocast(x):
    if not torch.amp.is_autocast_available(x.device.type):  # meta tensors: no autocast to leave
        yield
        return
    with torch.autocast(x.device.type, enabled=False):
        yield


@contextlib.contextmanager
def _autograd_dispatch():
    """Re-enable the autograd dispatch keys that torch.library excludes while an op body runs,
    so that torch.enable_grad() + torch.autograd.grad work inside it."""
    guard = getattr(torch._C, "_ForceDispatchKeyGuard", None)
    if guard is None:  # pragma: no cover - older/newer torch without the guard
        yield
        return
    key = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(key.AutogradFunctionality).remove(key.ADInplaceOrView)
    with guard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _pair(w, b):
    return None if w is None else (w, b)


def _empty(ref):
    return ref.new_empty(0)


def _grads_out(grads, like):
    """Gradients cast to their inputs' dtypes, contiguous; empty where the input is absent."""
    out = []
    for g, x in zip(grads, like):
        if x is None:
            out.append(_empty(like[0]))
        elif g is None:
            out.append(torch.zeros_like(x, memory_format=torch.contiguous_format))
        else:
            out.append(g.to(x.dtype).contiguous())
    return tuple(out)


def _fake_grads(like):
    return tuple(_empty(like[0]) if x is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
                 for x in like)


def _none_if(grads, like, needs):
    return tuple(None if x is None or not need else g for g, x, need in zip(grads, like, needs))


def _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps):
    rank = proj.shape[-1] if proj is not None else 0
    return LSConfig(window=window, causal=causal, chunk=chunk, rank=rank, scale=scale, eps=eps,
                    project_after_ln=project_after_ln)


def _projected_cfg(window, causal, chunk, rank, scale, query_offset=None, chunk_offset=None):
    return LSConfig(window=window, causal=causal, chunk=chunk, rank=rank, scale=scale, query_offset=query_offset,
                    chunk_offset=chunk_offset)


def _register_blocked_autograd(fwd_op, bwd_op, n_tensors, n_grads):
    """Autograd of a blocked-path op: its first n_tensors inputs are saved, the rest is its config;
    bwd_op(grad_out, *saved, *config) gives the gradients of the first n_grads inputs."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.cfg = inputs[n_tensors:]

    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grads = bwd_op(grad_out, *saved, *ctx.cfg)
        return (*_none_if(grads, saved[:n_grads], ctx.needs_input_grad), *[None] * (n_tensors - n_grads + len(ctx.cfg)))

    fwd_op.register_autograd(backward, setup_context=setup)


# ============================================================================ ls_attention, blocked

@torch.library.custom_op("ls_kernels::attention_torch_fwd", mutates_args=())
def attention_torch_fwd(q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor], lnl_w: Optional[Tensor],
                        lnl_b: Optional[Tensor], lng_w: Optional[Tensor], lng_b: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int,
                        project_after_ln: bool, scale: float, eps: float) -> Tensor:
    cfg = _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps)
    with no_autocast(q):
        out = torch_backend.attention(q, k, v, cfg=cfg, proj=proj, ln_local=_pair(lnl_w, lnl_b),
                                      ln_global=_pair(lng_w, lng_b), pad=key_padding_mask)
    return out.contiguous()


@attention_torch_fwd.register_fake
def _(q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, key_padding_mask, window, causal, chunk, project_after_ln,
      scale, eps):
    return q.new_empty(q.shape)


@torch.library.custom_op("ls_kernels::attention_torch_bwd", mutates_args=())
def attention_torch_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor],
                        lnl_w: Optional[Tensor], lnl_b: Optional[Tensor], lng_w: Optional[Tensor],
                        lng_b: Optional[Tensor], key_padding_mask: Optional[Tensor], window: int, causal: bool,
                        chunk: int, project_after_ln: bool, scale: float, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b)
    cfg = _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps)
    with _autograd_dispatch(), no_autocast(q):
        leaves = [None if x is None else x.detach().requires_grad_() for x in like]
        out = torch_backend.attention(*leaves[:3], cfg=cfg, proj=leaves[3], ln_local=_pair(*leaves[4:6]),
                                      ln_global=_pair(*leaves[6:8]), pad=key_padding_mask)
        present = [x for x in leaves if x is not None]
        got = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True))
        grads = [None if x is None else next(got) for x in leaves]
    return _grads_out(grads, like)


@attention_torch_bwd.register_fake
def _(grad_out, q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, *args):
    return _fake_grads((q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b))


_register_blocked_autograd(attention_torch_fwd, attention_torch_bwd, n_tensors=9, n_grads=8)


# ============================================================================ ls_attention, Triton

class _AttentionSaved(NamedTuple):
    """What the Triton attention's backward reads (ctx.saved_tensors, in this order)."""
    q: Tensor
    k: Tensor
    v: Tensor
    proj: Optional[Tensor]
    out: Tensor
    o_res: Tensor
    lse: Tensor
    kg: Tensor
    vg: Tensor
    k_raw: Tensor
    v_raw: Tensor
    col_lse: Tensor
    ln_stats: Tensor
    lnl_w: Optional[Tensor]
    lnl_b: Optional[Tensor]
    lng_w: Optional[Tensor]
    lng_b: Optional[Tensor]
    key_padding_mask: Optional[Tensor]


@torch.library.custom_op("ls_kernels::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor], lnl_w: Optional[Tensor],
                         lnl_b: Optional[Tensor], lng_w: Optional[Tensor], lng_b: Optional[Tensor],
                         key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int,
                         project_after_ln: bool, scale: float, eps: float, store_acc: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns out, o_res (its rounding residual for fp16/bf16 when store_acc, else empty), lse, the
    projection's kg, vg, k_raw, v_raw, col_lse, and the LN_L row statistics (empty without LN_L)."""
    cfg = _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps)
    with no_autocast(q):
        fwd = triton_backend.forward(q, k, v, cfg=cfg, proj=proj, ln_local=_pair(lnl_w, lnl_b),
                                     ln_global=_pair(lng_w, lng_b), pad=key_padding_mask, store_acc=store_acc)
    o_res = fwd.o_res.contiguous() if fwd.o_res is not None else _empty(fwd.lse)
    ln_stats = fwd.ln_stats if fwd.ln_stats is not None else _empty(fwd.lse)
    # the window-only forward shares one empty tensor between the projected outputs: ops return no aliases
    return (fwd.out.contiguous(), o_res, fwd.lse, *(x.clone() if proj is None else x for x in fwd.projected),
            ln_stats)


@attention_triton_fwd.register_fake
def _(q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, key_padding_mask, window, causal, chunk, project_after_ln,
      scale, eps, store_acc):
    B, H, N, D = q.shape
    Nk = k.shape[2]  # causal keys beyond the queries: Nk >= N
    acc = acc_dtype(q.dtype)
    NG = _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps).num_projected(Nk)
    new = lambda *shape: q.new_empty(shape, dtype=acc)  # noqa: E731
    res_dtype = triton_backend.kernel_dtype(q.dtype)
    o_res = q.new_empty((B, H, N, D) if store_acc and q.dtype in HALF_DTYPES else (0,), dtype=res_dtype)
    projected_kv = q.new_empty((B, H, NG, D), dtype=triton_backend.kernel_dtype(q.dtype))  # kg, vg
    uses_ln = lnl_w is not None and (window > 0 or (proj is not None and project_after_ln))
    return (q.new_empty(q.shape), o_res, new(B, H, N), projected_kv, projected_kv.clone(), new(B, H, NG, D),
            new(B, H, NG, D), new(B, H, NG), new(4, B, H, Nk) if uses_ln else new(0))


@torch.library.custom_op("ls_kernels::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor], out: Tensor,
                         o_res: Tensor, lse: Tensor, kg: Tensor, vg: Tensor, k_raw: Tensor, v_raw: Tensor,
                         col_lse: Tensor, ln_stats: Tensor, lnl_w: Optional[Tensor], lnl_b: Optional[Tensor],
                         lng_w: Optional[Tensor], lng_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
                         window: int, causal: bool, chunk: int, project_after_ln: bool, scale: float, eps: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _attention_cfg(proj, window, causal, chunk, project_after_ln, scale, eps)
    like = (q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b)
    with _autograd_dispatch(), no_autocast(q):
        grads = triton_backend.backward(
            grad_out.to(q.dtype), q, k, v, cfg=cfg, o=out, o_res=o_res if o_res.numel() > 0 else None, lse=lse,
            projected=Projected(kg, vg, k_raw, v_raw, col_lse),
            ln_stats=ln_stats if ln_stats.numel() > 0 else None, proj=proj, ln_local=_pair(lnl_w, lnl_b),
            ln_global=_pair(lng_w, lng_b), pad=key_padding_mask)
    return _grads_out(grads[:8], like)


@attention_triton_bwd.register_fake
def _(grad_out, q, k, v, proj, out, o_res, lse, kg, vg, k_raw, v_raw, col_lse, ln_stats, lnl_w, lnl_b, lng_w, lng_b,
      *args):
    return _fake_grads((q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b))


def _attention_triton_setup(ctx, inputs, output):
    q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, pad = inputs[:9]
    ctx.save_for_backward(*_AttentionSaved(q, k, v, proj, *output, lnl_w, lnl_b, lng_w, lng_b, pad))
    ctx.cfg = inputs[9:15]


def _attention_triton_backward(ctx, grad_out, *unused):
    s = _AttentionSaved(*ctx.saved_tensors)
    grads = attention_triton_bwd(grad_out, *s, *ctx.cfg)
    like = (s.q, s.k, s.v, s.proj, s.lnl_w, s.lnl_b, s.lng_w, s.lng_b)
    return (*_none_if(grads, like, ctx.needs_input_grad), *[None] * 8)


attention_triton_fwd.register_autograd(_attention_triton_backward, setup_context=_attention_triton_setup)


# ============================================================================ ls_attention_projected, blocked

@torch.library.custom_op("ls_kernels::projected_torch_fwd", mutates_args=())
def projected_torch_fwd(q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, key_padding_mask: Optional[Tensor],
                        window: int, causal: bool, chunk: int, rank: int, scale: float,
                        gvis: Optional[Tensor] = None, query_offset: Optional[int] = None,
                        chunk_offset: Optional[int] = None) -> Tensor:
    """gvis, query_offset, chunk_offset: a shard of a longer sequence (LSConfig.offsets; gvis (B, G) bool, which
    projected vectors may be seen)."""
    cfg = _projected_cfg(window, causal, chunk, rank, scale, query_offset, chunk_offset)
    with no_autocast(q):
        out = torch_backend.attention(q, k, v, cfg=cfg, kg=kg, vg=vg, pad=key_padding_mask, gvis=gvis)
    return out.contiguous()


@projected_torch_fwd.register_fake
def _(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale, gvis=None, query_offset=None,
      chunk_offset=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("ls_kernels::projected_torch_bwd", mutates_args=())
def projected_torch_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor,
                        key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int, rank: int,
                        scale: float, gvis: Optional[Tensor] = None, query_offset: Optional[int] = None,
                        chunk_offset: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, kg, vg)
    cfg = _projected_cfg(window, causal, chunk, rank, scale, query_offset, chunk_offset)
    with _autograd_dispatch(), no_autocast(q):
        leaves = [x.detach().requires_grad_() for x in like]
        out = torch_backend.attention(*leaves[:3], cfg=cfg, kg=leaves[3], vg=leaves[4], pad=key_padding_mask,
                                      gvis=gvis)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return _grads_out(grads, like)


@projected_torch_bwd.register_fake
def _(grad_out, q, k, v, kg, vg, *args):
    return _fake_grads((q, k, v, kg, vg))


_register_blocked_autograd(projected_torch_fwd, projected_torch_bwd, n_tensors=6, n_grads=5)


# ============================================================================ ls_attention_projected, Triton

class _ProjectedSaved(NamedTuple):
    """What the Triton projected attention's backward reads (ctx.saved_tensors, in this order)."""
    q: Tensor
    k: Tensor
    v: Tensor
    kg: Tensor
    vg: Tensor
    out: Tensor
    o_res: Tensor
    lse: Tensor
    key_padding_mask: Optional[Tensor]
    gvis: Optional[Tensor]


@torch.library.custom_op("ls_kernels::projected_triton_fwd", mutates_args=())
def projected_triton_fwd(q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor,
                         key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int, rank: int,
                         scale: float, store_acc: bool, gvis: Optional[Tensor] = None,
                         query_offset: Optional[int] = None, chunk_offset: Optional[int] = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out, o_res (its rounding residual for fp16/bf16 when store_acc, else empty) and lse. gvis,
    query_offset, chunk_offset: as projected_torch_fwd."""
    cfg = _projected_cfg(window, causal, chunk, rank, scale, query_offset, chunk_offset)
    with no_autocast(q):
        fwd = triton_backend.forward(q, k, v, cfg=cfg, kg=kg, vg=vg, pad=key_padding_mask, gvis=gvis,
                                     store_acc=store_acc)
    return fwd.out.contiguous(), (fwd.o_res.contiguous() if fwd.o_res is not None else _empty(fwd.lse)), fwd.lse


@projected_triton_fwd.register_fake
def _(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale, store_acc, gvis=None,
      query_offset=None, chunk_offset=None):
    B, H, N, D = q.shape
    acc = acc_dtype(q.dtype)
    o_res = q.new_empty((B, H, N, D) if store_acc and q.dtype in HALF_DTYPES else (0,),
                        dtype=triton_backend.kernel_dtype(q.dtype))
    return q.new_empty(q.shape), o_res, q.new_empty((B, H, N), dtype=acc)


@torch.library.custom_op("ls_kernels::projected_triton_bwd", mutates_args=())
def projected_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, out: Tensor,
                         o_res: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], gvis: Optional[Tensor],
                         window: int, causal: bool, chunk: int, rank: int, scale: float,
                         query_offset: Optional[int] = None, chunk_offset: Optional[int] = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, kg, vg)
    with no_autocast(q):
        grads = triton_backend.backward(grad_out.to(q.dtype), q, k, v,
                                        cfg=_projected_cfg(window, causal, chunk, rank, scale, query_offset,
                                                           chunk_offset),
                                        o=out, o_res=o_res if o_res.numel() > 0 else None, lse=lse, kg=kg, vg=vg,
                                        pad=key_padding_mask, gvis=gvis)
    return _grads_out((grads.q, grads.k, grads.v, grads.kg, grads.vg), like)


@projected_triton_bwd.register_fake
def _(grad_out, q, k, v, kg, vg, *args):
    return _fake_grads((q, k, v, kg, vg))


def _projected_triton_setup(ctx, inputs, output):
    q, k, v, kg, vg, pad = inputs[:6]
    gvis, query_offset, chunk_offset = (list(inputs[12:]) + [None] * 3)[:3]
    ctx.save_for_backward(*_ProjectedSaved(q, k, v, kg, vg, *output, pad, gvis))
    ctx.cfg = (*inputs[6:11], query_offset, chunk_offset)


def _projected_triton_backward(ctx, grad_out, *unused):
    s = _ProjectedSaved(*ctx.saved_tensors)
    grads = projected_triton_bwd(grad_out, *s, *ctx.cfg)
    return (*_none_if(grads, (s.q, s.k, s.v, s.kg, s.vg), ctx.needs_input_grad), *[None] * 10)


projected_triton_fwd.register_autograd(_projected_triton_backward, setup_context=_projected_triton_setup)


def decode_attend(q, k_new, v_new, cache, *, cfg: LSConfig, n_new, triton: bool):
    """The attention of a decoding call (``ls_decode``): one new token per sequence on the Triton decode
    kernels when ``triton``, else (and for several tokens per sequence) the PyTorch path. Plain eager code,
    not a custom op: decoding is inference and updates the cache in place."""
    if triton and q.shape[2] == 1:
        return triton_backend.decode_attend(q, k_new, v_new, cache, cfg=cfg, n_new=n_new)
    return torch_backend.decode_attend(q, k_new, v_new, cache, cfg=cfg, n_new=n_new)
