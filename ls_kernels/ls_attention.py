"""Long-short attention: public entry point."""
import torch

from .blocked import ls_attention_torch
from .checks import check_inputs


def ls_attention(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                 project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5, backend="auto"):
    window = check_inputs(q, k, v, proj, window, causal, chunk, ln_local, ln_global,
                          key_padding_mask, scale, eps, backend)
    return ls_attention_torch(q, k, v, proj, window=window, causal=causal, chunk=chunk, ln_local=ln_local,
                              ln_global=ln_global, project_after_ln=project_after_ln,
                              key_padding_mask=key_padding_mask, scale=scale, eps=eps)
