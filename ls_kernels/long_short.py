"""Long-short attention: fused Triton kernels, their autograd Function, and ``ls_attention``.

Forward: the projection pre-pass (``projection.py``) produces the projected keys
and values; ``_ls_fwd_kernel`` then runs, for a block of queries, ONE online
softmax over the projected keys visible to the block and its window keys, with
LN_L applied to every loaded key and value tile in registers. It writes O and an
fp32 logsumexp per query (+inf for queries that see nothing or are padded, so the
backward recomputes zero probabilities for them).
"""
import math
import os

import torch
import triton
import triton.language as tl

from .blocked import ls_attention_torch
from .checks import check_inputs
from .projection import _dot, _layer_norm_rows, _next_pow2, ln_params, projection_forward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


@triton.jit
def _exp(x, IS_FP64: tl.constexpr):
    """exp in the kernel's units: base 2 for fp32 (scores carry log2(e)), natural for fp64."""
    if IS_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def _softmax_step(s, visible, values, m_i, l_i, acc, IS_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update with a tile of scores s [BLOCK_M, BLOCK_K] and values [BLOCK_K, BLOCK_D]."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = _exp(m_i - m_safe, IS_FP64)
    p = _exp(s - m_safe[:, None], IS_FP64)  # [BLOCK_M, BLOCK_K]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(values.dtype), values, IS_FP64, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _ls_fwd_kernel(
    Q, K, V, KG, VG, GVIS, PAD, LNW, LNB, SCALARS, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_padb, stride_lnh,
    H, N, NG, WINDOW, HALF, CHUNK, RANK,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    HAS_PAD: tl.constexpr, HAS_LN: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, off_h, off_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_b = off_b.to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    qk_scale = tl.load(SCALARS)  # scale, times log2(e) unless fp64
    eps = tl.load(SCALARS + 1)
    zero = tl.load(SCALARS + 2)  # 0 in the accumulation dtype

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32) + zero
    l_i = tl.zeros([BLOCK_M], tl.float32) + zero
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + zero
    last_m = tl.minimum(start_m + BLOCK_M, N) - 1  # last real query of the block

    if HAS_GLOBAL:
        if CAUSAL:  # the block's last query sees chunks before its own, RANK vectors each
            g_hi = tl.minimum((last_m // CHUNK) * RANK, NG)
        else:
            g_hi = NG
        g_base = (off_b * H + off_h) * NG
        for start_g in range(0, g_hi, BLOCK_G):
            offs_g = start_g + tl.arange(0, BLOCK_G)
            mask_g = offs_g < g_hi
            rows = (g_base + offs_g)[:, None] * HEAD_DIM + offs_d[None, :]
            kg = tl.load(KG + rows, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
            vg = tl.load(VG + rows, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            s = _dot(q, tl.trans(kg.to(q.dtype)), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_G]
            gvis = tl.load(GVIS + off_b * NG + offs_g, mask=mask_g, other=0)  # chunk or sequence has real tokens
            visible = (gvis != 0)[None, :]
            if CAUSAL:
                visible = visible & ((offs_g // RANK)[None, :] < (offs_m // CHUNK)[:, None])
            m_i, l_i, acc = _softmax_step(s, visible, vg.to(q.dtype), m_i, l_i, acc, IS_FP64, PRECISION)

    if HAS_LOCAL:
        if CAUSAL:  # keys t - WINDOW + 1 .. t
            lo = tl.maximum(start_m - WINDOW + 1, 0)
            hi = last_m + 1
        else:  # keys of the segments of the block's first and last query, widened by HALF
            lo = tl.maximum((start_m // WINDOW) * WINDOW - HALF, 0)
            hi = tl.minimum((last_m // WINDOW) * WINDOW + WINDOW + HALF, N)
        lo = (lo // BLOCK_N) * BLOCK_N
        if HAS_LN:
            ln_w = tl.load(LNW + off_h * stride_lnh + offs_d, mask=mask_d, other=0.0) + zero  # [BLOCK_D]
            ln_b = tl.load(LNB + off_h * stride_lnh + offs_d, mask=mask_d, other=0.0) + zero
        if not CAUSAL:
            seg_start = (offs_m // WINDOW) * WINDOW  # [BLOCK_M]
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            rows = offs_n.to(tl.int64)[:, None]
            mask_nd = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_base + rows * stride_kn + offs_d[None, :], mask=mask_nd, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_base + rows * stride_vn + offs_d[None, :], mask=mask_nd, other=0.0)
            if HAS_LN:
                k = _layer_norm_rows(k + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
                v = _layer_norm_rows(v + zero, ln_w, ln_b, mask_d, eps, HEAD_DIM).to(q.dtype)
            s = _dot(q, tl.trans(k), IS_FP64, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            if CAUSAL:
                visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - WINDOW)
            else:
                visible = (offs_n[None, :] >= seg_start[:, None] - HALF) \
                    & (offs_n[None, :] < seg_start[:, None] + WINDOW + HALF)
            visible = visible & mask_n[None, :]
            if HAS_PAD:
                key_pad = tl.load(PAD + off_b * stride_padb + offs_n, mask=mask_n, other=1)
                visible = visible & (key_pad == 0)[None, :]
            m_i, l_i, acc = _softmax_step(s, visible, v, m_i, l_i, acc, IS_FP64, PRECISION)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + _log(tl.where(seen, l_i, 1.0), IS_FP64), float("inf"))
    if HAS_PAD:
        q_pad = tl.load(PAD + off_b * stride_padb + offs_m, mask=mask_m, other=1) != 0
        out = tl.where(q_pad[:, None], 0.0, out)
        lse = tl.where(q_pad, float("inf"), lse)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + (off_b * H + off_h) * N + offs_m, lse, mask=mask_m)


# ----------------------------------------------------------------------------- launch wrappers

def _fwd_config(D, dtype):
    """Default (BLOCK_M, BLOCK_N, num_warps, num_stages) of the main forward kernel.

    Chosen by ahead-of-time compilation (bench/aot_report.py): zero spills on sm_90a.
    fp32 dots are IEEE FMA dots that hold whole rows of their operands in registers,
    hence the small tiles; fp64 has no dot at all (broadcast products).
    """
    if INTERPRET:
        return 32, 32, 4, 1
    if dtype == torch.float64:
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return (32, 16, 8, 2) if D <= 64 else (16, 16, 8, 2)
    return (64, 64, 4, 2) if D <= 64 else (64, 32, 8, 2)


def _scalars(scale, eps, dtype, device):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qk_scale = scale if acc == torch.float64 else scale * LOG2E
    return torch.tensor([qk_scale, eps, 0.0], dtype=acc, device=device)


def _projected_visibility(pad, B, N, r, causal, chunk, device):
    """(B, NG) int8: whether each projected vector comes from a sequence / chunk with real tokens."""
    if pad is None:
        n = r * (N // chunk if causal else 1)
        return torch.ones(B, n, dtype=torch.int8, device=device)
    real = ~pad
    if causal:
        nc = N // chunk
        real = real[:, :nc * chunk].reshape(B, nc, chunk)
    return real.any(-1, keepdim=not causal).repeat_interleave(r, dim=1).to(torch.int8)


def _ls_forward(q, k, v, proj, window, causal, chunk, ln_local, ln_global, project_after_ln, pad, scale, eps):
    """Launch the pre-pass and the main kernel; returns o, lse and what the backward needs."""
    B, H, N, D = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    device = q.device
    scalars = _scalars(scale, eps, q.dtype, device)
    acc = scalars.dtype
    pad8 = pad.contiguous().view(torch.int8) if pad is not None else None
    if proj is not None:
        kg, vg, k_raw, v_raw, col_lse = projection_forward(
            proj, k, v, pad8, ln_local if project_after_ln else None, ln_global, causal, chunk, scalars)
        gvis = _projected_visibility(pad, B, N, proj.shape[-1], causal, chunk, device)
    else:
        kg = vg = k_raw = v_raw = col_lse = torch.empty(B, H, 0, D, dtype=acc, device=device)
        gvis = torch.empty(B, 0, dtype=torch.int8, device=device)
    NG = kg.shape[2]
    lnw, lnb, stride_lnh = ln_params(ln_local, H, D, acc, device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _fwd_config(D, q.dtype)
    BLOCK_D = max(16, _next_pow2(D))
    BLOCK_G = max(16, min(BLOCK_N, _next_pow2(max(NG, 1))))
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=acc, device=device)
    grid = (triton.cdiv(N, BLOCK_M), H, B)
    _ls_fwd_kernel[grid](
        q, k, v, kg, vg, gvis, pad8 if pad8 is not None else gvis, lnw, lnb, scalars, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        pad8.stride(0) if pad8 is not None else 0, stride_lnh,
        H, N, NG, window, max(window // 2, 1), chunk, proj.shape[-1] if proj is not None else 1,
        HEAD_DIM=D, CAUSAL=causal, HAS_LOCAL=window > 0, HAS_GLOBAL=NG > 0,
        HAS_PAD=pad8 is not None, HAS_LN=ln_local is not None, IS_FP64=q.dtype == torch.float64,
        PRECISION="ieee", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse, (kg, vg, k_raw, v_raw, col_lse)


# ----------------------------------------------------------------------------- autograd

class LSAttentionFunction(torch.autograd.Function):
    """Triton long-short attention. LN weights and biases enter as four tensors (or None)."""

    @staticmethod
    def forward(ctx, q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, window, causal, chunk, project_after_ln,
                pad, scale, eps):
        ln_local = None if lnl_w is None else (lnl_w, lnl_b)
        ln_global = None if lng_w is None else (lng_w, lng_b)
        # the interpreter computes bf16 arithmetic on raw bit patterns: run it in fp32 there
        upcast = INTERPRET and q.dtype == torch.bfloat16
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
            proj = proj.float() if proj is not None else None
        o, lse, _ = _ls_forward(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                                project_after_ln, pad, scale, eps)
        ctx.save_for_backward(q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, pad)
        ctx.cfg = (window, causal, chunk, project_after_ln, scale, eps)
        return o.to(torch.bfloat16) if upcast else o

    @staticmethod
    def backward(ctx, do):
        q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, pad = ctx.saved_tensors
        window, causal, chunk, project_after_ln, scale, eps = ctx.cfg
        inputs = [q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b]
        needs = [x is not None and n for x, n in zip(inputs, ctx.needs_input_grad[:8])]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(n) if x is not None else None for x, n in zip(inputs, needs)]
            q_, k_, v_, p_, a, b, c, d = leaves
            out = ls_attention_torch(
                q_, k_, v_, p_, window=window, causal=causal, chunk=chunk,
                ln_local=None if a is None else (a, b), ln_global=None if c is None else (c, d),
                project_after_ln=project_after_ln, key_padding_mask=pad, scale=scale, eps=eps)
            wanted = [x for x, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(out, wanted, do.to(out.dtype), allow_unused=True) if wanted else [])
        result = []
        for x, n, orig in zip(leaves, needs, ctx.needs_input_grad[:8]):
            g = next(grads) if n else None
            result.append(g.to(do.dtype) if g is not None and x.dtype != do.dtype and x is not None
                          and x.dtype in (torch.float32,) and do.dtype == torch.bfloat16 else g)
        return (*result, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- public function

def _use_triton(q, backend):
    if backend == "torch":
        return False
    if backend == "triton":
        if not (q.is_cuda or INTERPRET):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got q on {q.device}; move the inputs to a GPU, or set "
                "TRITON_INTERPRET=1 in the environment before importing ls_kernels to run the kernels in "
                "Triton's CPU interpreter (slow, for testing)")
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, q has shape "
                             f"{tuple(q.shape)}; use backend='torch'")
        return True
    return q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM  # auto


def ls_attention(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                 project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5, backend="auto"):
    """Long-short attention (Transformer-LS): each query attends, under one softmax, to its local
    window of keys and to keys projected from the whole sequence (or from earlier chunks, causal).

    Args:
        q, k, v: (B, H, N, D) queries, keys and values, one dtype (fp16, bf16, fp32 or fp64).
        proj: (B, H, N, r) dynamic-projection logits, or None for window-only attention.
        window: w >= 0, local segment size (bidirectional) or band width (causal); 0 = projection only.
        causal: bidirectional (False) or autoregressive (True).
        chunk: l >= 1, causal only: positions projected together; a query sees chunks before its own.
        ln_local, ln_global: (weight, bias) of LN_L and LN_G, each (D,) or (H, D), or None (no norm).
        project_after_ln: the projection reads LN_L(k), LN_L(v) (True) or raw k, v (False).
        key_padding_mask: (B, N) bool, True = padding; padded tokens are never attended to or projected,
            and their output rows are zero.
        scale: score scale, default 1 / sqrt(D).
        eps: LayerNorm epsilon.
        backend: "auto" (Triton on CUDA, else the blocked PyTorch path), "triton" or "torch".

    Returns:
        (B, H, N, D) tensor in q's dtype.
    """
    window = check_inputs(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                          key_padding_mask, scale, eps, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not _use_triton(q, backend):
        return ls_attention_torch(q, k, v, proj, window=window, causal=causal, chunk=chunk, ln_local=ln_local,
                                  ln_global=ln_global, project_after_ln=project_after_ln,
                                  key_padding_mask=key_padding_mask, scale=scale, eps=float(eps))
    lnl = ln_local if ln_local is not None else (None, None)
    lng = ln_global if ln_global is not None else (None, None)
    return LSAttentionFunction.apply(q, k, v, proj, *lnl, *lng, window, causal, chunk, project_after_ln,
                                     key_padding_mask, scale, float(eps))
