"""The fused Triton kernels (``kernels/``) and their launchers (``launch.py``: forward and backward;
``vision.py``: the two-dimensional attention's)."""
from . import vision
from .args import kernel_dtype
from .decode import decode_attend
from .launch import Grads, backward, forward
from .projection import Projected

__all__ = ["Grads", "Projected", "backward", "decode_attend", "forward", "kernel_dtype", "vision"]
