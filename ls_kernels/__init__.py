"""Fused Triton kernels for long-short attention (Transformer-LS)."""
from .api import (dynamic_projection, ls_attention, ls_attention_2d, ls_attention_2d_projected,
                  ls_attention_projected, ls_decode)
from .cache import LSCache
from .layer import LongShortAttention
from .layer2d import LongShortAttention2d

__version__ = "0.1.0"
__all__ = ["LSCache", "LongShortAttention", "LongShortAttention2d", "dynamic_projection", "ls_attention",
           "ls_attention_2d", "ls_attention_2d_projected", "ls_attention_projected", "ls_decode"]
