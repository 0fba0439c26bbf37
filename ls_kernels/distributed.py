"""Context parallelism: one sequence split into contiguous shards across the processes of a torch.distributed
group, each computing the rows of its own queries, exactly as one process would on the whole sequence.

Long-short attention needs little of the other shards:

- bidirectional: a halo of e = max(w // 2, 1) window keys and values at each edge of the shard, from the
  neighbours; and the projection, a softmax over all positions, from per-shard partials (the max of each of
  the r logit columns, the sums of exponentials, the r x D weighted sums of keys and values) merged with one
  all-reduce of the maxima and one of the rescaled sums: r (2 D + 1) numbers per sequence and head;
- causal: the w - 1 window keys and values before the shard, from the left neighbour; and the projected
  vectors of the finished chunks of the shards before it (an all-gather of r / l of the keys' and values'
  volume).

Gradients go back the same ways (the halo's to its owners, the merged sums' all-reduced). Every collective is
a torch.distributed call inside an autograd Function, so the same code runs on NCCL and gloo.
"""
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.autograd import Function

from . import ops, torch_backend
from .checks import check_attention, check_shard_lengths
from .common import layer_norm
from .config import LSConfig, acc_dtype, clamp_window, half_width


# ----------------------------------------------------------------------------- autograd-aware collectives

def _exchange(to_left, to_right, group):
    """Every rank sends to_left to the previous rank and to_right to the next one (None: no rank sends that
    way); returns (from_left, from_right): what the previous and the next rank sent (shaped like to_right and
    to_left; zeros at the sequence's ends, None where no rank sends)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    peer = lambda r: r if group is None else dist.get_global_rank(group, r)  # noqa: E731
    reqs = []
    from_left = None if to_right is None else torch.zeros_like(to_right)
    from_right = None if to_left is None else torch.zeros_like(to_left)
    if to_right is not None:
        if rank < size - 1:
            reqs.append(dist.isend(to_right.contiguous(), peer(rank + 1), group=group))
        if rank > 0:
            reqs.append(dist.irecv(from_left, peer(rank - 1), group=group))
    if to_left is not None:
        if rank > 0:
            reqs.append(dist.isend(to_left.contiguous(), peer(rank - 1), group=group))
        if rank < size - 1:
            reqs.append(dist.irecv(from_right, peer(rank + 1), group=group))
    for req in reqs:
        req.wait()
    return from_left, from_right


class _Halo(Function):
    """(from_left, from_right) = _exchange(to_left, to_right): rows from the neighbours. Backward: each
    received row's gradient goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, to_left, to_right, group):
        ctx.group = group
        got = _exchange(to_left, to_right, group)
        ctx.like = [None if x is None else (x.shape, x.dtype, x.device) for x in got]  # zeros for unused outputs
        return got

    @staticmethod
    def backward(ctx, g_from_left, g_from_right):
        # my from_left came from the previous rank's to_right: its gradient goes back left, and so on
        back = [torch.zeros(like[0], dtype=like[1], device=like[2]) if g is None and like is not None else g
                for g, like in zip((g_from_left, g_from_right), ctx.like)]
        grad_to_left, grad_to_right = _exchange(back[0], back[1], ctx.group)
        return grad_to_left, grad_to_right, None


class _AllReduceSum(Function):
    """The sum over the group; the gradient of each rank's input is the sum of the ranks' output gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _AllGatherRows(Function):
    """x (B, H, n_rank, D) of every rank, n_rank given by counts (the same list on every rank), concatenated
    in rank order along dim 2. Backward: the summed gradient's own rows."""

    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.group, ctx.counts = group, counts
        return _gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.counts[:rank])
        return g[:, :, start:start + ctx.counts[rank]], None, None


def _gather_rows(x, counts, group):
    """The concatenation in rank order along dim 2 of every rank's x (n_rank = counts[rank] rows), no grad."""
    most = max(counts)
    padded = torch.zeros(*x.shape[:2], most, *x.shape[3:], dtype=x.dtype, device=x.device)
    padded[:, :, :x.shape[2]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :, :n] for p, n in zip(parts, counts)], dim=2)


