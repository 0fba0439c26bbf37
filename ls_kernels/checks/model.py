"""Checks of the layers: their constructor arguments, their input, the decoding cache and process group, and the
official LRA and vision checkpoints they load."""
import numbers

import torch

from ..cache import LSCache
from .attention import _check_backend, _check_bool, _check_int, _check_mask, _check_scale
from .sequence import _right_padded

DUAL_LN = ("head", "model", None)


def check_layer_args(embed_dim, num_heads, window, rank, causal, chunk, dual_ln, project_after_ln, dropout,
                     backend):
    """Validate the arguments of ``LongShortAttention``; returns embed_dim, num_heads, window, rank, chunk as ints."""
    embed_dim = _check_int("embed_dim", embed_dim, 1)
    num_heads = _check_int("num_heads", num_heads, 1)
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    window, rank, chunk = _check_int("window", window, 0), _check_int("rank", rank, 0), _check_int("chunk", chunk, 1)
    if window == 0 and rank == 0:
        raise ValueError("window and rank are both 0: nothing to attend to; give window > 0, rank > 0, or both")
    _check_bool("causal", causal)
    if dual_ln not in DUAL_LN:
        raise ValueError(f"dual_ln must be one of {DUAL_LN}, got {dual_ln!r}")
    if project_after_ln is not None and not isinstance(project_after_ln, bool):
        raise ValueError(f"project_after_ln must be None or a bool, got {project_after_ln!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    _check_backend(backend)
    if backend == "triton" and dropout > 0:
        raise ValueError(f"dropout = {dropout} is not supported by the Triton kernels (backend='triton'): "
                         "use dropout=0, or backend='torch' for dropout on the attention probabilities")
    return embed_dim, num_heads, window, rank, chunk


def check_layer_input(x, embed_dim, weight):
    """x of ``LongShortAttention.forward``: (B, N, embed_dim), in the parameters' dtype unless autocast casts it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != embed_dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, N, embed_dim={embed_dim}), got {got}")
    if x.dtype != weight.dtype and not (x.device.type == weight.device.type
                                        and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x has dtype {x.dtype} but the layer's parameters are {weight.dtype}: cast x or the "
                         f"layer (layer.to({x.dtype})), or run under torch.autocast")


def check_layer_cache(x, key_padding_mask, cache, *, causal, training, dropout):
    """The cache of ``LongShortAttention.forward(x, cache=...)``: an LSCache of x's batch size and dtype, for a
    causal layer, at least one new token, right padding only. Returns the real new tokens per sequence (B,)."""
    if not causal:
        raise ValueError("cache: a bidirectional layer (causal=False) cannot decode; give cache=None")
    if not isinstance(cache, LSCache):
        raise ValueError(f"cache must be an LSCache (layer.init_cache), got {type(cache).__name__}")
    B, T, _ = x.shape
    if T == 0:
        raise ValueError(f"x must hold at least one new token, got shape {tuple(x.shape)}")
    if cache.batch_size != B:
        raise ValueError(f"cache was made for batch_size {cache.batch_size}, but x has {B} sequences "
                         f"(shape {tuple(x.shape)})")
    if training and dropout > 0:
        raise ValueError(f"cache: decoding is inference, but the layer is in training mode with dropout "
                         f"{dropout}; call layer.eval()")
    _check_mask(key_padding_mask, x.unsqueeze(1))
    return _right_padded(key_padding_mask, B, T, x.device)


def check_official_lra(state_dict, prefix, expected):
    """The official LRA AttentionLS state dict: under `prefix`, its keys are `expected` and its maps square.
    Returns (the state dict with the prefix stripped, the model dim E)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    sd = {key[len(prefix):]: val for key, val in state_dict.items() if key.startswith(prefix)}
    if "conv.weight" in sd:
        raise ValueError("state_dict has conv.weight: the official layer was built with conv_kernel_size > 0 "
                         "(a depthwise convolution of V added to the output), which LongShortAttention does "
                         "not have")
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"state_dict is not that of the official LRA AttentionLS (prefix {prefix!r}): "
                         f"missing {missing}, unexpected {unexpected}")
    E = sd["W_q.weight"].shape[1]
    for name in ("W_q", "W_k", "W_v", "W_o"):
        if tuple(sd[name + ".weight"].shape) != (E, E):
            raise ValueError(f"{name}.weight must be ({E}, {E}) (model dim = num_head * head_dim), "
                             f"got {tuple(sd[name + '.weight'].shape)}")
    return sd, E


