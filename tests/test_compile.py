"""torch.compile(fullgraph=True) of models built from LongShortAttention, and opcheck of the custom ops.

Without a GPU the Triton ops run in Triton's interpreter; compiling them still exercises
their fake (meta) implementations and autograd formulas.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from ls_kernels import LongShortAttention, ls_attention, ls_attention_projected, ops
from ls_kernels.config import INTERPRET

triton_only = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                 reason="needs CUDA or TRITON_INTERPRET=1")
VOCAB, E, H = 40, 32, 4


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = LongShortAttention(E, H, **kw)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.norm1(x), key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E)
        self.blocks = nn.ModuleList([Block(**kw) for _ in range(2)])
        self.head = nn.Linear(E, VOCAB)

    def forward(self, ids, key_padding_mask=None):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.head(x)


def _batch(N, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, N), generator=g)
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[1, N - 5:] = True
    return ids, pad


def _loss_and_grads(model, ids, pad):
    model.zero_grad()
    out = model(ids, pad)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _strict(limit):
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


MODES = [  # dual_ln, causal
    ("head", False), ("head", True), ("model", False), ("model", True), (None, True),
]


@pytest.mark.parametrize("dual_ln,causal", MODES, ids=[f"{d}-{'causal' if c else 'bidir'}" for d, c in MODES])
def test_fullgraph_compile_matches_eager(dual_ln, causal):
    torch.manual_seed(0)
    model = TinyModel(window=4, rank=2, causal=causal, chunk=4, dual_ln=dual_ln)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with _strict(1):  # same shapes, new data: no recompilation
        for seed in range(3):
            ids, pad = _batch(24, seed)
            out_c, grads_c = _loss_and_grads(compiled, ids, pad)
            out_e, grads_e = _loss_and_grads(model, ids, pad)
            torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
            for a, b in zip(grads_c, grads_e):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_compile_dynamic_lengths_two_graphs(causal):
    """A new length compiles once more with a dynamic N; later lengths reuse that graph."""
    torch.manual_seed(0)
    model = TinyModel(window=4, rank=2, causal=causal, chunk=4)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with _strict(2):
        for N in (24, 32, 19, 40):
            ids, pad = _batch(N, N)
            out_c, grads_c = _loss_and_grads(compiled, ids, pad)
            out_e, grads_e = _loss_and_grads(model, ids, pad)
            torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_with_dropout_fullgraph():
    """Dropout (blocked path, plain autograd) traces into the graph: compiles, trains, eval matches."""
    torch.manual_seed(0)
    model = TinyModel(window=4, rank=2, causal=True, chunk=4, dual_ln="model", dropout=0.2, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, pad = _batch(24, 0)
    with _strict(2):  # train and eval graphs
        out, grads = _loss_and_grads(compiled, ids, pad)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        model.eval()
        torch.testing.assert_close(compiled(ids, pad), model(ids, pad), atol=1e-6, rtol=1e-6)


def _check_compiled(compiled, model, ids, pad, atol, rtol, grad_rtol):
    """Loss and parameter gradients of the compiled model (compiled once, no recompile) against eager."""
    with _strict(1):
        out_c, grads_c = _loss_and_grads(compiled, ids, pad)
    out_e, grads_e = _loss_and_grads(model, ids, pad)
    torch.testing.assert_close(out_c, out_e, atol=atol, rtol=rtol)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=atol, rtol=grad_rtol)


def test_compile_inductor_forward_backward():
    torch.manual_seed(0)
    model = TinyModel(window=4, rank=2, causal=True, chunk=4)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    # inductor fuses and reorders the fp32 reductions around the op: rounding-level differences
    _check_compiled(compiled, model, *_batch(24, 0), atol=1e-5, rtol=1e-5, grad_rtol=1e-4)


@triton_only
@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_compile_triton_backend(dual_ln):
    """The Triton ops inside a compiled graph (interpreter on CPU): fake shapes and strides are right."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TinyModel(window=4, rank=2, causal=False, dual_ln=dual_ln, backend="triton").to(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _check_compiled(compiled, model, *(t.to(device) for t in _batch(20, 0)), atol=1e-6, rtol=1e-6, grad_rtol=1e-6)


# ----------------------------------------------------------------------------- opcheck

