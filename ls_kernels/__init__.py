"""Fused Triton kernels for long-short attention (Transformer-LS)."""
from .long_short import ls_attention

__version__ = "0.1.0"
__all__ = ["ls_attention"]
