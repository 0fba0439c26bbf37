"""Full fp64 gradcheck of the blocked path (backend="torch") w.r.t. q, k, v, proj and the LN weights and biases."""
import pytest
import torch

from cases import blocked_with
from ls_kernels import ls_attention


# causal, B, N, D, window, r, chunk, padding, ln_local, ln_global, project_after_ln
CASES = [
    (False, 1, 7, 4, 3, 2, 4, "none", "off", "off", False),
    (False, 2, 9, 8, 2, 1, 4, "rows", "shared", "head", True),
    (False, 2, 5, 4, 0, 3, 4, "seq", "head", "shared", False),  # projection only
    (False, 1, 11, 4, 4, None, 4, "rows", "head", "off", False),  # window only
    (False, 1, 13, 4, 1, 2, 4, "none", "shared", "shared", True),
    (False, 1, 6, 4, 8, 2, 4, "rows", "off", "head", True),  # window longer than N
    (True, 1, 9, 4, 2, 1, 4, "none", "off", "off", False),
    (True, 2, 13, 4, 3, 2, 3, "rows", "shared", "head", True),
    (True, 1, 10, 8, 0, 2, 4, "none", "head", "shared", False),  # first chunk sees nothing
    (True, 2, 11, 4, 5, 1, 4, "chunk", "head", "head", True),  # a fully padded chunk
    (True, 2, 7, 4, 2, None, 4, "seq", "shared", "off", False),
    (True, 1, 12, 4, 20, 1, 5, "none", "off", "shared", True),
]


def case_id(c):
    causal, B, N, D, w, r, chunk, pad, lnL, lnG, after = c
    return (f"{'causal' if causal else 'bidir'}-B{B}-N{N}-D{D}-w{w}-r{r}-l{chunk}-pad{pad}"
            f"-lnL_{lnL}-lnG_{lnG}-{'after' if after else 'before'}")


def gradcheck_case(c, H=2, attention=None):
    causal, B, N, D, w, r, chunk, pad, lnL, lnG, after = c
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"q": randn(B, H, N, D), "k": randn(B, H, N, D), "v": randn(B, H, N, D)}
    if r is not None:
        x["proj"] = randn(B, H, N, r)
    for side, mode in (("lnL", lnL), ("lnG", lnG)):
        shape = {"off": None, "shared": (D,), "head": (H, D)}[mode]
        if shape is not None:
            x[side + "_w"], x[side + "_b"] = 1 + 0.5 * randn(*shape), 0.5 * randn(*shape)
    mask = None
    if pad != "none":
        mask = torch.rand(B, N, generator=g) < 0.3
        if pad == "seq":
            mask[-1] = True
        if pad == "chunk":
            mask[0, chunk:2 * chunk] = True

    def f(*tensors):
        t = dict(zip(x, tensors))
        ln = lambda side: (t[side + "_w"], t[side + "_b"]) if side + "_w" in t else None  # noqa: E731
        fn = attention or (lambda *a, **kw: ls_attention(*a, backend="torch", **kw))
        return fn(t["q"], t["k"], t["v"], t.get("proj"), window=w, causal=causal, chunk=chunk,
                  ln_local=ln("lnL"), ln_global=ln("lnG"), project_after_ln=after, key_padding_mask=mask)

    inputs = tuple(t.requires_grad_() for t in x.values())
    assert torch.autograd.gradcheck(f, inputs, fast_mode=False)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_gradcheck_blocked(c):
    gradcheck_case(c)


def test_gradcheck_causal_query_groups():
    """Checkpointed query groups of the causal projected part (2 chunks per group here)."""
    c = (True, 1, 13, 4, 2, 2, 3, "rows", "shared", "shared", False)
    gradcheck_case(c, attention=blocked_with(causal_global_elems=1 * 2 * (13 // 3) * 2 * 6))