def shard_lengths(n, device, group):
    """Every rank's shard length, in rank order (one small all-gather)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [int(x) for x in every]


# ----------------------------------------------------------------------------- the projection, sharded

def _projection_bidirectional(proj, k_src, v_src, pad, norm_global, group):
    """Projected keys and values (B, H, r, D) of the whole sequence from this shard's proj (B, H, n, r) and
    k_src, v_src (B, H, n, D) (accumulation dtype), pad (B, n): the softmax over every position of every shard,
    merged from per-shard partials; and (B, r) bool: the sequence has a real token."""
    acc = k_src.dtype
    logits = proj.to(acc).masked_fill(pad[:, None, :, None], float("-inf"))
    top = logits.detach().amax(dim=2)  # (B, H, r): the stabiliser needs no gradient
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, 0.0)
    a = torch.exp(logits - top[:, :, None, :])  # (B, H, n, r), zero at padding
    sums = torch.cat([a.sum(dim=2)[..., None], a.transpose(-1, -2) @ k_src, a.transpose(-1, -2) @ v_src], dim=-1)
    sums = _AllReduceSum.apply(sums, group)  # (B, H, r, 2 D + 1)
    D = k_src.shape[-1]
    z = sums[..., :1]
    seen = z[:, 0, :, 0] > 0
    z = torch.where(z > 0, z, 1.0)
    return norm_global(sums[..., 1:D + 1] / z), norm_global(sums[..., D + 1:] / z), seen


def _projection_causal(proj, k_src, v_src, pad, norm_global, chunk, lengths, group):
    """Projected keys and values (B, H, G, D) of every finished chunk of the whole sequence, chunk-major (this
    shard's own computed here, the others' gathered), and (B, G) bool: the chunk has a real token."""
    kg, vg, seen = torch_backend.project(proj.to(k_src.dtype), k_src, v_src, pad, causal=True, chunk=chunk)
    kg, vg = norm_global(kg), norm_global(vg)
    r = proj.shape[-1]
    counts = [(n // chunk) * r for n in lengths]
    kg, vg = _AllGatherRows.apply(kg, counts, group), _AllGatherRows.apply(vg, counts, group)
    seen = _gather_rows(seen[:, None, :, None].to(torch.int8), counts, group)[:, 0, :, 0] != 0
    return kg, vg, seen


# ----------------------------------------------------------------------------- the attention of a shard

def _window_keys(k_loc, v_loc, pad, cfg, group):
    """(keys, values, pad, query offset): this shard's window keys with their halos. Bidirectional: w - e
    padding rows, the left neighbour's last e keys, the shard, the right neighbour's first e (the key frame
    then starts a whole segment before the shard); causal: the left neighbour's last w - 1 keys, the shard."""
    B, H, n, D = k_loc.shape

    def pack(lo, hi):  # rows lo .. hi - 1 as they travel: key, value and a 1 for a real position
        keep = (~pad[:, lo:hi]).to(k_loc.dtype)[:, None, :, None].expand(B, H, hi - lo, 1)
        return torch.cat([k_loc[:, :, lo:hi], v_loc[:, :, lo:hi], keep], dim=-1)

    def unpack(rows):  # (keys, values, padding)
        return rows[..., :D], rows[..., D:2 * D], rows[:, 0, :, -1].detach() == 0

    if cfg.causal:
        h = cfg.window - 1
        if h == 0:
            return k_loc, v_loc, pad, 0
        tail = pack(max(n - h, 0), n)
        if n < h:  # the last shard, whose rows go nowhere: the same shape as everyone's
            tail = torch.cat([tail.new_zeros(B, H, h - n, 2 * D + 1), tail], dim=2)
        left, _ = _Halo.apply(None, tail, group)
        parts, q_off = [unpack(left), (k_loc, v_loc, pad)], h
    else:
        e = half_width(cfg.window)
        left, right = _Halo.apply(pack(0, e), pack(n - e, n), group)
        lead = k_loc.new_zeros(B, H, cfg.window - e, 2 * D + 1)  # padding: the frame starts at a segment
        parts, q_off = [unpack(lead), unpack(left), (k_loc, v_loc, pad), unpack(right)], cfg.window
    keys, values, key_pad = (torch.cat([p[i] for p in parts], dim=2 if i < 2 else 1) for i in range(3))
    return keys, values, key_pad, q_off


