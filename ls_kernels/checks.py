"""Input validation shared by every backend of ``ls_attention``.

Each check raises ``ValueError`` naming the argument and what it got.
"""
import math
import numbers

import torch

LOG2E = 1.4426950408889634

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")


def _describe(x):
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def _check_ln(name, ln, H, D, q):
    if ln is None:
        return
    if not (isinstance(ln, (tuple, list)) and len(ln) == 2):
        raise ValueError(f"{name} must be None or a (weight, bias) pair of tensors, got {type(ln).__name__}")
    for part, x in zip(("weight", "bias"), ln):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} {part} must be a tensor, got {type(x).__name__}")
        if tuple(x.shape) not in ((D,), (H, D)):
            raise ValueError(f"{name} {part} must have shape ({D},) or ({H}, {D}), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} {part} must be a float tensor, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} {part} is on {x.device} but q is on {q.device}")
    if ln[0].shape != ln[1].shape:
        raise ValueError(f"{name} weight and bias shapes differ: {tuple(ln[0].shape)} vs {tuple(ln[1].shape)}")


def check_inputs(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                 key_padding_mask, scale, eps, backend):
    """Validate the arguments of ``ls_attention``; returns the window as an int."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got {_describe(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    B, H, N, D = q.shape
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1, got {_describe(q)}")
    if proj is not None:
        if not isinstance(proj, torch.Tensor):
            raise ValueError(f"proj must be None or a torch.Tensor, got {type(proj).__name__}")
        if proj.dim() != 4 or tuple(proj.shape[:3]) != (B, H, N) or proj.shape[3] < 1:
            raise ValueError(f"proj must have shape (B, H, N, r) = ({B}, {H}, {N}, r) with r >= 1, "
                             f"got {tuple(proj.shape)}")
        if proj.dtype not in FLOAT_DTYPES:
            raise ValueError(f"proj must be a float tensor, got dtype {proj.dtype}")
        if proj.device != q.device:
            raise ValueError(f"proj is on {proj.device} but q is on {q.device}")
    if window is None:
        window = 0
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if window == 0 and proj is None:
        raise ValueError("window and proj are both absent (window=0, proj=None): nothing to attend to; "
                         "give window > 0, proj, or both")
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    _check_ln("ln_local", ln_local, H, D, q)
    _check_ln("ln_global", ln_global, H, D, q)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            got = _describe(key_padding_mask) if isinstance(key_padding_mask, torch.Tensor) \
                else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
        if tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(f"key_padding_mask must have shape (B, N) = ({B}, {N}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    check_scale(scale)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite real number > 0, got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return min(window, N) if N > 0 else window  # every window >= N sees the whole sequence


def check_scale(scale):
    """scale: None or a finite real number (Python or NumPy)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite real number, got {scale!r}")


def max_row_norm(x):
    return torch.linalg.vector_norm(x.detach().double(), dim=-1).amax().item() if x.numel() else 0.0


def _ln_norm_bound(ln, D):
    """Largest L2 norm of a LayerNorm output: |x_hat| <= sqrt(D), so |x_hat * w + b| <= sqrt(D) max|w| + max|b|."""
    weight, bias = (x.detach().double() for x in ln)
    return math.sqrt(D) * weight.abs().max().item() + torch.linalg.vector_norm(bias, dim=-1).max().item()


def check_scores_fit(scale, q, key_bounds):
    """Scores scale * q . key must be finite in the accumulation dtype (the kernels multiply them by log2(e)).

    key_bounds: a function giving upper bounds of the L2 norm of every key the queries are scored against. By
    Cauchy-Schwarz |scale * q . key| <= |scale| max|q| max|key|. Checked only for |scale| > 1 (with
    the default 1 / sqrt(D) the scores overflow only where the inputs' own dot products do) and outside
    torch.compile tracing (the bound needs the data)."""
    if abs(scale) <= 1 or q.numel() == 0 or q.device.type == "meta" or torch.compiler.is_compiling():
        return
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bound = abs(scale) * LOG2E * max_row_norm(q) * max(key_bounds(), default=0.0)
    if not bound <= torch.finfo(acc).max:
        raise ValueError(f"scale = {scale!r} overflows the scores: |scale| * max|q| * max|key| * log2(e) = {bound:.3g} "
                         f"exceeds the largest {acc} ({torch.finfo(acc).max:.3g}); use a smaller scale (default "
                         f"1 / sqrt(D) = {1 / math.sqrt(q.shape[-1]):.3g})")


def key_norm_bounds(k, proj, ln_local, ln_global, project_after_ln):
    """Bounds of the L2 norms of the window keys LN_L(k) and of the projected keys LN_G(P^T k_P)
    (convex combinations of k_P rows before LN_G)."""
    D = k.shape[-1]
    window = _ln_norm_bound(ln_local, D) if ln_local is not None else max_row_norm(k)
    if proj is None:
        return [window]
    source = window if project_after_ln else max_row_norm(k)
    return [window, _ln_norm_bound(ln_global, D) if ln_global is not None else source]