def check_official_lra_dconv(sd, num_heads, rank, E):
    """The official dconv_fc maps E to num_heads * rank projection logits (checked after the layer's own
    arguments)."""
    if tuple(sd["dconv_fc.weight"].shape) != (num_heads * rank, E):
        raise ValueError(f"dconv_fc.weight has shape {tuple(sd['dconv_fc.weight'].shape)}, but num_heads * rank "
                         f"= {num_heads} * {rank} rows of {E} are expected: check num_heads and rank "
                         "(the official num_head and num_landmarks)")


def check_layer_sharded(training, dropout):
    """A layer with a process group: no dropout on the attention probabilities (the sharded path has none)."""
    if training and dropout > 0:
        raise ValueError(f"process_group: the sharded layer has no attention dropout, but the layer is in "
                         f"training mode with dropout {dropout}; use dropout=0 or layer.eval()")


def check_layer_2d_args(embed_dim, num_heads, window, rank, num_global, rel_pos_bias, qkv_bias, scale, backend):
    """Validate the arguments of ``LongShortAttention2d``; returns embed_dim, num_heads, window, rank, num_global
    as ints."""
    embed_dim = _check_int("embed_dim", embed_dim, 1)
    num_heads = _check_int("num_heads", num_heads, 1)
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    window, rank = _check_int("window", window, 0), _check_int("rank", rank, 0)
    num_global = _check_int("num_global", num_global, 0)
    if window == 0 and rank == 0 and num_global == 0:
        raise ValueError("window, rank and num_global are all 0: nothing to attend to")
    _check_bool("rel_pos_bias", rel_pos_bias)
    if rel_pos_bias and window < 2:
        raise ValueError(f"rel_pos_bias needs window >= 2, got window = {window} (the official table covers "
                         "offsets up to w // 2 beyond the patch)")
    _check_bool("qkv_bias", qkv_bias)
    _check_scale(scale)
    _check_backend(backend)
    return embed_dim, num_heads, window, rank, num_global


def check_layer_2d_input(x, embed_dim, weight, grid, num_global):
    """x of ``LongShortAttention2d.forward``: (B, num_global + nx * ny, embed_dim); returns grid as ints."""
    check_layer_input(x, embed_dim, weight)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in grid)):
        raise ValueError(f"grid must be a pair (nx, ny) of ints >= 1, got {grid!r}")
    nx, ny = int(grid[0]), int(grid[1])
    if x.shape[1] != num_global + nx * ny:
        raise ValueError(f"x must hold num_global + nx * ny = {num_global} + {nx} * {ny} = {num_global + nx * ny} "
                         f"tokens (the global tokens first), got shape {tuple(x.shape)}")
    return nx, ny


def check_official_vil(state_dict, prefix, num_heads, rank):
    """The official vision AttentionLS state dict under `prefix`: its keys, its maps' shapes against num_heads
    and rank. Returns (the state dict with the prefix stripped, E, whether qkv has a bias, whether it has the
    relative-position bias table)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    sd = {key[len(prefix):]: val for key, val in state_dict.items() if key.startswith(prefix)}
    required = {"qkv.weight", "proj.weight", "proj.bias", "dual_ln_full.weight", "dual_ln_full.bias",
                "dual_ln_dp.weight", "dual_ln_dp.bias"}
    if rank > 0:
        required |= {"to_dynamic_projection.weight", "to_dynamic_projection.bias"}
    optional = {"qkv.bias", "local_relative_position_bias_table", "relative_position_index"}
    missing, unexpected = sorted(required - sd.keys()), sorted(sd.keys() - required - optional)
    if missing or unexpected:
        raise ValueError(f"state_dict is not that of the official vision AttentionLS with rank {rank} (prefix "
                         f"{prefix!r}): missing {missing}, unexpected {unexpected}")
    E = sd["qkv.weight"].shape[1]
    if tuple(sd["qkv.weight"].shape) != (3 * E, E) or tuple(sd["proj.weight"].shape) != (E, E):
        raise ValueError(f"qkv.weight must be (3E, E) and proj.weight (E, E), got {tuple(sd['qkv.weight'].shape)} "
                         f"and {tuple(sd['proj.weight'].shape)}")
    if rank > 0 and tuple(sd["to_dynamic_projection.weight"].shape) != (num_heads * rank, E):
        raise ValueError(f"to_dynamic_projection.weight has shape {tuple(sd['to_dynamic_projection.weight'].shape)}"
                         f", but num_heads * rank = {num_heads} * {rank} rows of {E} are expected: check num_heads "
                         "and rank (the official num_heads and dp_rank)")
    return sd, E, "qkv.bias" in sd, "local_relative_position_bias_table" in sd