def cp_attention(q, k, v, proj, *, cfg: LSConfig, norm_local, norm_global, pad, group, triton):
    """Context-parallel long-short attention of validated shards (see ``ls_attention_cp``), with LN_L and LN_G
    given as functions of (B, H, ., D) tensors in the accumulation dtype (the layer's model-wide LayerNorms are
    such functions). cfg: the call's settings, its window not yet clamped to the whole sequence."""
    B, H, n, D = q.shape
    acc = acc_dtype(q.dtype)
    lengths = shard_lengths(n, q.device, group)
    cfg = replace(cfg, window=clamp_window(cfg.window, sum(lengths)))  # any w >= N acts as w = N
    check_shard_lengths(lengths, window=cfg.window, causal=cfg.causal, chunk=cfg.chunk, rank=cfg.rank)
    rank = dist.get_rank(group)
    start = sum(lengths[:rank])
    pad = torch.zeros(B, n, dtype=torch.bool, device=q.device) if pad is None else pad
    k_loc, v_loc = norm_local(k.to(acc)), norm_local(v.to(acc))
    kg = vg = seen = None
    if cfg.rank > 0:
        src = (k_loc, v_loc) if cfg.project_after_ln else (k.to(acc), v.to(acc))
        src = [x.masked_fill(pad[:, None, :, None], 0.0) for x in src]  # what padded positions hold never matters
        if cfg.causal:
            kg, vg, seen = _projection_causal(proj, *src, pad, norm_global, cfg.chunk, lengths, group)
            upto = (start + n) // cfg.chunk * cfg.rank  # the chunks this shard's queries may see
            kg, vg, seen = kg[:, :, :upto], vg[:, :, :upto], seen[:, :upto]
        else:
            kg, vg, seen = _projection_bidirectional(proj, *src, pad, norm_global, group)
    if cfg.window > 0:
        kw, vw, key_pad, q_off = _window_keys(k_loc.to(q.dtype), v_loc.to(q.dtype), pad, cfg, group)
    else:
        kw, vw, key_pad, q_off = k_loc.to(q.dtype), v_loc.to(q.dtype), pad, 0
    if kg is None:
        kg = vg = q.new_zeros(B, H, 0, D)
        seen = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
    shard = LSConfig(window=cfg.window, causal=cfg.causal, chunk=cfg.chunk, rank=max(cfg.rank, 1), scale=cfg.scale,
                     query_offset=q_off, chunk_offset=start if cfg.causal else 0)
    kg, vg = kg.to(q.dtype), vg.to(q.dtype)
    if triton:
        return ops.projected_triton_fwd(q, kw, vw, kg, vg, key_pad, shard.window, shard.causal, shard.chunk,
                                        shard.rank, shard.scale, torch.is_grad_enabled(), seen, q_off,
                                        shard.chunk_offset)[0]
    with ops.no_autocast(q):
        return torch_backend.attention(q, kw, vw, cfg=shard, kg=kg, vg=vg, pad=key_pad, gvis=seen)


def ls_attention_cp(q, k, v, proj=None, *, group=None, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                    project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5, backend="auto"):
    """``ls_attention`` of a sequence split across the processes of a torch.distributed group.

    Each rank of ``group`` (default: the whole world) passes its contiguous shard of the sequence, in rank
    order, and gets the rows of its own queries: exactly those of one ``ls_attention`` call over the whole
    sequence (gradients too; the gradients of the LayerNorm parameters, shared by the shards, are each
    shard's part: sum them over the ranks, as data parallelism does).

    Args:
        q, k, v: (B, H, n, D) this rank's shard (n may differ between ranks).
        proj: (B, H, n, r) its projection logits, or None.
        key_padding_mask: (B, n) bool, True = padding, this shard's (a shard may be all padding).
        group: the process group (NCCL or gloo); None = the default group.
        window, causal, chunk, ln_local, ln_global, project_after_ln, scale, eps, backend: as ``ls_attention``.

    Shard lengths: bidirectional with w > 0, every shard but the last a multiple of w and at least
    max(w // 2, 1) long; causal, every shard but the last a multiple of ``chunk`` (with proj) and at least
    w - 1 long. Other lengths raise ValueError on every rank, naming them.

    Returns:
        (B, H, n, D) in q's dtype.
    """
    cfg, triton = check_attention(q, k, v, proj, window=window, causal=causal, chunk=chunk, ln_local=ln_local,
                                  ln_global=ln_global, project_after_ln=project_after_ln,
                                  key_padding_mask=key_padding_mask, scale=scale, eps=eps, backend=backend)
    cfg = replace(cfg, window=window or 0)  # check_attention clamped it to the shard: cp_attention clamps it
    return cp_attention(q, k, v, proj, cfg=cfg, norm_local=lambda t: layer_norm(t, ln_local, cfg.eps),
                        norm_global=lambda t: layer_norm(t, ln_global, cfg.eps), pad=key_padding_mask, group=group,
                        triton=triton)
