"""Launcher of the decode kernels: one new token per sequence against its decoding cache (flash-decoding split
over the cached keys, then a deterministic combine)."""
import torch
import triton

from ..cache import LSCache
from ..config import INTERPRET, LSConfig
from .args import absent, block_d, kernel_dtype, make_scalars
from .kernels.decode import _decode_combine_kernel, _decode_split_kernel

def decode_block_n(D, gpu_tiles=not INTERPRET):
    """Keys per tile of a split program: 64 rows of D <= 64, 32 of wider heads (the key and value tiles stay
    in registers in the accumulation dtype: zero spills on sm_80 and sm_90a); 16 in the interpreter, where
    each tile step costs milliseconds."""
    if not gpu_tiles:
        return 16
    return 64 if D <= 64 else 32


# the split kernel aims at about this many programs in all (4 per SM of an H100), spans of whole tiles
DECODE_PROGRAMS = 528
# spans merged per step of the combine kernel
COMBINE_SPANS = 16


def decode_attend(q, k_new, v_new, cache: LSCache, *, cfg: LSConfig, n_new):
    """Outputs (B, H, 1, D) in q's dtype of one new token per sequence: q (B, H, 1, D) any strides, k_new,
    v_new (B, H, 1, D) its window key and value in the cache's dtype (LN_L applied), n_new (B,) 1 for a real
    token, 0 for padding (zero output). The cache's projected vectors already include the chunk the token
    finishes; its lengths are not yet advanced."""
    B, H, _, D = q.shape
    device = q.device
    kdt = kernel_dtype(q.dtype)
    q1 = q[:, :, 0].to(kdt)
    q1 = q1 if q1.stride(-1) == 1 else q1.contiguous()
    kn, vn = (x[:, :, 0].to(kdt).contiguous() for x in (k_new, v_new))
    ring_k, ring_v, kg, vg = (x.to(kdt).contiguous() for x in (cache.win_k, cache.win_v, cache.kg, cache.vg))
    W1, cap = ring_k.shape[2], kg.shape[2]
    scalars = make_scalars(cfg.scale, cfg.eps, q.dtype, device)
    acc = scalars.dtype
    n_keys = W1 + (int(cache.lengths.max()) // cfg.chunk) * cfg.rank if B > 0 else 0
    per_seq = max(1, DECODE_PROGRAMS // max(B * H, 1))
    block_n = decode_block_n(D)
    split = block_n * max(1, triton.cdiv(triton.cdiv(max(n_keys, 1), per_seq), block_n))
    n_splits = max(1, triton.cdiv(n_keys, split))
    o_part = torch.empty(B, H, n_splits, D, dtype=acc, device=device)
    lse_part = torch.empty(B, H, n_splits, dtype=acc, device=device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=device)
    if B * H == 0:
        return out.unsqueeze(2)
    stand_in = absent(device)
    _decode_split_kernel[(n_splits, H, B)](
        q1, kn, vn, ring_k if W1 else stand_in, ring_v if W1 else stand_in, kg if cap else stand_in,
        vg if cap else stand_in, cache.lengths.contiguous(), (n_new > 0).to(torch.int8), scalars, o_part, lse_part,
        q1.stride(0), q1.stride(1),
        H, W1, cap, cfg.chunk, cfg.rank, split, n_splits,
        HAS_WINDOW=cfg.window > 0, HEAD_DIM=D, IS_FP64=q.dtype == torch.float64, BLOCK_N=block_n, BLOCK_D=block_d(D),
        num_warps=4,
    )
    _decode_combine_kernel[(B * H,)](
        o_part, lse_part, out, n_splits,
        HEAD_DIM=D, IS_FP64=q.dtype == torch.float64, BLOCK_S=COMBINE_SPANS, BLOCK_D=block_d(D), num_warps=4,
    )
    return out.unsqueeze(2)
