"""torch.library custom ops of long-short attention (``torch.compile`` sees each as one opaque node).

Two computations, two backends each, a forward op and a backward op for every pair:

=========================================  =====================================================
op                                         computes
=========================================  =====================================================
``ls_kernels::attention_torch_fwd``        ``ls_attention``, blocked PyTorch path -> out
``ls_kernels::attention_torch_bwd``        its gradients (recomputes the blocked forward)
``ls_kernels::attention_triton_fwd``       ``ls_attention``, Triton kernels -> out and what the
                                           backward needs (o_acc, lse, projected keys, ...)
``ls_kernels::attention_triton_bwd``       its gradients (Triton backward kernels)
``ls_kernels::projected_torch_fwd``        ``ls_attention_projected`` (projected keys and values
                                           given by the caller), blocked PyTorch path -> out
``ls_kernels::projected_torch_bwd``        its gradients (recomputes)
``ls_kernels::projected_triton_fwd``       ``ls_attention_projected``, Triton -> out, o_acc, lse
``ls_kernels::projected_triton_bwd``       its gradients
=========================================  =====================================================

Dispatch (``attention`` and ``attention_projected`` below): the Triton backend always runs
through its ops. The blocked backend runs through its ops while torch.compile traces (so
the graph holds one opaque node and no graph break); in eager mode it runs the same
blocked functions under plain autograd, which saves the backward op's recomputation of
the forward (``FORCE_OPS = True`` routes eager calls through the ops too).

Conventions: optional tensors (``proj``, the LN weights and biases, the padding mask) are
``Tensor?``; scalar configuration is ``int``/``float``/``bool``. Ops never return None or
aliases: an absent gradient (or an unneeded saved tensor) is an empty tensor, mapped back to
None by the autograd formula. Every tensor an op returns is contiguous, and every fake
(meta) implementation gives the exact shapes, dtypes and strides of the real one.

The ops run with autocast disabled inside (their inputs arrive already cast by the caller;
LayerNorm and softmax statistics are fp32 in every path). The backward ops re-enable the
autograd dispatch keys inside (``torch.library`` runs op bodies below autograd) because the
blocked backward recomputes the forward under autograd, and the Triton backward runs the
small LN_G backward with autograd.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from .blocked import ls_attention_torch
from .long_short import INTERPRET, _ls_backward, _ls_forward
from .projected_torch import attend_projected_torch
from .projected_triton import projected_backward, projected_forward

_HALF = (torch.float16, torch.bfloat16)
# the blocked (torch) backend calls its ops only under torch.compile: in eager mode plain autograd through
# the blocked path is the same computation without the backward's recomputation. True: always the ops.
FORCE_OPS = False


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pair(w, b):
    return None if w is None else (w, b)


def _empty(ref):
    return ref.new_empty(0)


@contextlib.contextmanager
def _no_autocast(x):
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


def _eager(q):
    """True outside torch.compile tracing for real tensors, unless FORCE_OPS is set (tests). Meta tensors go
    through the ops, whose fake implementations give the shapes without touching data."""
    return not FORCE_OPS and not torch.compiler.is_compiling() and q.device.type != "meta"


def empty_output(q, tensors):
    """The output of an empty input (B, H or N = 0): zeros of q's shape that depend on every tensor given,
    so that autograd gives each a zero gradient, as PyTorch ops do with empty inputs."""
    out = q.new_zeros(q.shape)
    for x in tensors:
        if x is not None and x.requires_grad:
            out = out + x.sum().to(q.dtype) * 0
    return out


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
    with _no_autocast(q):
        out = ls_attention_torch(q, k, v, proj, window=window, causal=causal, chunk=chunk,
                                 ln_local=_pair(lnl_w, lnl_b), ln_global=_pair(lng_w, lng_b),
                                 project_after_ln=project_after_ln, key_padding_mask=key_padding_mask,
                                 scale=scale, eps=eps)
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
    with _autograd_dispatch(), _no_autocast(q):
        leaves = [None if x is None else x.detach().requires_grad_() for x in like]
        out = ls_attention_torch(*leaves[:4], window=window, causal=causal, chunk=chunk,
                                 ln_local=_pair(*leaves[4:6]), ln_global=_pair(*leaves[6:8]),
                                 project_after_ln=project_after_ln, key_padding_mask=key_padding_mask,
                                 scale=scale, eps=eps)
        present = [x for x in leaves if x is not None]
        got = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True))
        grads = [None if x is None else next(got) for x in leaves]
    return _grads_out(grads, like)


@attention_torch_bwd.register_fake
def _(grad_out, q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, *args):
    return _fake_grads((q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b))


_register_blocked_autograd(attention_torch_fwd, attention_torch_bwd, n_tensors=9, n_grads=8)


# ============================================================================ ls_attention, Triton

def _proj_for_kernels(proj, dtype):
    """proj as the kernels read it: any float dtype is loaded and used in the accumulation dtype, but an fp64
    proj cannot meet fp32 arithmetic in a kernel, and the interpreter gets bf16 arithmetic wrong: both are
    cast to the accumulation dtype first (the same numbers the kernels would compute with)."""
    if proj is None:
        return None
    acc = _acc(dtype)
    if (proj.dtype == torch.float64 and acc != torch.float64) or (INTERPRET and proj.dtype == torch.bfloat16):
        return proj.to(acc)
    return proj


def _num_projected(q, proj, causal, chunk):
    if proj is None:
        return 0
    return proj.shape[-1] * (q.shape[2] // chunk if causal else 1)


@torch.library.custom_op("ls_kernels::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor], lnl_w: Optional[Tensor],
                         lnl_b: Optional[Tensor], lng_w: Optional[Tensor], lng_b: Optional[Tensor],
                         key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int,
                         project_after_ln: bool, scale: float, eps: float, store_acc: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns out, o_acc (fp32 unrounded output for fp16/bf16 when store_acc, else empty),
    lse, and the projection's kg, vg, k_raw, v_raw, col_lse."""
    in_dtype = q.dtype
    # the interpreter computes bf16 arithmetic on raw bit patterns: run it in fp32 there
    if INTERPRET and in_dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    proj = _proj_for_kernels(proj, q.dtype)
    with _no_autocast(q):
        o, o_saved, lse, saved_proj = _ls_forward(q, k, v, proj, window, causal, chunk, _pair(lnl_w, lnl_b),
                                                  _pair(lng_w, lng_b), project_after_ln, key_padding_mask,
                                                  scale, eps, store_acc=store_acc)
    keep_acc = store_acc and in_dtype in _HALF
    o_acc = o_saved.contiguous() if keep_acc else _empty(lse)
    out = o.to(in_dtype).contiguous()
    if proj is None:  # _ls_forward shares one empty tensor between the five
        saved_proj = tuple(x.clone() for x in saved_proj)
    return (out, o_acc, lse, *saved_proj)


