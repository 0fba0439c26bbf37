"""Host-side tensor rules both backends and the layers share: LayerNorm over D (and the layers' LayerNorm over
the model dim), the softmax over visible entries, which projected vectors a padding mask leaves visible, and
how padded rows are neutralised."""
import torch
import torch.nn.functional as F

from .config import acc_dtype


def layer_norm(x, ln, eps):
    """LayerNorm over the last dim of x (B, H, ..., D); ln = (weight, bias) of (D,) or (H, D); None = identity."""
    if ln is None:
        return x
    D = x.shape[-1]
    weight, bias = ln
    if weight.dim() == 1:
        return F.layer_norm(x, (D,), weight.to(x.dtype), bias.to(x.dtype), eps=eps)
    shape = (1, weight.shape[0]) + (1,) * (x.dim() - 3) + (D,)
    return F.layer_norm(x, (D,), eps=eps) * weight.to(x.dtype).view(shape) + bias.to(x.dtype).view(shape)


def model_layer_norm(x, ln, eps):
    """LayerNorm over the last dim E of x (..., E) with ln = (weight, bias) of (E,), statistics in fp32 (fp64
    for fp64), under no autocast: the official code's LayerNorm(H * D) on the keys and values before the head
    split."""
    w, b = ln
    acc = acc_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(acc), (x.shape[-1],), w.to(acc), b.to(acc), eps)


def merged_heads_layer_norm(t, ln, eps):
    """LayerNorm with ln = (weight, bias) of (E,) over the E = H * D channels of each position of t (B, H, G, D):
    the official LayerNorm(E) of the heads merged, computed in place of the merge (fp32 statistics)."""
    w, b = ln
    acc = acc_dtype(t.dtype)
    shape = (1, t.shape[1], 1, t.shape[3])
    t = t.to(acc)
    mean = t.mean(dim=(1, 3), keepdim=True)
    var = (t - mean).square().mean(dim=(1, 3), keepdim=True)
    return (t - mean) * torch.rsqrt(var + eps) * w.to(acc).view(shape) + b.to(acc).view(shape)


def masked_softmax(x, visible, dim):
    """Softmax over visible entries; a slice with nothing visible gives zeros (not NaN)."""
    any_visible = visible.any(dim, keepdim=True)
    x = x.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    return torch.softmax(x, dim) * any_visible


def projected_visibility(key_padding_mask, B, N, rank, *, causal=False, chunk=16, device=None):
    """(B, G) bool: projected vector g comes from a sequence (bidirectional) or chunk (causal) holding at
    least one real token. G = rank (bidirectional) or (N // chunk) * rank (causal, chunk-major)."""
    if key_padding_mask is None:
        n = rank * (N // chunk if causal else 1)
        return torch.ones(B, n, dtype=torch.bool, device=device)
    real = ~key_padding_mask
    if causal:
        nc = N // chunk
        real = real[:, :nc * chunk].reshape(B, nc, chunk)
        return real.any(-1).repeat_interleave(rank, dim=1)
    return real.any(-1, keepdim=True).expand(B, rank)


def given_visibility(cfg, gvis, pad, B, N, NG, device):
    """(B, NG) bool: which of NG given projected vectors the queries may see: gvis where the caller says; all
    of them for a shard of a longer sequence (cfg offsets: its padding cannot tell); else from the padding
    (B, N) of the sequence they were projected from."""
    if gvis is not None:
        return gvis
    if cfg.query_offset is not None or cfg.chunk_offset is not None:
        return torch.ones(B, NG, dtype=torch.bool, device=device)
    return projected_visibility(pad, B, N, cfg.rank, causal=cfg.causal, chunk=cfg.chunk, device=device)


def all_finite(x):
    """Whether x holds no inf or NaN, by one reduction (no boolean copy of x). A sum that overflows answers
    False, and so does a call while torch.compile traces (there is no data to look at): either only sends
    the caller down its slower path that is exact for any values."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch.isfinite(x.sum(dtype=acc_dtype(x.dtype))))


def zero_padded_unless_finite(x, pad):
    """x (B, H, N, ...) with the rows of padded positions (pad (B, N), True = padding) set to 0 when x holds
    inf or NaN anywhere (else x itself: zeros at padding matter only against 0 * NaN)."""
    if all_finite(x):
        return x
    return x.masked_fill(pad.reshape(pad.shape[0], 1, pad.shape[1], *(1,) * (x.dim() - 3)), 0.0)


class _GatherRows(torch.autograd.Function):
    """table[index] with a backward that needs no atomic adds: each row's gradient is the sum, in a fixed order,
    of the entries that read it (gathered into a (rows, most readers) block padded with zeros, then summed)."""

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        flat = index.reshape(-1)
        g = grad.reshape(flat.numel(), -1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=ctx.rows)
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max()) if flat.numel() else 0
        slot = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # rank among its row's readers
        readers = torch.full((ctx.rows, max(width, 1)), flat.numel(), dtype=torch.long, device=flat.device)
        readers[flat[order], slot] = order
        g = torch.cat([g, g.new_zeros(1, g.shape[1])])  # the padding reads a zero row
        return g[readers].sum(1).reshape(ctx.rows, *grad.shape[index.dim():]), None


def gather_rows(table, index):
    """table[index] (rows of table picked by an integer tensor of any shape), differentiable in table with a
    deterministic backward."""
    return _GatherRows.apply(table, index)
