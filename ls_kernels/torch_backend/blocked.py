"""Blocked PyTorch path of long-short attention (``backend="torch"``).

Memory grows linearly in N: queries are cut into segments and each segment is
scored only against its window keys, plus the projected keys. Bidirectional
windows are a strided ``unfold`` view of the keys; causal ones are two key blocks
per segment of w queries (the segment's own keys and the previous segment's),
reshapes of k and v. The window part and the projected part are partial
softmaxes, each returning (row logsumexp, normalised output), merged exactly into
ONE softmax at the end, as split-KV attention kernels do: each output weighted by
exp(its logsumexp - the union's). Row maxima used for stability are detached: the
result does not depend on them, so gradients are exact. Dropout on the attention
probabilities drops terms of each partial's output while its logsumexp counts them
all, so the merged output is sum_j dropout(a_j) v_j.

LayerNorm, softmax statistics, the products (fp16/bf16 accumulate in fp32, as the
kernels do) and the merge run in fp32 (fp64 for fp64 inputs). Differentiable by autograd.

On CPU with fp32 or fp64 inputs each partial softmax runs in ATen's fused CPU
flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, with a
-inf bias as mask), which never materializes the scores and reads the windows in
place. Elsewhere (CUDA: the unfused baseline; fp16/bf16; dropout) the scores are
materialized by matmuls; ``Options(fused_cpu=False)`` uses that path on CPU too.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..common import all_finite, given_visibility, layer_norm, masked_softmax, zero_padded_unless_finite
from ..config import LSConfig, acc_dtype, half_width

_HAS_FUSED_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


@dataclass(frozen=True)
class Options:
    """How the blocked path computes (not what): fused_cpu: partial softmaxes in ATen's fused CPU kernel where
    it applies; dropout_p: dropout on the attention probabilities; causal_global_elems: causal projected-key
    scores scored at once (larger inputs are cut into query groups, checkpointed under autograd so memory
    stays linear in N); causal_global_group: at most this many queries per such group."""
    fused_cpu: bool = _HAS_FUSED_CPU
    dropout_p: float = 0.0
    causal_global_elems: int = 1 << 25
    causal_global_group: int = 1024


DEFAULT = Options()


def _fused(q, opts):
    return (opts.fused_cpu and _HAS_FUSED_CPU and opts.dropout_p == 0 and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64))


class _FlashCPU(torch.autograd.Function):
    """(o, lse) of ATen's CPU flash attention with an additive bias, differentiable in both.

    The ATen backward takes no gradient for lse; it enters through delta = rowsum(dO * O),
    the only use of O there: dS = P * (dP - delta + dlse), so O is passed shifted by
    dlse * dO / |dO|^2 (rows with dO = 0 get dlse = 0 from the merge)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        # the kernel reads rows as if their last stride were 1
        q, k, v, bias = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, bias))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, o, lse)
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, bias, o, lse = ctx.saved_tensors
        do = do.contiguous()
        if dlse is not None:
            norm = (do * do).sum(-1, keepdim=True)
            o = o - torch.where(norm > 0, dlse[..., None] / norm, 0.0) * do
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
        return dq, dk, dv, None, None


def _foldable(x, n):
    """Whether the first n dims of x merge into one without a copy."""
    dims = [(size, st) for size, st in zip(x.shape[:n], x.stride()[:n]) if size != 1]
    return all(a == b * size for (_, a), (size, b) in zip(dims, dims[1:]))


def _partial_fused(q, k, v, visible, scale):
    """``_partial`` by the fused CPU kernel, with a -inf bias where ``visible`` is False.

    The kernel takes (batch, heads, L, D) and lays its gradients out as (batch, L, heads, D): with
    many heads their rows are far apart in memory and its backward runs 2-3x slower. So calls fold
    all leading dims into the batch, with one head, where that needs no copy of any input (bias
    included); else all but the last (overlapping windows, a mask per segment); else they go one
    index of dim 0 at a time."""
    lead, M, K = q.shape[:-2], q.shape[-2], k.shape[-2]
    visible = visible.reshape((1,) * (q.dim() - visible.dim()) + visible.shape)
    visible = visible.expand(*visible.shape[:-1], K)
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    bias = bias.expand(*lead, M, K)
    for n_batch, heads in ((len(lead), 1), (len(lead) - 1, lead[-1])):
        if all(_foldable(x, n_batch) for x in (q, k, v, bias)):
            return _fused_call(q, k, v, bias, visible.any(-1), scale, heads)
    if lead[0] == 1:  # squeeze, not select: its backward is a view
        return tuple(x[None] for x in _partial_fused(q[0], k[0], v[0], visible[0], scale))
    vis = visible.expand(lead[0], *visible.shape[1:]).unbind(0)  # unbind: its backward is one stack
    parts = [_partial_fused(*x, scale) for x in zip(q.unbind(0), k.unbind(0), v.unbind(0), vis)]
    return tuple(torch.stack(x) for x in zip(*parts))