@attention_triton_fwd.register_fake
def _(q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, key_padding_mask, window, causal, chunk, project_after_ln,
      scale, eps, store_acc):
    B, H, N, D = q.shape
    acc = _acc(q.dtype)
    NG = _num_projected(q, proj, causal, chunk)
    new = lambda *shape: q.new_empty(shape, dtype=acc)  # noqa: E731
    o_acc = new(B, H, N, D) if store_acc and q.dtype in _HALF else new(0)
    col_lse = new(B, H, NG) if proj is not None else new(B, H, 0, D)
    return (q.new_empty(q.shape), o_acc, new(B, H, N), new(B, H, NG, D), new(B, H, NG, D), new(B, H, NG, D),
            new(B, H, NG, D), col_lse)


@torch.library.custom_op("ls_kernels::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, proj: Optional[Tensor], out: Tensor,
                         o_acc: Tensor, lse: Tensor, kg: Tensor, vg: Tensor, k_raw: Tensor, v_raw: Tensor,
                         col_lse: Tensor, lnl_w: Optional[Tensor], lnl_b: Optional[Tensor], lng_w: Optional[Tensor],
                         lng_b: Optional[Tensor], key_padding_mask: Optional[Tensor], window: int, causal: bool,
                         chunk: int, project_after_ln: bool, scale: float, eps: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b)
    if INTERPRET and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    proj = _proj_for_kernels(proj, q.dtype)
    o = o_acc if o_acc.numel() > 0 else out
    with _autograd_dispatch(), _no_autocast(q):
        grads = _ls_backward(grad_out.to(q.dtype), q, k, v, proj, o, lse, (kg, vg, k_raw, v_raw, col_lse),
                             window, causal, chunk, _pair(lnl_w, lnl_b), _pair(lng_w, lng_b), project_after_ln,
                             key_padding_mask, scale, eps)
    return _grads_out(grads, like)


@attention_triton_bwd.register_fake
def _(grad_out, q, k, v, proj, out, o_acc, lse, kg, vg, k_raw, v_raw, col_lse, lnl_w, lnl_b, lng_w, lng_b, *args):
    return _fake_grads((q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b))


def _triton_setup(ctx, inputs, output):
    q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, pad = inputs[:9]
    ctx.save_for_backward(q, k, v, proj, *output, lnl_w, lnl_b, lng_w, lng_b, pad)
    ctx.cfg = inputs[9:15]


def _triton_backward(ctx, grad_out, *unused):
    saved = ctx.saved_tensors
    q, k, v, proj = saved[:4]
    grads = attention_triton_bwd(grad_out, *saved, *ctx.cfg)
    like = (q, k, v, proj, *saved[12:16])
    return (*_none_if(grads, like, ctx.needs_input_grad), None, None, None, None, None, None, None, None)


