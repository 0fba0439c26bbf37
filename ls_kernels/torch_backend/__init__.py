"""The blocked PyTorch path (``backend="torch"``): CPU default, and the unfused baseline on CUDA."""
from .blocked import DEFAULT, Options, attention, project

__all__ = ["DEFAULT", "Options", "attention", "project"]
