"""The blocked PyTorch path (``backend="torch"``): CPU default, and the unfused baseline on CUDA."""
from .blocked import DEFAULT, Options, attention, project
from .decode import attend as decode_attend

__all__ = ["DEFAULT", "Options", "attention", "decode_attend", "project"]
