"""PyTorch pieces of long-short attention against projected keys and values given by the caller.

- ``dynamic_projection``: the projected keys and values P^T k, P^T v (per sequence, or
  per chunk when causal), NOT normalised, so that a caller can apply its own LN_G
  (e.g. over the whole model dim, as the official code does).
- ``projected_visibility``: which projected vectors come from a sequence / chunk with
  real tokens.
- ``attend_projected_torch``: the blocked attention of each query over its window keys
  and the projected vectors it may see, under one softmax, with optional dropout on
  the attention probabilities. Differentiable by autograd.

Everything follows SPEC.md; the semantics equal ``ls_attention`` with the projection,
LN_L and LN_G taken out.
"""
import torch
import torch.nn.functional as F

from . import blocked
from .blocked import _acc_dtype
from .checks import check_inputs


def _pad_or_none(pad, B, N, device):
    return torch.zeros(B, N, dtype=torch.bool, device=device) if pad is None else pad


def dynamic_projection(proj, k, v, *, causal=False, chunk=16, key_padding_mask=None):
    """Projected keys and values of the dynamic projection (paper eq. 3-4 and 7), without LN_G.

    Args:
        proj: (B, H, N, r) projection logits (in a model: a Linear on the layer input, head-major
            channels then split into heads).
        k, v: (B, H, N, D) what the projection reads (raw or LN_L-normalised keys and values).
        causal: False: P = softmax of proj over the N positions; True: over each chunk of
            ``chunk`` positions separately (a trailing partial chunk is dropped).
        key_padding_mask: (B, N) bool, True = padding; padded positions get zero weight.

    Returns:
        (kg, vg), each (B, H, G, D) in fp32 (fp64 for fp64 inputs), G = r (bidirectional)
        or (N // chunk) * r (causal, chunk-major). A sequence or chunk whose positions are
        all padded yields zero vectors (and ``projected_visibility`` marks them invisible).
        Computed in fp32 whatever the autocast state.
    """
    if proj is None:
        raise ValueError("proj must be a (B, H, N, r) tensor, got None")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        got = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"k must be a (B, H, N, D) tensor, got {got}")
    # k stands in for q; window 1 stands in for "something to attend to"
    check_inputs(k, k, v, proj, 1, causal, chunk, None, None, key_padding_mask, None, 1e-5, "torch")
    B, H, N, D = k.shape
    acc = _acc_dtype(k.dtype)
    pad = _pad_or_none(key_padding_mask, B, N, k.device)
    with torch.autocast(k.device.type, enabled=False):
        k, v = k.to(acc), v.to(acc)
        if key_padding_mask is not None:  # padded positions' values never matter (0 * NaN would)
            k, v = (x if blocked.all_finite(x) else blocked.zero_padded(x, pad) for x in (k, v))
        if not causal:
            kg, vg, _ = blocked._projected_bidirectional(proj, k, v, pad, None, 0.0)
        elif N // chunk > 0:
            kg, vg, _ = blocked._projected_causal(proj, k, v, pad, chunk, None, 0.0)
        else:
            kg = vg = k.new_zeros(B, H, 0, D)
    return kg, vg


