"""Long-short attention expressed with FlexAttention: the `flex` method of bench/sweep.py.

Keys and values are [LN_L(k) ; Kg] and [LN_L(v) ; Vg], KV length N + G, where Kg, Vg
are the projected keys and values (G = r bidirectional, (N // chunk) * r causal). A
mask_mod gives each query its window (README, "What it computes") and the projected vectors it may see
(causal: vector j of chunk j // r is visible to query t iff j // r < t // chunk).
LN_L and the projection run in plain PyTorch; only flex_attention is compiled, with
dynamic shapes, so that inductor's on-disk cache serves every N and batch size after the
first compilation (the sweep compiles in a fresh process per point). The BlockMask is
built from each query's key intervals, without evaluating the (N, N + G) mask.
Same semantics as ``ls_attention`` without a key padding mask.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ls_kernels.config import half_width


def _ln(x, ln, eps):
    """LayerNorm over the last dim of (B, H, L, D); ln = (weight, bias) of (D,) or (H, D), or None."""
    if ln is None:
        return x
    weight, bias = ln
    if weight.dim() == 2:
        weight, bias = weight[:, None, :], bias[:, None, :]
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight + bias


def projected(proj, k_src, v_src, causal, chunk, ln_global, eps):
    """Kg, Vg (B, H, G, D): softmax of proj over the sequence (or each chunk), P^T k_src, then LN_G."""
    B, H, N, D = k_src.shape
    r = proj.shape[-1]
    if causal:
        nc = N // chunk
        P = proj[:, :, :nc * chunk].reshape(B, H, nc, chunk, r).softmax(3).transpose(-1, -2)
        kg = (P @ k_src[:, :, :nc * chunk].reshape(B, H, nc, chunk, D)).reshape(B, H, nc * r, D)
        vg = (P @ v_src[:, :, :nc * chunk].reshape(B, H, nc, chunk, D)).reshape(B, H, nc * r, D)
    else:
        P = proj.softmax(2).transpose(-1, -2)
        kg, vg = P @ k_src, P @ v_src
    return _ln(kg, ln_global, eps), _ln(vg, ln_global, eps)


def ls_mask_mod(N, window, causal, chunk, r):
    """mask_mod(b, h, t, j): key j < N is window key j, key j >= N is projected vector j - N."""
    half = half_width(window)

    def mask_mod(b, h, t, j):
        if window == 0:
            local = j < 0
        elif causal:
            local = (j <= t) & (j > t - window)
        else:
            start = t // window * window
            local = (j >= start - half) & (j < start + window + half)
        glob = (j - N) // r < t // chunk if causal else j >= N
        return torch.where(j < N, local, glob)

    return mask_mod


def _intervals(N, G, window, causal, chunk, r):
    """Per query t: its window keys [lo, hi) and its projected keys [N, gh), as KV positions."""
    t = torch.arange(N)
    half = half_width(window)
    if window == 0:
        lo = hi = torch.zeros_like(t)
    elif causal:
        lo, hi = (t - window + 1).clamp(min=0), t + 1
    else:
        start = t // window * window
        lo, hi = (start - half).clamp(min=0), (start + window + half).clamp(max=N)
    gh = N + (t // chunk * r).clamp(max=G) if causal else torch.full_like(t, N + G)
    return lo, hi, gh


@functools.lru_cache(maxsize=4)
def block_mask(N, G, window, causal, chunk, r, device, BLOCK=128):
    """The BlockMask, built from each query's key intervals without evaluating the (N, N + G) mask.

    Both interval ends grow with t, so a block of queries [a, b) and keys [c, d) sees some key iff
    the first query t >= a whose interval ends after c is in the block and starts before d, and sees
    every key iff the last query's interval starts at or before c and the first's ends at or after d.
    """
    lo, hi, gh = _intervals(N, G, window, causal, chunk, r)
    a = torch.arange(0, N, BLOCK)
    b = (a + BLOCK).clamp(max=N)
    c = torch.arange(0, N + G, BLOCK)
    d = (c + BLOCK).clamp(max=N + G)

    def any_full(L, U, c, d):
        first = torch.maximum(a[:, None], torch.searchsorted(U, c, right=True)[None, :])
        some = (first < b[:, None]) & (L[first.clamp(max=N - 1)] < d) & (c < d)
        every = ((L[b - 1][:, None] <= c) & (U[a][:, None] >= d)) | (c >= d)
        return some, every

    some_l, every_l = any_full(lo, hi, c.clamp(max=N), d.clamp(max=N))
    some_g, every_g = any_full(torch.full_like(gh, N), gh, c.clamp(min=N), d.clamp(min=N))
    complete = ((b - a) == BLOCK)[:, None] & ((d - c) == BLOCK)
    full = every_l & every_g & complete
    partial = (some_l | some_g) & ~full

    def blocks(m):  # counts (1, 1, n_q) and indices (1, 1, n_q, n_kv), the listed blocks first
        return (m.sum(-1).to(torch.int32)[None, None].to(device),
                torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None].to(device))

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=ls_mask_mod(N, window, causal, chunk, r), seq_lengths=(N, N + G))


_compiled = {"fn": None, "shape": None}


def compiled_flex(key):
    """torch.compile(flex_attention), recompiled from scratch (dynamo reset) when `key` changes:
    otherwise dynamo's recompile limit is hit after a few shapes and it silently runs eager."""
    if _compiled["shape"] != key:
        torch._dynamo.reset()
        _compiled["fn"], _compiled["shape"] = torch.compile(flex_attention, dynamic=True), key
    return _compiled["fn"]


def ls_flex(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
            project_after_ln=False, scale=None, eps=1e-5, compile=True):
    """Long-short attention with FlexAttention; arguments as ``ls_attention`` (no key padding)."""
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k_loc, v_loc = _ln(k.to(acc), ln_local, eps), _ln(v.to(acc), ln_local, eps)
    keys, values, r = [k_loc], [v_loc], 1
    if proj is not None:
        r = proj.shape[-1]
        k_src, v_src = (k_loc, v_loc) if project_after_ln else (k.to(acc), v.to(acc))
        kg, vg = projected(proj.to(acc), k_src, v_src, causal, chunk, ln_global, eps)
        keys.append(kg)
        values.append(vg)
    keys, values = torch.cat(keys, 2).to(q.dtype), torch.cat(values, 2).to(q.dtype)
    G = keys.shape[2] - N
    mask = block_mask(N, G, window, causal, chunk, r, str(q.device))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    fn = compiled_flex((q.shape, G, q.dtype, window, causal, chunk, r)) if compile else flex_attention
    return fn(q, keys, values, block_mask=mask, scale=scale)
