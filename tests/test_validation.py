"""Bad input raises ValueError whose message names the argument."""
import pytest
import torch

from ls_kernels import ls_attention

B, H, N, D, R = 2, 3, 10, 8, 4


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def good(**changes):
    """Valid arguments of ls_attention, with some replaced."""
    args = dict(q=t(B, H, N, D), k=t(B, H, N, D), v=t(B, H, N, D), proj=t(B, H, N, R), window=4, causal=True,
                chunk=4, ln_local=(t(D), t(D)), ln_global=(t(H, D), t(H, D)),
                key_padding_mask=t(B, N, dtype=torch.bool), eps=1e-5, backend="torch")
    args.update(changes)
    return args


def test_valid_arguments_pass():
    assert ls_attention(**good()).shape == (B, H, N, D)


BAD = {
    "q-rank3": (dict(q=t(B, N, D)), "q"),
    "k-rank5": (dict(k=t(B, H, N, D, 1)), "k"),
    "v-rank2": (dict(v=t(N, D)), "v"),
    "k-shape": (dict(k=t(B, H, N + 1, D)), "k"),
    "v-shape": (dict(v=t(B, H, N, D + 1)), "v"),
    "k-dtype": (dict(k=t(B, H, N, D, dtype=torch.float64)), "k"),
    "v-dtype": (dict(v=t(B, H, N, D, dtype=torch.float16)), "v"),
    "q-int": (dict(q=t(B, H, N, D, dtype=torch.int32), k=t(B, H, N, D, dtype=torch.int32),
                   v=t(B, H, N, D, dtype=torch.int32)), "q"),
    "proj-N": (dict(proj=t(B, H, N + 1, R)), "proj"),
    "proj-rank3": (dict(proj=t(B, H, N)), "proj"),
    "proj-r0": (dict(proj=t(B, H, N, 0)), "proj"),
    "proj-int": (dict(proj=t(B, H, N, R, dtype=torch.int64)), "proj"),
    "window-negative": (dict(window=-1), "window"),
    "window-float": (dict(window=4.0), "window"),
    "window-str": (dict(window="4"), "window"),
    "chunk-0": (dict(chunk=0), "chunk"),
    "chunk-negative": (dict(chunk=-3), "chunk"),
    "nothing-to-attend": (dict(proj=None, window=0), "window"),
    "ln_local-D+1": (dict(ln_local=(t(D + 1), t(D + 1))), "ln_local"),
    "ln_local-H+1": (dict(ln_local=(t(H + 1, D), t(H + 1, D))), "ln_local"),
    "ln_global-D+1": (dict(ln_global=(t(D + 1), t(D + 1))), "ln_global"),
    "ln_global-H+1": (dict(ln_global=(t(H + 1, D), t(H + 1, D))), "ln_global"),
    "ln_global-3d": (dict(ln_global=(t(1, H, D), t(1, H, D))), "ln_global"),
    "ln_local-single-tensor": (dict(ln_local=t(D)), "ln_local"),
    "ln_local-triple": (dict(ln_local=(t(D), t(D), t(D))), "ln_local"),
    "ln_global-weight-only": (dict(ln_global=(t(D),)), "ln_global"),
    "ln_local-bias-shape": (dict(ln_local=(t(D), t(H, D))), "ln_local"),
    "mask-shape": (dict(key_padding_mask=t(B, N + 1, dtype=torch.bool)), "key_padding_mask"),
    "mask-3d": (dict(key_padding_mask=t(B, 1, N, dtype=torch.bool)), "key_padding_mask"),
    "mask-float": (dict(key_padding_mask=t(B, N)), "key_padding_mask"),
    "mask-int": (dict(key_padding_mask=t(B, N, dtype=torch.int64)), "key_padding_mask"),
    "backend": (dict(backend="cuda-magic"), "backend"),
    "eps-0": (dict(eps=0.0), "eps"),
    "eps-negative": (dict(eps=-1e-5), "eps"),
    "k-meta-device": (dict(k=t(B, H, N, D, device="meta")), "k"),
    "proj-meta-device": (dict(proj=t(B, H, N, R, device="meta")), "proj"),
    "mask-meta-device": (dict(key_padding_mask=t(B, N, dtype=torch.bool, device="meta")), "key_padding_mask"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_value_error_naming_it(name):
    changes, arg = BAD[name]
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):  # the argument's name as a word
        ls_attention(**good(**changes))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_nothing_to_attend_message_names_window_and_proj(causal):
    with pytest.raises(ValueError) as info:
        ls_attention(**good(proj=None, window=0, causal=causal))
    assert "window" in str(info.value) and "proj" in str(info.value)


def test_shape_error_reports_the_shape_it_got():
    with pytest.raises(ValueError, match=r"k.*\(2, 3, 11, 8\)"):
        ls_attention(**good(k=t(B, H, N + 1, D)))


@pytest.mark.parametrize("given", [False, True], ids=["ln_stats-missing", "ln_stats-unneeded"])
def test_backend_backward_checks_ln_stats(given):
    """The Triton backward needs the forward's LN_L statistics exactly when LN_L is used: a missing or
    unexpected one is a ValueError naming ln_stats, never a kernel reading garbage."""
    from ls_kernels.config import LSConfig
    from ls_kernels.triton_backend import backward

    cfg = LSConfig(window=4 if not given else 0, causal=False, chunk=4, rank=R, scale=D ** -0.5)
    q = torch.randn(B, H, N, D)
    with pytest.raises(ValueError, match="ln_stats"):
        backward(torch.randn(B, H, N, D), q, q, q, cfg=cfg, o=q, lse=torch.zeros(B, H, N),
                 ln_stats=torch.zeros(4, B, H, N) if given else None, ln_local=(t(D), t(D)) if not given else None)
