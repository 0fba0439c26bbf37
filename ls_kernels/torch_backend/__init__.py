"""The blocked PyTorch path (``backend="torch"``): CPU default, and the unfused baseline on CUDA."""
from .blocked import DEFAULT, Options, attention, project
from .decode import attend as decode_attend
from . import vision
from .vision import attention_2d

__all__ = ["DEFAULT", "Options", "attention", "attention_2d", "decode_attend", "project", "vision"]