def projected_visibility(key_padding_mask, B, N, rank, *, causal=False, chunk=16, device=None):
    """(B, G) bool: projected vector g comes from a sequence (bidirectional) or chunk (causal)
    holding at least one real token. G as in ``dynamic_projection``."""
    if key_padding_mask is None:
        n = rank * (N // chunk if causal else 1)
        return torch.ones(B, n, dtype=torch.bool, device=device)
    real = ~key_padding_mask
    if causal:
        nc = N // chunk
        real = real[:, :nc * chunk].reshape(B, nc, chunk)
        return real.any(-1).repeat_interleave(rank, dim=1)
    return real.any(-1, keepdim=True).expand(B, rank)


# ----------------------------------------------------------------------------- blocked attention

def _partial_dropout(q, k, v, visible, scale, p):
    """``blocked._partial`` with dropout on the probabilities: the output sums dropped-out,
    rescaled probabilities, the logsumexp counts all of them, so the merged output is
    sum_j dropout(a_j) v_j with a the softmax over every visible key."""
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # fp32 products, as blocked._partial
    s = s.masked_fill(~visible, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    z_safe = torch.where(z > 0, z, 1.0)
    o = torch.matmul(F.dropout(e, p, training=True).to(v.dtype).to(acc), v.to(acc)) / z_safe
    return torch.where(z > 0, m + torch.log(z_safe), float("-inf")).squeeze(-1), o


def _local_bidirectional_dropout(q, k, v, pad, w, scale, p):
    B, H, N, D = q.shape
    n_seg = -(-N // w)
    if n_seg == 1:
        return _partial_dropout(q, k, v, ~pad[:, None, None, :], scale, p)
    e = max(w // 2, 1)
    size, tail = w + 2 * e, n_seg * w - N
    q_seg = blocked._segments(q, w, n_seg)
    k_win = blocked._windows(k, e, tail + e, size, w)
    v_win = blocked._windows(v, e, tail + e, size, w)
    key_pad = F.pad(pad, (e, tail + e), value=True).unfold(1, size, w)
    lse, o = _partial_dropout(q_seg, k_win, v_win, ~key_pad[:, None, :, None, :], scale, p)
    return lse.reshape(B, H, -1)[:, :, :N], o.reshape(B, H, -1, D)[:, :, :N]


def _local_causal_dropout(q, k, v, pad, w, scale, p):
    B, H, N, D = q.shape
    w = min(w, N)
    n_seg = -(-N // w)
    size, tail = 2 * w - 1, n_seg * w - N
    q_seg = blocked._segments(q, w, n_seg)
    k_win = blocked._windows(k, w - 1, tail, size, w)
    v_win = blocked._windows(v, w - 1, tail, size, w)
    key_pad = F.pad(pad, (w - 1, tail), value=True).unfold(1, size, w)
    i = torch.arange(w, device=q.device)[:, None]
    u = torch.arange(size, device=q.device)[None, :]
    visible = (u >= i) & (u < i + w) & ~key_pad[:, None, :, None, :]
    lse, o = _partial_dropout(q_seg, k_win, v_win, visible, scale, p)
    return lse.reshape(B, H, -1)[:, :, :N], o.reshape(B, H, -1, D)[:, :, :N]


def attend_projected_torch(q, k, v, kg, vg, *, window, causal, chunk, rank, key_padding_mask, scale,
                           dropout_p=0.0):
    """Blocked long-short attention over window keys k, v (already normalised) and projected
    vectors kg, vg (B, H, G, D, already normalised). Shapes and rules as ``ls_attention``.

    dropout_p > 0 applies dropout to the attention probabilities (as ``nn.Dropout`` on the
    softmax output); the causal projected part is then scored at once, (N, G) per head,
    instead of in checkpointed query groups.
    """
    B, H, N, D = q.shape
    pad = _pad_or_none(key_padding_mask, B, N, q.device)
    gvis = projected_visibility(key_padding_mask, B, N, rank, causal=causal, chunk=chunk, device=q.device)
    G = kg.shape[2]
    if key_padding_mask is not None:  # what padded positions and invisible projected vectors hold never matters
        q, k, v = (x if blocked.all_finite(x) else blocked.zero_padded(x, pad) for x in (q, k, v))
        kg, vg = (x if blocked.all_finite(x) else x.masked_fill(~gvis[:, None, :, None], 0.0) for x in (kg, vg))
    # contiguous: under torch.compile, a zero-width F.pad of a strided view keeps its strides at run
    # time while the traced graph assumes a contiguous result
    q = q.contiguous()
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    kg, vg = kg.to(q.dtype).contiguous(), vg.to(q.dtype).contiguous()
    parts = []
    if G > 0:
        if not causal:
            visible = gvis[:, None, None, :]
            parts.append(_partial_dropout(q, kg, vg, visible, scale, dropout_p) if dropout_p > 0
                         else blocked._partial(q, kg, vg, visible, scale))
        elif dropout_p > 0:
            t = torch.arange(N, device=q.device)[:, None]
            key_chunk = torch.arange(G, device=q.device) // rank
            visible = (key_chunk[None, :] < t // chunk) & gvis[:, None, None, :]
            parts.append(_partial_dropout(q, kg, vg, visible, scale, dropout_p))
        else:
            chunk_valid = gvis[:, ::rank]
            parts.append(blocked._global_causal(q, kg, vg, chunk_valid, chunk, rank, scale))
    if window > 0:
        if dropout_p > 0:
            local = _local_causal_dropout if causal else _local_bidirectional_dropout
            parts.append(local(q, k, v, pad, window, scale, dropout_p))
        else:
            local = blocked._local_causal if causal else blocked._local_bidirectional
            parts.append(local(q, k, v, pad, window, scale))
    if not parts:  # nothing visible to anyone
        return torch.zeros_like(q)
    out = blocked._merge(parts).masked_fill(pad[:, None, :, None], 0.0)
    return out.to(q.dtype)
