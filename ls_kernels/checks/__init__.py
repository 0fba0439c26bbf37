"""Every validator of the package: the only place that raises for bad arguments.

Each check raises ``ValueError`` naming the argument and what it got. The public functions call one
entry point each (``check_attention``, ``check_projected_attention``, ``check_dynamic_projection``,
``check_decode``, ``check_layer_args``, ``check_layer_input``, ``check_official_lra``, ...), which returns the
call's LSConfig where there is one. ``attention``: one call's tensors and settings; ``vision``: those of a
two-dimensional call; ``sequence``: calls over part of a sequence (decoding, shards); ``model``: the layers.
"""
from .attention import (check_attention, check_dynamic_projection, check_projected_attention, use_triton)
from .model import (check_layer_2d_args, check_layer_2d_input, check_layer_args, check_layer_cache, check_layer_input,
                    check_layer_sharded, check_official_lra, check_official_lra_dconv, check_official_vil)
from .sequence import check_cache_fits, check_decode, check_shard_lengths
from .vision import check_attention_2d, check_projected_attention_2d

__all__ = ["check_attention", "check_attention_2d", "check_cache_fits", "check_decode", "check_dynamic_projection",
           "check_layer_2d_args", "check_layer_2d_input", "check_layer_args", "check_layer_cache",
           "check_layer_input", "check_layer_sharded", "check_official_lra", "check_official_lra_dconv",
           "check_official_vil", "check_projected_attention", "check_projected_attention_2d", "check_shard_lengths",
           "use_triton"]