attention_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def attention(q, k, v, proj, ln_local, ln_global, key_padding_mask, window, causal, chunk, project_after_ln,
              scale, eps, use_triton):
    """Validated inputs of ``ls_attention`` -> output, through the op of the chosen backend."""
    lnl = ln_local if ln_local is not None else (None, None)
    lng = ln_global if ln_global is not None else (None, None)
    args = (q, k, v, proj, *lnl, *lng, key_padding_mask, window, causal, chunk, project_after_ln, scale, eps)
    if q.numel() == 0:
        return empty_output(q, args[:8])
    if not use_triton:
        if _eager(q):  # plain autograd through the blocked path: no recomputation in the backward
            with _no_autocast(q):
                return ls_attention_torch(q, k, v, proj, window=window, causal=causal, chunk=chunk,
                                          ln_local=ln_local, ln_global=ln_global, project_after_ln=project_after_ln,
                                          key_padding_mask=key_padding_mask, scale=scale, eps=eps)
        return attention_torch_fwd(*args)
    store_acc = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args[:8])
    return attention_triton_fwd(*args, store_acc)[0]


# ============================================================================ ls_attention_projected, blocked

@torch.library.custom_op("ls_kernels::projected_torch_fwd", mutates_args=())
def projected_torch_fwd(q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, key_padding_mask: Optional[Tensor],
                        window: int, causal: bool, chunk: int, rank: int, scale: float) -> Tensor:
    with _no_autocast(q):
        out = attend_projected_torch(q, k, v, kg, vg, window=window, causal=causal, chunk=chunk, rank=rank,
                                     key_padding_mask=key_padding_mask, scale=scale)
    return out.contiguous()


@projected_torch_fwd.register_fake
def _(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("ls_kernels::projected_torch_bwd", mutates_args=())
def projected_torch_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor,
                        key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int, rank: int,
                        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, kg, vg)
    with _autograd_dispatch(), _no_autocast(q):
        leaves = [x.detach().requires_grad_() for x in like]
        out = attend_projected_torch(*leaves, window=window, causal=causal, chunk=chunk, rank=rank,
                                     key_padding_mask=key_padding_mask, scale=scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return _grads_out(grads, like)


@projected_torch_bwd.register_fake
def _(grad_out, q, k, v, kg, vg, *args):
    return _fake_grads((q, k, v, kg, vg))


_register_blocked_autograd(projected_torch_fwd, projected_torch_bwd, n_tensors=6, n_grads=5)


# ============================================================================ ls_attention_projected, Triton

@torch.library.custom_op("ls_kernels::projected_triton_fwd", mutates_args=())
def projected_triton_fwd(q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor,
                         key_padding_mask: Optional[Tensor], window: int, causal: bool, chunk: int, rank: int,
                         scale: float, store_acc: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out, o_acc (fp32 unrounded output for fp16/bf16 when store_acc, else empty) and lse."""
    in_dtype = q.dtype
    if INTERPRET and in_dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    with _no_autocast(q):
        o, o_saved, lse = projected_forward(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale,
                                            store_acc)
    keep_acc = store_acc and in_dtype in _HALF
    o_acc = o_saved.contiguous() if keep_acc else _empty(lse)
    return o.to(in_dtype).contiguous(), o_acc, lse


@projected_triton_fwd.register_fake
def _(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale, store_acc):
    B, H, N, D = q.shape
    acc = _acc(q.dtype)
    o_acc = q.new_empty((B, H, N, D) if store_acc and q.dtype in _HALF else (0,), dtype=acc)
    return q.new_empty(q.shape), o_acc, q.new_empty((B, H, N), dtype=acc)


@torch.library.custom_op("ls_kernels::projected_triton_bwd", mutates_args=())
def projected_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, kg: Tensor, vg: Tensor, out: Tensor,
                         o_acc: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], window: int, causal: bool,
                         chunk: int, rank: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (q, k, v, kg, vg)
    if INTERPRET and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    o = o_acc if o_acc.numel() > 0 else out
    with _no_autocast(q):
        grads = projected_backward(grad_out.to(q.dtype), q, k, v, kg, vg, o, lse, key_padding_mask, window, causal,
                                   chunk, rank, scale)
    return _grads_out(grads, like)


@projected_triton_bwd.register_fake
def _(grad_out, q, k, v, kg, vg, *args):
    return _fake_grads((q, k, v, kg, vg))


def _projected_triton_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output, inputs[5])
    ctx.cfg = inputs[6:11]


def _projected_triton_backward(ctx, grad_out, *unused):
    saved = ctx.saved_tensors
    grads = projected_triton_bwd(grad_out, *saved, *ctx.cfg)
    return (*_none_if(grads, saved[:5], ctx.needs_input_grad), None, None, None, None, None, None, None)


projected_triton_fwd.register_autograd(_projected_triton_backward, setup_context=_projected_triton_setup)


def attention_projected(q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale, use_triton):
    """Validated inputs of ``ls_attention_projected`` -> output, through the op of the chosen backend."""
    args = (q, k, v, kg, vg, key_padding_mask, window, causal, chunk, rank, scale)
    if q.numel() == 0:
        return empty_output(q, args[:5])
    if not use_triton:
        if _eager(q):
            with _no_autocast(q):
                return attend_projected_torch(q, k, v, kg, vg, window=window, causal=causal, chunk=chunk, rank=rank,
                                              key_padding_mask=key_padding_mask, scale=scale)
        return projected_torch_fwd(*args)
    store_acc = torch.is_grad_enabled() and any(x.requires_grad for x in args[:5])
    return projected_triton_fwd(*args, store_acc)[0]
