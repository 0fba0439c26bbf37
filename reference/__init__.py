from .ls_reference import ls_attention_ref

__all__ = ["ls_attention_ref"]
