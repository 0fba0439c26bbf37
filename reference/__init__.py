from .ls_reference import ls_attention_2d_ref, ls_attention_ref, rel_pos_bias_2d, window_mask, window_mask_2d

__all__ = ["ls_attention_2d_ref", "ls_attention_ref", "rel_pos_bias_2d", "window_mask", "window_mask_2d"]
