"""Checks of calls over part of a sequence: a decoding step against its cache (``ls_decode``), and the shard
lengths of a context-parallel call."""
from ..cache import LSCache, right_padding_lengths
from ..config import LSConfig, default_scale, half_width
from .attention import (_check_backend, _check_eps, _check_int, _check_ln, _check_mask, _check_proj, _check_qkv,
                        _check_scale, _check_window, _describe, use_triton)


def check_cache_fits(cache, q, *, window, chunk, rank):
    """The cache was made for q's (B, H, ., D), dtype and device, and for this window, chunk and rank."""
    B, H, _, D = q.shape
    got = dict(batch_size=cache.batch_size, num_heads=cache.num_heads, head_dim=cache.head_dim, dtype=cache.dtype,
               device=cache.device, window=cache.window, chunk=cache.chunk, rank=cache.rank)
    want = dict(batch_size=B, num_heads=H, head_dim=D, dtype=q.dtype, device=q.device, window=window, chunk=chunk,
                rank=rank)
    for name in want:
        if got[name] != want[name]:
            raise ValueError(f"cache was made for {name} = {got[name]}, but this call has {name} = {want[name]} "
                             f"(q {_describe(q)}, window {window}, chunk {chunk}, rank {rank})")


def _right_padded(key_padding_mask, B, T, device):
    """Real tokens per row (B,) of a right-padded mask (ValueError for any other padding)."""
    if key_padding_mask is not None:
        later = key_padding_mask.long().cummax(1).values.bool()  # padding from the first padded token on
        if (later != key_padding_mask).any():
            raise ValueError("key_padding_mask must mark right padding only (each row: real tokens, then "
                             "padding): a padded position never enters the cache")
    return right_padding_lengths(key_padding_mask, B, T, device)


def check_decode(q, k, v, proj, cache, *, window, chunk, ln_local, ln_global, project_after_ln, scale, eps,
                 key_padding_mask, backend):
    """Validate the arguments of ``ls_decode``; returns (its LSConfig, the real new tokens per sequence (B,))."""
    _check_qkv(q, k, v)
    B, H, T, D = q.shape
    if T == 0:
        raise ValueError(f"q must hold at least one new token (T >= 1), got {_describe(q)}")
    if not isinstance(cache, LSCache):
        raise ValueError(f"cache must be an LSCache (LongShortAttention.init_cache or LSCache.empty), "
                         f"got {type(cache).__name__}")
    window = _check_window(window)
    chunk = _check_int("chunk", chunk, 1)
    if window == 0 and proj is None:
        raise ValueError("window and proj are both absent (window=0, proj=None): nothing to attend to")
    if proj is not None:
        _check_proj(proj, k)
    rank = proj.shape[-1] if proj is not None else 0
    check_cache_fits(cache, q, window=window, chunk=chunk, rank=rank)
    _check_ln("ln_local", ln_local, H, D, q)
    _check_ln("ln_global", ln_global, H, D, q)
    _check_mask(key_padding_mask, q)
    n_new = _right_padded(key_padding_mask, B, T, q.device)
    _check_scale(scale)
    _check_backend(backend)
    use_triton(q, backend)  # raises where the kernels cannot run
    _check_eps(eps)
    cfg = LSConfig(window=window, causal=True, chunk=chunk, rank=rank,
                   scale=default_scale(D) if scale is None else float(scale), eps=float(eps),
                   project_after_ln=bool(project_after_ln))
    return cfg, n_new


def check_shard_lengths(lengths, *, window, causal, chunk, rank):
    """The shard lengths of a context-parallel call (every rank's, in rank order; the same list on every rank,
    so that every rank raises alike): bidirectional windows must not cross a shard boundary (every shard but
    the last a whole number of segments of w) and each shard holds the halo it sends (at least max(w // 2, 1));
    causal chunks must not cross one (every shard but the last a multiple of chunk) and the w - 1 keys before
    a shard come from one neighbour (every shard but the last at least w - 1)."""
    rules = []
    if min(lengths) < 1:
        rules.append("every shard must hold at least one position")
    head = lengths[:-1]
    if not causal and window > 0:
        if any(n % window for n in head):
            rules.append(f"every shard but the last must be a multiple of window = {window}")
        if min(lengths) < half_width(window):
            rules.append(f"every shard must hold at least max(window // 2, 1) = {half_width(window)} positions")
    if causal and rank > 0 and any(n % chunk for n in head):
        rules.append(f"every shard but the last must be a multiple of chunk = {chunk}")
    if causal and any(n < window - 1 for n in head):
        rules.append(f"every shard but the last must hold at least window - 1 = {window - 1} positions")
    if rules:
        raise ValueError(f"shard lengths {lengths} (rank order) do not fit: " + "; ".join(rules))
