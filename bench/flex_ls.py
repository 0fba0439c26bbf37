"""Long-short attention expressed with FlexAttention: the `flex` method of bench/sweep.py.

Keys and values are [LN_L(k) ; Kg] and [LN_L(v) ; Vg], KV length N + G, where Kg, Vg
are the projected keys and values (G = r bidirectional, (N // chunk) * r causal). A
mask_mod gives each query its window (SPEC.md) and the projected vectors it may see
(causal: vector j of chunk j // r is visible to query t iff j // r < t // chunk).
LN_L and the projection run in plain PyTorch; only flex_attention is compiled.
Same semantics as ``ls_attention`` without a key padding mask.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


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
    half = max(window // 2, 1)

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


@functools.lru_cache(maxsize=4)
def block_mask(N, G, window, causal, chunk, r, device):
    """The BlockMask; compiled when large, so the dense (N, N + G) mask is never materialized."""
    return create_block_mask(ls_mask_mod(N, window, causal, chunk, r), None, None, N, N + G,
                             device=device, _compile=N * (N + G) > 1 << 24)


_compiled = {"fn": None, "shape": None}


def compiled_flex(key):
    """torch.compile(flex_attention), recompiled from scratch (dynamo reset) when `key` changes:
    otherwise dynamo's recompile limit is hit after a few shapes and it silently runs eager."""
    if _compiled["shape"] != key:
        torch._dynamo.reset()
        _compiled["fn"], _compiled["shape"] = torch.compile(flex_attention, dynamic=False), key
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
