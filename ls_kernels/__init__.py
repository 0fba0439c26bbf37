"""Fused Triton kernels for long-short attention (Transformer-LS)."""
from .layer import LongShortAttention
from .long_short import ls_attention
from .projected import dynamic_projection, ls_attention_projected

__version__ = "0.1.0"
__all__ = ["LongShortAttention", "dynamic_projection", "ls_attention", "ls_attention_projected"]