def _op_args(causal, with_optional, dtype=torch.float32, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(0)
    B, Hh, N, D, r = 2, 2, 11, 8, 2

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_(requires_grad)

    q, k, v = t(B, Hh, N, D), t(B, Hh, N, D), t(B, Hh, N, D)
    if not with_optional:
        return (q, k, v, None, None, None, None, None, None, 3, causal, 4, False, 0.3, 1e-5)
    pad = torch.zeros(B, N, dtype=torch.bool, device=device)
    pad[1, 7:] = True
    return (q, k, v, t(B, Hh, N, r), t(Hh, D), t(Hh, D), t(D), t(D), pad, 3, causal, 4, True, 0.3, 1e-5)


OPCHECK = [(c, o) for c in (False, True) for o in (False, True)]
OPCHECK_IDS = [f"{'causal' if c else 'bidir'}-{'full' if o else 'bare'}" for c, o in OPCHECK]


@pytest.mark.parametrize("causal,with_optional", OPCHECK, ids=OPCHECK_IDS)
def test_opcheck_torch_ops(causal, with_optional):
    args = _op_args(causal, with_optional)
    torch.library.opcheck(ops.attention_torch_fwd, args)
    grad_out = torch.randn_like(args[0]).detach()
    torch.library.opcheck(ops.attention_torch_bwd, (grad_out, *[a.detach() if isinstance(a, torch.Tensor) else a
                                                                for a in args]))
    q, k, v = args[:3]
    G = 2 * (11 // 4) if causal else 2
    kg, vg = (torch.randn(2, 2, G, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ops.projected_torch_fwd, (q, k, v, kg, vg, args[8], 3, causal, 4, 2, 0.3))


@triton_only
@pytest.mark.parametrize("causal,with_optional", OPCHECK, ids=OPCHECK_IDS)
def test_opcheck_triton_ops(causal, with_optional):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _op_args(causal, with_optional, device=device)
    # aot_dispatch_dynamic compiles fwd + bwd with dynamic shapes: slow in the interpreter, once is enough
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if with_optional:
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(ops.attention_triton_fwd, (*args, True), test_utils=tests)
    q, k, v = args[:3]
    G = 2 * (11 // 4) if causal else 2
    kg, vg = (torch.randn(2, 2, G, 8, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(ops.projected_triton_fwd, (q, k, v, kg, vg, args[8], 3, causal, 4, 2, 0.3, True),
                          test_utils=tests)


@pytest.mark.parametrize("causal,with_optional", [(False, True), (True, True), (True, False)],
                         ids=["bidir-full", "causal-full", "causal-bare"])
def test_gradcheck_through_torch_ops(causal, with_optional):
    """Eager calls of the blocked backend skip the ops (plain autograd); here the ops are called directly:
    the backward op (recomputation under autograd) gives exact gradients."""
    args = _op_args(causal, with_optional, dtype=torch.float64)
    tensors, pad, config = args[:8], args[8], args[9:]
    present = [i for i, x in enumerate(tensors) if x is not None]

    def f(*xs):
        full = list(tensors)
        for i, x in zip(present, xs):
            full[i] = x
        return ops.attention_torch_fwd(*full, pad, *config)

    assert torch.autograd.gradcheck(f, [tensors[i] for i in present])
    q, k, v = tensors[:3]
    kg, vg = (torch.randn(2, 2, 2 * (11 // 4) if causal else 2, 8, dtype=torch.float64, requires_grad=True)
              for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda *xs: ops.projected_torch_fwd(*xs, pad, 3, causal, 4, 2, 0.3), (q, k, v, kg, vg))


# ----------------------------------------------------------------------------- the functions themselves

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_compile_functions_fullgraph(backend):
    args = _op_args(True, True)
    q, k, v, proj, lnl_w, lnl_b, lng_w, lng_b, pad = args[:9]

    def f(q, k, v, proj):
        a = ls_attention(q, k, v, proj, window=3, causal=True, chunk=4, ln_local=(lnl_w, lnl_b),
                         ln_global=(lng_w, lng_b), key_padding_mask=pad, backend=backend)
        b = ls_attention_projected(q, k, v, window=3, causal=True, key_padding_mask=pad, backend=backend)
        return (a * b).sum()

    torch._dynamo.reset()
    with _strict(1):
        got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, proj), [q, k, proj])
    want = torch.autograd.grad(f(q, k, v, proj), [q, k, proj])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
