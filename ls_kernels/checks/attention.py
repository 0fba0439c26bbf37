"""Checks of the tensors and settings of one attention call: the inputs of ``ls_attention``,
``ls_attention_projected`` and ``dynamic_projection``, the backend, the score-overflow bound."""
import math
import numbers

import torch

from ..config import INTERPRET, LOG2E, MAX_HEAD_DIM, LSConfig, acc_dtype, clamp_window, default_scale

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")


def _describe(x):
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


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


def _check_qkv(q, k, v, names=("q", "k", "v"), longer_keys=None):
    """q, k, v: rank 4, one float dtype and device; k and v of q's shape, or with longer_keys (causal
    ls_attention) of shape (B, H, Nk, D) with Nk >= q's N (False: a bidirectional ls_attention, which
    says so when the lengths differ; None: the rule does not apply)."""
    for name, x in zip(names, (q, k, v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got {_describe(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")
    B, H, N, D = q.shape
    longer = longer_keys and k.shape[2] >= N and (k.shape[0], k.shape[1], k.shape[3]) == (B, H, D)
    expected = k.shape if longer else q.shape
    for name, x in zip(names[1:], (k, v)):
        if x.shape != expected:  # the message is built only here (torch.compile traces the checks)
            if longer:
                rule = f"the shape of {names[1]} {tuple(k.shape)} (keys beyond the queries: Nk >= {N})"
            else:
                note = (" (causal calls also take keys beyond the queries: (B, H, Nk >= N, D))" if longer_keys else
                        " (only causal calls take keys beyond the queries, Nk > N)" if longer_keys is False else "")
                rule = f"the shape of {names[0]} {tuple(q.shape)}{note}"
            raise ValueError(f"{name} must have {rule}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of {names[0]} ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but {names[0]} is on {q.device}")
    if q.shape[-1] < 1:
        raise ValueError(f"{names[0]} must have a head dim D >= 1, got {_describe(q)}")


def _check_proj(proj, k):
    """proj: (B, H, N, r) over k's positions."""
    B, H, N, _ = k.shape
    if not isinstance(proj, torch.Tensor):
        raise ValueError(f"proj must be None or a torch.Tensor, got {type(proj).__name__}")
    if proj.dim() != 4 or tuple(proj.shape[:3]) != (B, H, N) or proj.shape[3] < 1:
        raise ValueError(f"proj must have shape (B, H, N, r) = ({B}, {H}, {N}, r) with r >= 1, "
                         f"got {tuple(proj.shape)}")
    if proj.dtype not in FLOAT_DTYPES:
        raise ValueError(f"proj must be a float tensor, got dtype {proj.dtype}")
    if proj.device != k.device:
        raise ValueError(f"proj is on {proj.device} but q is on {k.device}")


def _check_window(window):
    if window is None:
        return 0
    return _check_int("window", window, 0)


def _check_mask(key_padding_mask, k):
    """key_padding_mask: None or (B, N) bool over k's positions."""
    if key_padding_mask is None:
        return
    B, N = k.shape[0], k.shape[2]
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = _describe(key_padding_mask) if isinstance(key_padding_mask, torch.Tensor) \
            else type(key_padding_mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must have shape (B, N) = ({B}, {N}), "
                         f"got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {k.device}")


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_triton(q, backend):
    """Whether the call runs the Triton kernels: "auto" picks them for CUDA tensors with D <= MAX_HEAD_DIM;
    "triton" insists (ValueError where they cannot run)."""
    if backend == "torch":
        return False
    if backend == "triton":
        if not (q.is_cuda or INTERPRET or q.device.type == "meta"):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got q on {q.device}; move the inputs to a GPU, or set "
                "TRITON_INTERPRET=1 in the environment before importing ls_kernels to run the kernels in "
                "Triton's CPU interpreter (slow, for testing)")
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, q has shape "
                             f"{tuple(q.shape)}; use backend='torch'")
        return True
    return q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM


def check_attention(q, k, v, proj, *, window, causal, chunk, ln_local, ln_global, project_after_ln,
                    key_padding_mask, scale, eps, backend):
    """Validate the arguments of ``ls_attention``; returns (its LSConfig, whether Triton runs it). Causal
    calls may give k, v, proj, key_padding_mask of Nk >= N positions (keys beyond the queries)."""
    _check_bool("causal", causal)
    _check_qkv(q, k, v, longer_keys=causal)
    B, H, N, D = q.shape
    if proj is not None:
        _check_proj(proj, k)
    window = _check_window(window)
    if window == 0 and proj is None:
        raise ValueError("window and proj are both absent (window=0, proj=None): nothing to attend to; "
                         "give window > 0, proj, or both")
    chunk = _check_int("chunk", chunk, 1)
    _check_ln("ln_local", ln_local, H, D, q)
    _check_ln("ln_global", ln_global, H, D, q)
    _check_mask(key_padding_mask, k)
    _check_scale(scale)
    _check_eps(eps)
    _check_backend(backend)
    cfg = LSConfig(window=clamp_window(window, k.shape[2]), causal=causal, chunk=chunk,
                   rank=proj.shape[-1] if proj is not None else 0,
                   scale=default_scale(D) if scale is None else float(scale), eps=float(eps),
                   project_after_ln=bool(project_after_ln))
    _check_scores_fit(cfg.scale, q, lambda: _key_norm_bounds(k, proj, ln_local, ln_global, cfg.project_after_ln))
    return cfg, use_triton(q, backend)


def check_projected_attention(q, k, v, k_proj, v_proj, *, window, causal, chunk, key_padding_mask, scale,
                              dropout_p, backend):
    """Validate the arguments of ``ls_attention_projected``; returns (its LSConfig, whether Triton runs it)."""
    _check_qkv(q, k, v)
    B, H, N, D = q.shape
    window = _check_window(window)
    _check_bool("causal", causal)
    chunk = _check_int("chunk", chunk, 1)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if window == 0 and k_proj is None:
        raise ValueError("window and k_proj are both absent (window=0, k_proj=None): nothing to attend to; "
                         "give window > 0, k_proj and v_proj, or both")
    _check_mask(key_padding_mask, q)
    _check_scale(scale)
    _check_backend(backend)
    rank = _check_projected(q, k_proj, v_proj, causal, chunk)
    triton = use_triton(q, backend)
    if dropout_p > 0 and triton:
        raise ValueError(f"dropout_p = {dropout_p} needs the blocked PyTorch path: the Triton kernels have no "
                         "dropout on the attention probabilities; use backend='torch', or dropout_p=0 "
                         "(e.g. the module in eval mode)")
    cfg = LSConfig(window=clamp_window(window, N), causal=causal, chunk=chunk, rank=rank,
                   scale=default_scale(D) if scale is None else float(scale))
    _check_scores_fit(cfg.scale, q, lambda: [_max_row_norm(k)] + ([_max_row_norm(k_proj)] if k_proj is not None else []))
    return cfg, triton


def _check_key_pair(q, names, keys, values, same_dtype):
    """Keys and values (names: their argument names) both None, or (B, H, G, D) tensors of one shape on q's
    device, in q's dtype (same_dtype) or any float dtype. Returns G, or None for absent ones."""
    if (keys is None) != (values is None):
        raise ValueError(f"{names[0]} and {names[1]} must both be tensors or both be None, got "
                         f"{type(keys).__name__} and {type(values).__name__}")
    if keys is None:
        return None
    B, H, _, D = q.shape
    for name, x in zip(names, (keys, values)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (B, H, D):
            raise ValueError(f"{name} must have shape (B, H, G, D) = ({B}, {H}, G, {D}), got {tuple(x.shape)}")
        if same_dtype and x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if values.shape != keys.shape:
        raise ValueError(f"{names[1]} must have the shape of {names[0]} {tuple(keys.shape)}, "
                         f"got {tuple(values.shape)}")
    return keys.shape[2]


def _check_projected(q, k_proj, v_proj, causal, chunk):
    """Validate the projected keys and values; returns the rank r."""
    G = _check_key_pair(q, ("k_proj", "v_proj"), k_proj, v_proj, same_dtype=False)
    if G is None:
        return 0
    N = q.shape[2]
    if not causal:
        return G
    nc = N // chunk
    if (nc == 0 and G != 0) or (nc > 0 and G % nc != 0):
        raise ValueError(f"k_proj has G = {G} projected vectors, not a multiple of the {nc} full chunks of "
                         f"N = {N} positions (chunk = {chunk}): causal projected vectors are chunk-major, "
                         "rank per chunk")
    return G // nc if nc > 0 else 0


def check_dynamic_projection(proj, k, v, *, causal, chunk, key_padding_mask):
    """Validate the arguments of ``dynamic_projection``."""
    if proj is None:
        raise ValueError("proj must be a (B, H, N, r) tensor, got None")
    _check_qkv(k, k, v, names=("k", "k", "v"))
    _check_proj(proj, k)
    _check_bool("causal", causal)
    _check_int("chunk", chunk, 1)
    _check_mask(key_padding_mask, k)


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite real number > 0, got {eps!r}")


def _check_scale(scale):
    """scale: None or a finite real number (Python or NumPy)."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite real number, got {scale!r}")


def _max_row_norm(x):
    return torch.linalg.vector_norm(x.detach().double(), dim=-1).amax().item() if x.numel() else 0.0


def _ln_norm_bound(ln, D):
    """Largest L2 norm of a LayerNorm output: |x_hat| <= sqrt(D), so |x_hat * w + b| <= sqrt(D) max|w| + max|b|."""
    weight, bias = (x.detach().double() for x in ln)
    return math.sqrt(D) * weight.abs().max().item() + torch.linalg.vector_norm(bias, dim=-1).max().item()


def _check_scores_fit(scale, q, key_bounds):
    """Scores scale * q . key must be finite in the accumulation dtype (the kernels multiply them by log2(e)).

    key_bounds: a function giving upper bounds of the L2 norm of every key the queries are scored against. By
    Cauchy-Schwarz |scale * q . key| <= |scale| max|q| max|key|. Checked only for |scale| > 1 (with
    the default 1 / sqrt(D) the scores overflow only where the inputs' own dot products do) and outside
    torch.compile tracing (the bound needs the data)."""
    if abs(scale) <= 1 or q.numel() == 0 or q.device.type == "meta" or torch.compiler.is_compiling():
        return
    acc = acc_dtype(q.dtype)
    bound = abs(scale) * LOG2E * _max_row_norm(q) * max(key_bounds(), default=0.0)
    if not bound <= torch.finfo(acc).max:
        raise ValueError(f"scale = {scale!r} overflows the scores: |scale| * max|q| * max|key| * log2(e) = {bound:.3g} "
                         f"exceeds the largest {acc} ({torch.finfo(acc).max:.3g}); use a smaller scale (default "
                         f"1 / sqrt(D) = {default_scale(q.shape[-1]):.3g})")


def _key_norm_bounds(k, proj, ln_local, ln_global, project_after_ln):
    """Bounds of the L2 norms of the window keys LN_L(k) and of the projected keys LN_G(P^T k_P)
    (convex combinations of k_P rows before LN_G)."""
    D = k.shape[-1]
    window = _ln_norm_bound(ln_local, D) if ln_local is not None else _max_row_norm(k)
    if proj is None:
        return [window]
    source = window if project_after_ln else _max_row_norm(k)
    return [window, _ln_norm_bound(ln_global, D) if ln_global is not None else source]