def _fused_call(q, k, v, bias, seen, scale, heads):
    """One call of the fused kernel on (..., L, D) inputs folded to (n, heads, L, D); bias (..., M, K) with
    -inf for hidden keys; seen broadcasts to (..., M): rows that see a key. Returns (lse, o)."""
    lead, M = q.shape[:-2], q.shape[-2]
    fold = lambda x: x.reshape(-1, heads, *x.shape[-2:])  # noqa: E731
    o, lse = _FlashCPU.apply(fold(q), fold(k), fold(v), fold(bias), scale)
    # the kernel gives lse = 0 to rows that see nothing (and o = 0): their weight in a merge must be 0
    return torch.where(seen, lse.reshape(*lead, M), float("-inf")), o.reshape(*lead, M, -1)


def _partial(q, k, v, visible, scale, opts, bias=None):
    """One partial softmax. q [..., M, D], k and v [..., K, D], visible broadcasts to [..., M, K]; bias:
    None or added to the scaled scores, broadcasting to [..., M, K] (differentiable).

    Returns the row logsumexp [..., M] (-inf for rows that see nothing) and the normalised
    output [..., M, D] (0 there), in the accumulation dtype; with dropout, the output sums
    the kept probabilities, rescaled, over the normaliser of them all.
    """
    # the fused kernel divides by zero on empty inputs (and needs finite keys: ``attention`` turns it off); its
    # backward gives no bias gradient
    if _fused(q, opts) and q.numel() > 0 and k.shape[-2] > 0 and bias is None:
        return _partial_fused(q, k, v, visible, scale)
    acc = acc_dtype(q.dtype)
    # fp16/bf16 products accumulate in fp32, as in the kernels: fp16 scores or sums of p @ v can overflow
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))  # [..., M, K]
    s.mul_(scale)
    if bias is not None:
        s = s + bias.to(acc)
    s.masked_fill_(~visible, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing
    p = s.sub_(m).exp_()  # [..., M, K]
    z = p.sum(-1, keepdim=True)  # [..., M, 1], 0 for rows that see nothing
    z_safe = torch.where(z > 0, z, 1.0)
    if opts.dropout_p > 0:
        p = F.dropout(p, opts.dropout_p, training=True)
    o = torch.matmul(p.to(v.dtype).to(acc), v.to(acc)) / z_safe  # [..., M, D], p rounded as the kernels do
    return torch.where(z > 0, m + torch.log(z_safe), float("-inf")).squeeze(-1), o


def _combine(parts):
    """Partial softmaxes (lse, o) over disjoint key sets -> (lse, o) over their union. Rows that see
    nothing anywhere get lse = -inf and o = 0, with finite gradients."""
    m = parts[0][0].detach()
    for lse_i, _ in parts[1:]:
        m = torch.maximum(m, lse_i.detach())
    m = torch.where(torch.isfinite(m), m, 0.0)
    w = [torch.exp(lse_i - m) for lse_i, _ in parts]  # [..., M]
    z = w[0]
    for w_i in w[1:]:
        z = z + w_i
    z_safe = torch.where(z > 0, z, 1.0)
    o = None
    for (_, o_i), w_i in zip(parts, w):
        c = (w_i / z_safe)[..., None]
        if o is None:
            o = o_i * c
        elif torch.is_grad_enabled():
            o = o + o_i * c
        else:  # in place: one (B, H, N, D) buffer less
            o.addcmul_(o_i, c)
    return torch.where(z > 0, m + torch.log(z_safe), float("-inf")), o


def _merge(parts):
    """The output of one softmax over the union of the partials' key sets."""
    return _combine(parts)[1] if len(parts) > 1 else parts[0][1]


def _segments(x, seg, n_seg):
    """(B, H, N, D) -> (B, H, n_seg, seg, D), zero-padding the tail (a view when there is none)."""
    B, H, N, D = x.shape
    return (F.pad(x, (0, 0, 0, n_seg * seg - N)) if n_seg * seg > N else x).reshape(B, H, n_seg, seg, D)


def _windows(x, left, right, size, step):
    """Overlapping windows along dim 2 of (B, H, N, D): (B, H, n_win, size, D), a view of x when unpadded."""
    return (F.pad(x, (0, 0, left, right)) if left or right else x).unfold(2, size, step).transpose(-1, -2)


def _local_bidirectional(q, k, v, pad, w, scale, opts):
    B, H, N, D = q.shape
    n_seg = -(-N // w)
    if n_seg == 1:  # w >= N: every query's window covers the whole sequence
        return _partial(q, k, v, ~pad[:, None, None, :], scale, opts)
    e = half_width(w)
    size, tail = w + 2 * e, n_seg * w - N
    q_seg = _segments(q, w, n_seg)  # (B, H, S, w, D)
    k_win = _windows(k, e, tail + e, size, w)  # (B, H, S, w + 2e, D)
    v_win = _windows(v, e, tail + e, size, w)
    key_pad = F.pad(pad, (e, tail + e), value=True).unfold(1, size, w)  # (B, S, w + 2e)
    lse, o = _partial(q_seg, k_win, v_win, ~key_pad[:, None, :, None, :], scale, opts)
    return lse.reshape(B, H, -1)[:, :, :N], o.reshape(B, H, -1, D)[:, :, :N]


def _local_causal(q, k, v, pad, w, scale, opts):
    """Causal windows in segments of w queries: query i of a segment sees keys i - w + 1 .. i, that is
    keys 0 .. i of its own segment and keys i + 1 .. w - 1 of the previous one. Two partial softmaxes
    over key blocks that are plain reshapes of k and v (no overlapping windows, whose gradients would
    be materialized once per window), merged; the tail is zero-padded to a whole segment (its real
    queries only see real keys of their own segment)."""
    B, H, N, D = q.shape
    w = min(w, N)  # a window longer than the sequence is plain causal attention
    S = -(-N // w)
    q_seg, k_seg, v_seg = (_segments(x, w, S) for x in (q, k, v))  # (B, H, S, w, D)
    i = torch.arange(w, device=q.device)
    own, prev = i[None, :] <= i[:, None], i[None, :] > i[:, None]  # (w, w): [query, key]
    if torch.compiler.is_compiling() or pad.any():  # key padding: a mask per sequence (traced: always)
        key_ok = ~F.pad(pad, (0, S * w - N), value=True).reshape(B, 1, S, 1, w)
        own, prev = own & key_ok, prev & key_ok[:, :, :-1]
    lse, o = _partial(q_seg, k_seg, v_seg, own, scale, opts)
    if S > 1:  # segments 1 .. S - 1 over the keys of segments 0 .. S - 2
        later = _combine([(lse[:, :, 1:], o[:, :, 1:]),
                          _partial(q_seg[:, :, 1:], k_seg[:, :, :-1], v_seg[:, :, :-1], prev, scale, opts)])
        lse, o = (torch.cat([x[:, :, :1], y], 2) for x, y in zip((lse, o), later))
    return lse.reshape(B, H, -1)[:, :, :N], o.reshape(B, H, -1, D)[:, :, :N]


def project(proj, k_src, v_src, pad, *, causal, chunk, ln_global=None, eps=1e-5):
    """The dynamic projection: proj (B, H, N, r) logits, k_src, v_src (B, H, N, D) what it reads, pad (B, N).

    Returns kg, vg (B, H, NG, D) = LN_G(P^T k_src), LN_G(P^T v_src), P the softmax of proj over the N
    positions (bidirectional, NG = r) or over each full chunk (causal, NG = (N // chunk) * r, chunk-major),
    in k_src's dtype, and (B, NG) bool: the vector's sequence or chunk has a real token.
    """
    B, H, N, D = k_src.shape
    r = proj.shape[-1]
    groups, size = (1, N) if not causal else (N // chunk, chunk)
    n = groups * size
    valid = ~pad[:, :n].reshape(B, 1, groups, size, 1)
    P = masked_softmax(proj[:, :, :n].to(k_src.dtype).reshape(B, H, groups, size, r), valid, dim=3)
    k_g = layer_norm(P.transpose(-1, -2) @ k_src[:, :, :n].reshape(B, H, groups, size, D), ln_global, eps)
    v_g = layer_norm(P.transpose(-1, -2) @ v_src[:, :, :n].reshape(B, H, groups, size, D), ln_global, eps)
    seen = valid.reshape(B, groups, size).any(-1).repeat_interleave(r, dim=1)
    return k_g.reshape(B, H, groups * r, D), v_g.reshape(B, H, groups * r, D), seen


def _causal_global_group(q, k_g, v_g, chunk_valid, start, chunk, r, scale, opts, shared=None):
    """Partial softmax of the queries at positions start .. start + len(q) over the chunks strictly before
    theirs: the chunks before the first query's, seen by all of them, and the later ones, seen by the later
    queries.

    shared (fused path, no padded chunk, start a multiple of chunk): a bias buffer whose columns are nc * r
    zeros followed by the block-causal pattern of a group's own chunks; every group's bias is a view of it."""
    G = q.shape[2]
    c0, c1 = start // chunk, min(chunk_valid.shape[1], (start + G - 1) // chunk)
    if shared is not None and c1 > 0:  # one call over chunks 0 .. c1 - 1
        off = chunk_valid.shape[1] * r - c0 * r
        bias = shared[:G, off:off + c1 * r]
        seen = torch.arange(G, device=q.device) >= (chunk if c0 == 0 else 0)  # the first chunk sees nothing
        return _fused_call(q, k_g[:, :, :c1 * r], v_g[:, :, :c1 * r], bias.expand(*q.shape[:2], *bias.shape), seen,
                           scale, heads=1)
    parts = []
    if c0 > 0:
        parts.append(_partial(q, k_g[:, :, :c0 * r], v_g[:, :, :c0 * r],
                              chunk_valid[:, None, None, :c0].repeat_interleave(r, -1), scale, opts))
    if c1 > c0:
        t = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
        key_chunk = torch.arange(c0 * r, c1 * r, device=q.device) // r
        visible = (key_chunk[None, :] < t // chunk) & chunk_valid[:, None, None, key_chunk]  # (B, 1, G, K)
        parts.append(_partial(q, k_g[:, :, c0 * r:c1 * r], v_g[:, :, c0 * r:c1 * r], visible, scale, opts))
    if not parts:  # queries of the first chunk see no projected vector: zeros, still in the autograd graph
        parts.append(_partial(q, k_g[:, :, :r], v_g[:, :, :r], chunk_valid[:, None, None, :0].any(-1, keepdim=True),
                              scale, opts))
    return _combine(parts) if len(parts) > 1 else parts[0]


def global_causal(q, k_g, v_g, chunk_valid, chunk, r, scale, opts=DEFAULT, first=0):
    """Partial softmax of every query over the projected vectors (B, H, nc * r, D) of the chunks before its
    own; chunk_valid (B, nc): chunks with a real token; the queries sit at positions first, first + 1, ...
    Returns (lse, o) as _partial."""
    B, H, N, D = q.shape
    nc = chunk_valid.shape[1]
    group = min(opts.causal_global_elems // max(B * H * nc * r, 1), opts.causal_global_group)
    group = max(chunk, group // chunk * chunk)
    # the matmul path materializes each group's scores: recompute them in the backward (the same dropout
    # masks: checkpoint restores the random state)
    use_ckpt = not _fused(q, opts) and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_g, v_g))
    shared = None
    if _fused(q, opts) and bool(chunk_valid.all()) and first % chunk == 0:  # its pattern starts at a chunk
        t = torch.arange(group, device=q.device)[:, None]
        own = torch.arange(group // chunk * r, device=q.device)[None, :] // r < t // chunk
        shared = torch.zeros(group, (nc + group // chunk) * r, dtype=q.dtype, device=q.device)
        shared[:, nc * r:].masked_fill_(~own, float("-inf"))
    parts = []
    for start in range(0, N, group):
        args = (q[:, :, start:start + group], k_g, v_g, chunk_valid, first + start, chunk, r, scale, opts)
        parts.append(checkpoint(_causal_global_group, *args, use_reentrant=False) if use_ckpt
                     else _causal_global_group(*args, shared=shared))
    return tuple(torch.cat([p[i] for p in parts], dim=2) for i in range(2))


def _window_span(cfg, q_off, N, Nk):
    """[lo, hi): the keys the windows of queries at key positions q_off .. q_off + N - 1 may hold, lo a whole
    segment of w from the frame's start when bidirectional (segments stay where they are)."""
    w = cfg.window
    if cfg.causal:
        return max(q_off - w + 1, 0), min(q_off + N, Nk)
    e = half_width(w)
    return max(q_off - e, 0) // w * w, min(((q_off + N - 1) // w + 1) * w + e, Nk)


def attention(q, k, v, *, cfg: LSConfig, proj=None, kg=None, vg=None, ln_local=None, ln_global=None, pad=None,
              gvis=None, opts=DEFAULT):
    """Blocked long-short attention of validated inputs, in q's dtype.

    q, k, v (B, H, N, D); proj (B, H, N, r): the projection runs here (LN_L when cfg.project_after_ln, then
    LN_G); or kg, vg (B, H, NG, D): projected keys and values as given (NG = cfg.num_projected(N)); or
    neither: window only. ln_local, ln_global: (weight, bias) of (D,) or (H, D), or None; pad (B, N) bool.

    Keys beyond the queries, or a shard of a longer sequence (cfg offsets): k, v, proj and pad over Nk >= N
    positions, query row i at key position i + query_offset and at chunk position i + chunk_offset (both
    Nk - N by default); gvis (B, NG) bool: which of the given projected vectors may be seen.
    """
    B, H, N, D = q.shape
    Nk = k.shape[2]
    acc = acc_dtype(q.dtype)
    q_off, c_off = cfg.offsets(N, Nk)
    mask = torch.zeros(B, Nk, dtype=torch.bool, device=q.device) if pad is None else pad
    q_pad = mask[:, q_off:q_off + N]  # the queries' own padding
    if pad is not None:  # what padded positions hold never matters (0 * NaN would)
        q = zero_padded_unless_finite(q, q_pad)
        k, v = (zero_padded_unless_finite(x, mask) for x in (k, v))
    k_loc, v_loc = layer_norm(k.to(acc), ln_local, cfg.eps), layer_norm(v.to(acc), ln_local, cfg.eps)
    if proj is not None:
        k_src, v_src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
        kg, vg, seen = project(proj, k_src, v_src, mask, causal=cfg.causal, chunk=cfg.chunk, ln_global=ln_global,
                               eps=cfg.eps)
    elif kg is not None:
        seen = given_visibility(cfg, gvis, pad, B, Nk, kg.shape[2], q.device)
        kg, vg = (x if all_finite(x) else x.masked_fill(~seen[:, None, :, None], 0.0) for x in (kg, vg))
    if _fused(q, opts) and not (all_finite(k_loc) and (kg is None or all_finite(kg))):
        # the fused kernel gives rows whose every score is -inf (an infinite key) lse = 0 instead of -inf
        opts = replace(opts, fused_cpu=False)
    parts = []
    if kg is not None and kg.shape[2] > 0:
        kg, vg = kg.to(q.dtype), vg.to(q.dtype)
        if not cfg.causal:
            parts.append(_partial(q, kg, vg, seen[:, None, None, :], cfg.scale, opts))
        else:
            parts.append(global_causal(q, kg, vg, seen[:, ::cfg.rank], cfg.chunk, cfg.rank, cfg.scale, opts,
                                       first=c_off))
    if cfg.window > 0:  # over the keys the queries' windows may hold, the queries padded with zero rows across them
        lo, hi = _window_span(cfg, q_off, N, Nk)
        before, after = q_off - lo, hi - q_off - N
        q_win = q if before == after == 0 else torch.cat([q.new_zeros(B, H, before, D), q,
                                                          q.new_zeros(B, H, after, D)], dim=2)
        local = _local_causal if cfg.causal else _local_bidirectional
        lse, o = local(q_win, k_loc[:, :, lo:hi].to(q.dtype), v_loc[:, :, lo:hi].to(q.dtype), mask[:, lo:hi],
                       cfg.window, cfg.scale, opts)
        parts.append((lse[:, :, before:before + N], o[:, :, before:before + N]))
    if not parts:  # causal projection-only with no full chunk: nothing is visible (zeros, still in the graph)
        return torch.where(torch.zeros_like(q_pad)[:, None, :, None], q, 0.0)
    out = _merge(parts)
    if pad is not None:
        out = out.masked_fill(q_pad[:, None, :, None], 0.0)
    return out.to(q.dtype)
