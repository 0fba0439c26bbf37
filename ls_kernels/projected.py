"""Lower-level pieces of long-short attention: the dynamic projection and attention against
projected keys and values that the caller computed.

``ls_attention`` runs the whole computation, with LN_L and LN_G over each head's D
channels fused into the kernels. The official Transformer-LS code normalises over the
whole model dim instead (``LayerNorm(H * D)`` on the keys and values before the head
split, and on the merged projected keys and values). A layer doing that composes:

1. ``k, v = LN_L(k), LN_L(v)`` itself (any normalisation it likes);
2. ``kg, vg = dynamic_projection(proj, k_P, v_P, causal=..., chunk=..., key_padding_mask=...)``
   -- P^T k_P and P^T v_P, unnormalised, (B, H, G, D);
3. ``kg, vg = LN_G(kg), LN_G(vg)`` itself;
4. ``out = ls_attention_projected(q, k, v, kg, vg, window=..., causal=..., chunk=..., ...)``
   -- one softmax over each query's window keys and the projected vectors it may see,
   exactly the attention of ``ls_attention`` (SPEC.md) with steps 1 to 3 taken out.

Step 4 runs the same fused Triton kernels as ``ls_attention`` on CUDA (or the blocked
PyTorch path), through the ``ls_kernels::projected_*`` ops of ``ops.py``, so it compiles
without graph breaks. ``LongShortAttention(dual_ln="model")`` is built this way.
"""
import math
import numbers

import torch

from . import ops
from .checks import FLOAT_DTYPES, max_row_norm, check_inputs, check_scores_fit
from .long_short import _use_triton
from .projected_torch import attend_projected_torch, dynamic_projection, projected_visibility

__all__ = ["dynamic_projection", "ls_attention_projected", "projected_visibility"]


def _check_projected(q, k_proj, v_proj, causal, chunk):
    """Validate the projected keys and values; returns the rank r."""
    if (k_proj is None) != (v_proj is None):
        raise ValueError("k_proj and v_proj must both be tensors or both be None, got "
                         f"{type(k_proj).__name__} and {type(v_proj).__name__}")
    if k_proj is None:
        return 0
    B, H, N, D = q.shape
    for name, x in (("k_proj", k_proj), ("v_proj", v_proj)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (B, H, D):
            raise ValueError(f"{name} must have shape (B, H, G, D) = ({B}, {H}, G, {D}), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if v_proj.shape != k_proj.shape:
        raise ValueError(f"v_proj must have the shape of k_proj {tuple(k_proj.shape)}, got {tuple(v_proj.shape)}")
    G = k_proj.shape[2]
    if not causal:
        return G
    nc = N // chunk
    if (nc == 0 and G != 0) or (nc > 0 and G % nc != 0):
        raise ValueError(f"k_proj has G = {G} projected vectors, not a multiple of the {nc} full chunks of "
                         f"N = {N} positions (chunk = {chunk}): causal projected vectors are chunk-major, "
                         "rank per chunk")
    return G // nc if nc > 0 else 0


def ls_attention_projected(q, k, v, k_proj=None, v_proj=None, *, window, causal=False, chunk=16,
                           key_padding_mask=None, scale=None, dropout_p=0.0, backend="auto"):
    """Long-short attention against projected keys and values given by the caller.

    Each query attends, under one softmax, to its window keys (``k``, ``v`` as given: no
    LN_L here) and to the projected vectors it may see (``k_proj``, ``v_proj`` as given:
    no LN_G here). Windows, chunk visibility, padding and edge rules are those of
    ``ls_attention`` (SPEC.md).

    Args:
        q, k, v: (B, H, N, D), one dtype.
        k_proj, v_proj: (B, H, G, D) projected keys and values (any float dtype; used in q's
            dtype), e.g. from ``dynamic_projection`` then a LayerNorm. Bidirectional: G = r,
            seen by every query. Causal: G = (N // chunk) * r, chunk-major; query t sees those
            of chunks before floor(t / chunk). None for both: window-only attention.
        window: w >= 0, local segment size (bidirectional) or band width (causal).
        causal, chunk: as ``ls_attention``.
        key_padding_mask: (B, N) bool, True = padding. Padded keys are never attended to;
            projected vectors of a sequence (or chunk) with no real token are never attended
            to; padded queries output zeros.
        scale: score scale, default 1 / sqrt(D).
        dropout_p: dropout probability on the attention probabilities (0 <= p < 1), applied
            as ``nn.Dropout`` on the softmax output would be. Only the blocked PyTorch path
            has it: p > 0 with the Triton backend raises ValueError.
        backend: "auto" (Triton for CUDA tensors with D <= 128, else blocked PyTorch),
            "triton" or "torch".

    Returns:
        (B, H, N, D) in q's dtype. Differentiable w.r.t. q, k, v, k_proj and v_proj.
    """
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if window == 0 and k_proj is None:
        raise ValueError("window and k_proj are both absent (window=0, k_proj=None): nothing to attend to; "
                         "give window > 0, k_proj and v_proj, or both")
    # q, k, v, chunk, mask, scale and backend; window > 0 stands in for the projected vectors here
    check_inputs(q, k, v, None, max(int(window), 1), causal, chunk, None, None, key_padding_mask, scale, 1e-5,
                 backend)
    B, H, N, D = q.shape
    window, chunk = min(int(window), max(N, 1)), int(chunk)  # every window >= N sees the whole sequence
    rank = _check_projected(q, k_proj, v_proj, causal, chunk)
    if k_proj is None or rank == 0:
        k_proj = v_proj = q.new_zeros(B, H, 0, D)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    check_scores_fit(scale, q, lambda: [max_row_norm(k), max_row_norm(k_proj)])
    use_triton = _use_triton(q, backend)
    if q.numel() == 0:
        return ops.empty_output(q, (q, k, v, k_proj, v_proj))
    if dropout_p > 0:
        if use_triton:
            raise ValueError(f"dropout_p = {dropout_p} needs the blocked PyTorch path: the Triton kernels have no "
                             "dropout on the attention probabilities; use backend='torch', or dropout_p=0 "
                             "(e.g. the module in eval mode)")
        return attend_projected_torch(q, k, v, k_proj, v_proj, window=window, causal=causal, chunk=chunk,
                                      rank=max(rank, 1), key_padding_mask=key_padding_mask, scale=scale,
                                      dropout_p=float(dropout_p))
    return ops.attention_projected(q, k, v, k_proj, v_proj, key_padding_mask, window, causal, chunk, max(rank, 1),
                                   scale, use_triton)
