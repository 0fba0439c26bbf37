"""The fused Triton kernels (``kernels/``) and their launchers (``launch.py``: forward and backward)."""
from .args import kernel_dtype
from .launch import Grads, backward, forward
from .projection import Projected

__all__ = ["Grads", "Projected", "backward", "forward", "kernel_dtype"]
