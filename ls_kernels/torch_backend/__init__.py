"""The blocked PyTorch path (``backend="torch"``): CPU default, and the unfused baseline on CUDA."""
from .blocked import DEFAULT, Options, attention, project
from .decode import decode

__all__ = ["DEFAULT", "Options", "attention", "decode", "project"]
