from .ls_reference import ls_attention_ref, window_mask

__all__ = ["ls_attention_ref", "window_mask"]
