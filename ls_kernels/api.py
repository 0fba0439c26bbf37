"""The public functions: ``ls_attention``, ``ls_attention_projected``, ``dynamic_projection``, ``ls_decode``,
and the two-dimensional ``ls_attention_2d``, ``ls_attention_2d_projected`` (vision).

Each validates its arguments (``checks``), then takes one route: the Triton ops (CUDA, or the interpreter),
the blocked PyTorch path under plain autograd (eager mode), or the blocked ops (while torch.compile traces,
and for meta tensors, whose shapes the ops' fake implementations give).

``ls_attention`` runs the whole computation, with LN_L and LN_G over each head's D channels fused into the
kernels. The official Transformer-LS code normalises over the whole model dim instead (LayerNorm(H * D) on
the keys and values before the head split, and on the merged projected keys and values). A layer doing that
composes: LN_L itself; ``dynamic_projection`` (P^T k_P, P^T v_P, unnormalised); LN_G itself;
``ls_attention_projected`` (one softmax over each query's window keys and the projected vectors it may see,
the attention of ``ls_attention`` with those steps taken out, on the same kernels).
``LongShortAttention(dual_ln="model")`` is built this way.
"""
import torch

from . import ops, torch_backend, vision_ops
from .checks import (check_attention, check_attention_2d, check_decode, check_dynamic_projection,
                     check_projected_attention, check_projected_attention_2d, use_triton)
from .common import layer_norm, zero_padded_unless_finite
from .config import acc_dtype


def _empty_output(q, tensors):
    """The output of an empty input (B, H or N = 0): zeros of q's shape that depend on every tensor given,
    so that autograd gives each a zero gradient, as PyTorch ops do with empty inputs."""
    out = q.new_zeros(q.shape)
    for x in tensors:
        if x is not None and x.requires_grad:
            out = out + x.sum().to(q.dtype) * 0
    return out


def _eager(q):
    """Plain autograd through the blocked path: outside torch.compile tracing, for real tensors."""
    return not torch.compiler.is_compiling() and q.device.type != "meta"


def _needs_grad(tensors):
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def ls_attention(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                 project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5, backend="auto"):
    """Long-short attention (Transformer-LS): each query attends, under one softmax, to its local
    window of keys and to keys projected from the whole sequence (or from earlier chunks, causal).

    Args:
        q, k, v: (B, H, N, D) queries, keys and values, one dtype (fp16, bf16, fp32 or fp64), any strides.
            Causal calls may give keys beyond the queries: k, v (B, H, Nk, D) with Nk >= N, the queries
            being the last N positions (query i at t = Nk - N + i, bottom-right aligned); windows and chunks
            are counted in key positions from 0; the window work is that of the N queries, the projection
            reads every key. ``ls_decode`` serves token-by-token generation.
        proj: (B, H, Nk, r) dynamic-projection logits (any float dtype), or None for window-only attention.
        window: w >= 0, local segment size (bidirectional) or band width (causal); 0 = projection only;
            any w >= N acts as w = N.
        causal: bidirectional (False) or autoregressive (True).
        chunk: l >= 1, causal only: positions projected together; a query sees chunks before its own.
        ln_local, ln_global: (weight, bias) of LN_L and LN_G, each (D,) or (H, D), or None (no norm).
        project_after_ln: the projection reads LN_L(k), LN_L(v) (True) or raw k, v (False).
        key_padding_mask: (B, Nk) bool, True = padding; padded tokens are never attended to or projected,
            what they hold never matters, and their output rows are zero.
        scale: score scale (a real number), default 1 / sqrt(D).
        eps: LayerNorm epsilon.
        backend: "auto" (Triton on CUDA, else the blocked PyTorch path), "triton" or "torch".

    Returns:
        (B, H, N, D) tensor in q's dtype.
    """
    cfg, triton = check_attention(q, k, v, proj, window=window, causal=causal, chunk=chunk, ln_local=ln_local,
                                  ln_global=ln_global, project_after_ln=project_after_ln,
                                  key_padding_mask=key_padding_mask, scale=scale, eps=eps, backend=backend)
    lnl = ln_local if ln_local is not None else (None, None)
    lng = ln_global if ln_global is not None else (None, None)
    tensors = (q, k, v, proj, *lnl, *lng)
    if q.numel() == 0:
        return _empty_output(q, tensors)
    args = (*tensors, key_padding_mask, cfg.window, cfg.causal, cfg.chunk, cfg.project_after_ln, cfg.scale, cfg.eps)
    if triton:
        return ops.attention_triton_fwd(*args, _needs_grad(tensors))[0]
    if _eager(q):
        with ops.no_autocast(q):
            return torch_backend.attention(q, k, v, cfg=cfg, proj=proj, ln_local=ln_local, ln_global=ln_global,
                                           pad=key_padding_mask)
    return ops.attention_torch_fwd(*args)


def ls_attention_projected(q, k, v, k_proj=None, v_proj=None, *, window, causal=False, chunk=16,
                           key_padding_mask=None, scale=None, dropout_p=0.0, backend="auto"):
    """Long-short attention against projected keys and values given by the caller.

    Each query attends, under one softmax, to its window keys (``k``, ``v`` as given: no LN_L here) and to
    the projected vectors it may see (``k_proj``, ``v_proj`` as given: no LN_G here). Windows, chunk
    visibility, padding and edge rules are those of ``ls_attention``.

    Args:
        q, k, v: (B, H, N, D), one dtype.
        k_proj, v_proj: (B, H, G, D) projected keys and values (any float dtype; used in q's dtype), e.g. from
            ``dynamic_projection`` then a LayerNorm. Bidirectional: G = r, seen by every query. Causal:
            G = (N // chunk) * r, chunk-major; query t sees those of chunks before floor(t / chunk). None for
            both: window-only attention.
        window: w >= 0, local segment size (bidirectional) or band width (causal).
        causal, chunk: as ``ls_attention``.
        key_padding_mask: (B, N) bool, True = padding. Padded keys are never attended to; projected vectors
            of a sequence (or chunk) with no real token are never attended to; padded queries output zeros.
        scale: score scale, default 1 / sqrt(D).
        dropout_p: dropout probability on the attention probabilities (0 <= p < 1), applied as
            ``nn.Dropout`` on the softmax output would be. Only the blocked PyTorch path has it: p > 0 with
            the Triton backend raises ValueError.
        backend: "auto" (Triton for CUDA tensors with D <= 128, else blocked PyTorch), "triton" or "torch".

    Returns:
        (B, H, N, D) in q's dtype. Differentiable w.r.t. q, k, v, k_proj and v_proj.
    """
    cfg, triton = check_projected_attention(q, k, v, k_proj, v_proj, window=window, causal=causal, chunk=chunk,
                                            key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                            backend=backend)
    B, H, N, D = q.shape
    if cfg.rank == 0:
        k_proj = v_proj = q.new_zeros(B, H, 0, D)
    tensors = (q, k, v, k_proj, v_proj)
    if q.numel() == 0:
        return _empty_output(q, tensors)
    args = (*tensors, key_padding_mask, cfg.window, cfg.causal, cfg.chunk, max(cfg.rank, 1), cfg.scale)
    if triton:
        return ops.projected_triton_fwd(*args, _needs_grad(tensors))[0]
    if _eager(q) or dropout_p > 0:
        with ops.no_autocast(q):
            return torch_backend.attention(q, k, v, cfg=cfg, kg=k_proj, vg=v_proj, pad=key_padding_mask,
                                           opts=torch_backend.Options(dropout_p=float(dropout_p)))
    return ops.projected_torch_fwd(*args)


def dynamic_projection(proj, k, v, *, causal=False, chunk=16, key_padding_mask=None):
    """Projected keys and values of the dynamic projection (paper eq. 3-4 and 7), without LN_G.

    Args:
        proj: (B, H, N, r) projection logits (in a model: a Linear on the layer input, head-major
            channels then split into heads).
        k, v: (B, H, N, D) what the projection reads (raw or LN_L-normalised keys and values).
        causal: False: P = softmax of proj over the N positions; True: over each chunk of
            ``chunk`` positions separately (a trailing partial chunk is dropped).
        key_padding_mask: (B, N) bool, True = padding; padded positions get zero weight, and what they
            hold never matters.

    Returns:
        (kg, vg), each (B, H, G, D) in fp32 (fp64 for fp64 inputs), G = r (bidirectional) or
        (N // chunk) * r (causal, chunk-major). A sequence or chunk whose positions are all padded
        yields zero vectors (``ls_attention_projected`` never shows them). Computed in fp32 whatever
        the autocast state.
    """
    check_dynamic_projection(proj, k, v, causal=causal, chunk=chunk, key_padding_mask=key_padding_mask)
    B, H, N, D = k.shape
    acc = acc_dtype(k.dtype)
    pad = torch.zeros(B, N, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    with ops.no_autocast(k):
        k, v = k.to(acc), v.to(acc)
        if key_padding_mask is not None:  # padded positions' values never matter (0 * NaN would)
            k, v = (zero_padded_unless_finite(x, pad) for x in (k, v))
        kg, vg, _ = torch_backend.project(proj, k, v, pad, causal=causal, chunk=int(chunk))
    return kg, vg


def ls_attention_2d(q, k, v, proj=None, *, grid, window, global_k=None, global_v=None, rel_pos_bias=None,
                    ln_local=None, ln_global=None, project_after_ln=True, key_padding_mask=None, scale=None, eps=1e-5,
                    backend="auto"):
    """Two-dimensional long-short attention (the vision layer of Transformer-LS, ViL-LS): each patch token
    attends, under one softmax, to the keys around its w x w patch, to r keys projected from the whole grid
    and to G global keys (e.g. a CLS token's).

    Args:
        q, k, v: (B, H, N, D) the patch tokens' queries, keys and values, N = nx * ny, row-major over the
            grid (token i * ny + j at row i, column j); one dtype, any strides.
        proj: (B, H, N, r) dynamic-projection logits (a softmax over all N positions), or None.
        grid: (nx, ny).
        window: w >= 0: queries are grouped in w x w patches (the last patch row and column clipped when w
            does not divide nx or ny), each seeing the keys of the (w + 2s) x (w + 2s) neighbourhood centred on
            it, s = max(w // 2, 1), clipped to the grid; 0 = no window.
        global_k, global_v: (B, H, G, D) keys and values every query sees (normalised by ``ln_local`` like the
            window keys, never projected), or None.
        rel_pos_bias: (rows, H) the official relative-position bias table of patch side w (rows =
            2 (w + p - 1)(w + 2p + 1) + 1, p = w // 2; w >= 2), added to the window scores only: a query dr
            rows and dc columns after its key adds table[(dr + c)(w + 2p) + dc + c, h], c = w + p - 1.
        ln_local, ln_global: (weight, bias) of LN_L and LN_G, each (D,) or (H, D), or None.
        project_after_ln: the projection reads LN_L(k), LN_L(v) (True, the official vision code) or raw k, v.
        key_padding_mask: (B, N) bool, True = padding: padded tokens are never attended to or projected and
            their output rows are zero.
        scale: score scale, default 1 / sqrt(D).
        eps: LayerNorm epsilon.
        backend: "auto" (the Triton kernels for CUDA tensors with D <= 128, else the blocked PyTorch path),
            "triton" or "torch".

    Returns:
        (B, H, N, D) in q's dtype, differentiable w.r.t. every tensor argument (the bias table included).
    """
    cfg, triton = check_attention_2d(q, k, v, proj, grid=grid, window=window, global_k=global_k, global_v=global_v,
                                rel_pos_bias=rel_pos_bias, ln_local=ln_local, ln_global=ln_global,
                                project_after_ln=project_after_ln, key_padding_mask=key_padding_mask, scale=scale,
                                eps=eps, backend=backend)
    lnl = ln_local if ln_local is not None else (None, None)
    lng = ln_global if ln_global is not None else (None, None)
    if q.numel() == 0:
        return _empty_output(q, (q, k, v, proj, global_k, global_v, rel_pos_bias, *lnl, *lng))
    run = vision_ops.attention_2d_triton if triton else torch_backend.attention_2d
    with ops.no_autocast(q):
        return run(q, k, v, cfg=cfg, proj=proj, global_k=global_k, global_v=global_v, rel_pos_bias=rel_pos_bias,
                   ln_local=ln_local, ln_global=ln_global, pad=key_padding_mask)


def ls_attention_2d_projected(q, k, v, k_proj=None, v_proj=None, *, grid, window, global_k=None, global_v=None,
                              rel_pos_bias=None, key_padding_mask=None, scale=None, backend="auto"):
    """``ls_attention_2d`` against projected keys and values given by the caller, with no LayerNorm: the
    window keys ``k``, ``v``, the global keys and ``k_proj``, ``v_proj`` (B, H, r, D) are used as given (a
    layer normalising over the whole model dim, as the official ViL-LS layer does, composes
    ``dynamic_projection``, its LayerNorms and this). Other arguments and the result as ``ls_attention_2d``.
    """
    cfg, triton = check_projected_attention_2d(q, k, v, k_proj, v_proj, grid=grid, window=window, global_k=global_k,
                                          global_v=global_v, rel_pos_bias=rel_pos_bias,
                                          key_padding_mask=key_padding_mask, scale=scale, backend=backend)
    if q.numel() == 0:
        return _empty_output(q, (q, k, v, k_proj, v_proj, global_k, global_v, rel_pos_bias))
    run = vision_ops.attention_2d_triton if triton else torch_backend.attention_2d
    with ops.no_autocast(q):
        return run(q, k, v, cfg=cfg, kg=k_proj, vg=v_proj, global_k=global_k, global_v=global_v,
                   rel_pos_bias=rel_pos_bias, pad=key_padding_mask)


def ls_decode(q, k, v, proj, cache, *, window, chunk, ln_local=None, ln_global=None, project_after_ln=False,
              scale=None, eps=1e-5, key_padding_mask=None, backend="auto"):
    """Causal long-short attention of the next T tokens of each sequence against its decoding cache, which
    it updates in place: token-by-token generation (T = 1), prefill (T = the prompt) or anything between.
    The outputs are the rows that one causal ``ls_attention`` call over each whole sequence gives.

    Args:
        q, k, v: (B, H, T, D) the new tokens' queries, keys and values (raw: LN_L is applied here).
        proj: (B, H, T, r) their projection logits, or None (window only; the cache was made with rank 0).
        cache: an ``LSCache`` made for B sequences, H heads, head dim D, q's dtype and device, this window,
            chunk and rank (``LSCache.empty``, or ``LongShortAttention.init_cache``). Sequence b's new tokens
            take positions cache.lengths[b] ...
        window, chunk, ln_local, ln_global, project_after_ln, scale, eps: as ``ls_attention`` (causal).
        key_padding_mask: (B, T) bool, True = padding, right padding only (sequences of different lengths
            in one prefill): padded tokens output zeros and never enter the cache.
        backend: "auto" (the Triton decode kernels for one token per sequence on CUDA with D <= 128, else the
            PyTorch path), "triton" or "torch". Calls with T > 1 (prefill) attend on the PyTorch path.

    Returns:
        (B, H, T, D) in q's dtype. Inference only: no gradients flow (the call runs under no_grad).

    Cost per token: O((w + t r / l) D), t the sequence's length; the cache holds O(w + t r / l) vectors per
    sequence and head (``LSCache``), against O(t) for a full KV cache.
    """
    cfg, n_new = check_decode(q, k, v, proj, cache, window=window, chunk=chunk, ln_local=ln_local,
                              ln_global=ln_global, project_after_ln=project_after_ln, scale=scale, eps=eps,
                              key_padding_mask=key_padding_mask, backend=backend)
    return decode_tokens(q, k, v, proj, cache, cfg=cfg, norm_local=lambda t: layer_norm(t, ln_local, cfg.eps),
                         norm_global=lambda t: layer_norm(t, ln_global, cfg.eps), n_new=n_new,
                         triton=use_triton(q, backend))


def decode_tokens(q, k, v, proj, cache, *, cfg, norm_local, norm_global, n_new, triton):
    """``ls_decode`` after validation, with LN_L and LN_G given as functions of (B, H, ., D) tensors in the
    accumulation dtype (the layer's model-wide LayerNorms are such functions), under no_grad: the chunks the
    new tokens finish are projected into the cache first, so that the queries after them see their vectors;
    then the attention; then the new window keys go into the cache."""
    acc = acc_dtype(q.dtype)
    with torch.no_grad(), ops.no_autocast(q):
        k_loc, v_loc = norm_local(k.to(acc)), norm_local(v.to(acc))
        if cfg.rank > 0:
            src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
            cache.advance_projection(*src, proj.to(acc), n_new, norm_global=norm_global)
        k_new, v_new = k_loc.to(cache.dtype), v_loc.to(cache.dtype)
        out = ops.decode_attend(q, k_new, v_new, cache, cfg=cfg, n_new=n_new, triton=triton)
        cache.advance(k_new, v_new, n_new)
    return out.to(q.dtype)
