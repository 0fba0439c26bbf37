"""Case grids and helpers shared by the test modules: the blocked path's pairwise-covering grid, the Triton
kernels' grid, the paper's configurations, and the blocked path with non-default computation options."""
import itertools
import random

import torch

from ls_kernels import ls_attention, torch_backend
from ls_kernels.checks import check_attention
from ls_kernels.config import rel_pos_rows
from reference import ls_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# ----------------------------------------------------------------------------- blocked path

BLOCKED_AXES = {
    "causal": [False, True],
    "N": [1, 7, 63, 111, 256],
    "w": [0, 1, 3, 8, 16, "big"],  # big: N + 5
    "r": [None, 1, 2, 5],
    "chunk": [1, 4, 16],
    "D": [8, 40, 64],
    "pad": ["none", "rows", "seq", "chunk"],  # seq: a fully padded sequence; chunk: a fully padded chunk
    "lnL": ["off", "shared", "head"],
    "lnG": ["off", "shared", "head"],
    "after": [False, True],  # project_after_ln
}


def allowed(case):
    return not (case["w"] == 0 and case["r"] is None)


def value_pairs(case):
    return {(a, case[a], b, case[b]) for a, b in itertools.combinations(BLOCKED_AXES, 2)}


def covering_cases(n_total, seed=0):
    """Every pair of values of every two axes appears at least once (greedy), then random cases up to n_total."""
    rng = random.Random(seed)

    def draw(fixed):
        while True:
            case = {a: fixed[a] if a in fixed else rng.choice(vals) for a, vals in BLOCKED_AXES.items()}
            if allowed(case):
                return case

    todo = {(a, x, b, y) for a, b in itertools.combinations(BLOCKED_AXES, 2)
            for x in BLOCKED_AXES[a] for y in BLOCKED_AXES[b]} - {("w", 0, "r", None)}
    cases = []
    while todo:
        a, x, b, y = min(todo, key=repr)
        best = max((draw({a: x, b: y}) for _ in range(20)), key=lambda c: len(value_pairs(c) & todo))
        cases.append(best)
        todo -= value_pairs(best)
    cases += [draw({}) for _ in range(n_total - len(cases))]
    return [dict(c, B=2, H=3) for c in cases]


def blocked_id(c):
    return (f"{'causal' if c['causal'] else 'bidir'}-B{c['B']}-H{c['H']}-N{c['N']}-D{c['D']}-w{c['w']}-r{c['r']}"
            f"-l{c['chunk']}-pad{c['pad']}-lnL_{c['lnL']}-lnG_{c['lnG']}-{'after' if c['after'] else 'before'}")


def padding_mask(kind, B, N, chunk, g):
    if kind == "none":
        return None
    mask = torch.rand(B, N, generator=g) < 0.3  # random rows
    if kind == "seq":
        mask[1] = True
    if kind == "chunk":
        start = chunk if N >= 2 * chunk else 0
        mask[0, start:start + chunk] = True
    return mask


def blocked_inputs(c, seed=0):
    """fp64 inputs by name (q, k, v, proj, LN weights and biases) and the key padding mask."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = c["B"], c["H"], c["N"], c["D"]
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"q": randn(B, H, N, D), "k": randn(B, H, N, D), "v": randn(B, H, N, D)}
    if c["r"] is not None:
        x["proj"] = randn(B, H, N, c["r"])
    for side in ("lnL", "lnG"):
        shape = {"off": None, "shared": (D,), "head": (H, D)}[c[side]]
        if shape is not None:
            x[side + "_w"], x[side + "_b"] = 1 + 0.5 * randn(*shape), 0.5 * randn(*shape)
    return x, padding_mask(c["pad"], B, N, c["chunk"], g)


def run(fn, c, inputs, mask, dtype, **extra):
    """Output and gradients of sum(out * g_out) w.r.t. every input, all as dicts of tensors."""
    x = {n: t.to(dtype).requires_grad_() for n, t in inputs.items()}
    ln = lambda side: (x[side + "_w"], x[side + "_b"]) if side + "_w" in x else None  # noqa: E731
    w = c["N"] + 5 if c["w"] == "big" else c["w"]
    out = fn(x["q"], x["k"], x["v"], x.get("proj"), window=w, causal=c["causal"], chunk=c["chunk"],
             ln_local=ln("lnL"), ln_global=ln("lnG"), project_after_ln=c["after"], key_padding_mask=mask, **extra)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, list(x.values()), g_out, allow_unused=True)
    res = {n: torch.zeros_like(x[n]) if g is None else g for n, g in zip(x, grads)}
    res["out"] = out
    return res


def assert_matches(actual, expected, rtol):
    """Elementwise match with rtol and an absolute tolerance of rtol times max(largest |expected|, 1)."""
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        atol = rtol * max(exp.abs().max().item(), 1.0)
        torch.testing.assert_close(actual[name].double(), exp, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def blocked_with(**options):
    """ls_attention on the blocked path, computed with torch_backend.Options(**options)."""
    opts = torch_backend.Options(**options)

    def attention(q, k, v, proj=None, *, window, causal=False, chunk=16, ln_local=None, ln_global=None,
                  project_after_ln=False, key_padding_mask=None, scale=None, eps=1e-5):
        cfg, _ = check_attention(q, k, v, proj, window=window, causal=causal, chunk=chunk, ln_local=ln_local,
                                 ln_global=ln_global, project_after_ln=project_after_ln,
                                 key_padding_mask=key_padding_mask, scale=scale, eps=eps, backend="torch")
        return torch_backend.attention(q, k, v, cfg=cfg, proj=proj, ln_local=ln_local, ln_global=ln_global,
                                       pad=key_padding_mask, opts=opts)
    return attention


def _blocked(q, k, v, proj=None, **kw):
    return ls_attention(q, k, v, proj, backend="torch", **kw)


def check_case(c, attention=_blocked):
    """The blocked path (ls_attention, or `attention` with its signature) against the fp64 reference:
    output and every gradient, in fp64 and fp32; zeros at padded positions."""
    inputs, mask = blocked_inputs(c)
    ref = run(ls_attention_ref, c, inputs, mask, torch.float64)
    got64 = run(attention, c, inputs, mask, torch.float64)
    got32 = run(attention, c, inputs, mask, torch.float32)
    assert_blocked_results(got64, got32, ref, mask)


def assert_blocked_results(got64, got32, ref, mask):
    """Outputs and gradients of a blocked path in fp64 and fp32 against the fp64 reference's, all finite, and
    zero at padded positions (mask (B, N) or None) for the output and the gradients of q, k, v, proj."""
    assert_matches(got64, ref, rtol=1e-10)
    assert_matches(got32, ref, rtol=1e-5)
    for name, t in got32.items():
        assert torch.isfinite(t).all(), name
    if mask is not None:
        for name in ("out", "q", "k", "v", "proj"):
            if name in got32:
                assert (got32[name].transpose(1, 2)[mask] == 0).all(), name


BLOCKED_PAPER = {  # (causal, w, r, chunk, N, H, D); LN shared on both sides as DualLN
    "lra": (False, 8, 32, 16, 512, 2, 32),
    "text": (False, 1, 1, 16, 512, 2, 32),
    "listops": (False, 16, 2, 16, 512, 2, 32),
    "retrieval": (False, 1, 254, 16, 512, 2, 32),
    "charlm": (True, 512, 1, 16, 1024, 2, 64),
}



# ----------------------------------------------------------------------------- two-dimensional windows

# (grid, w, r, G, bias, pad, ln_local, ln_global, after, D): grids with odd sides, rectangular ones, w that does
# not divide them, w = 1 (3 x 3 neighbourhoods), w = 0 (no window), a window covering the grid, no projection,
# several global tokens
VISION_CASES = [
    ((1, 1), 1, None, 0, False, "none", "head", None, True, 8),
    ((7, 7), 7, 3, 1, True, "none", "shared", "shared", True, 40),
    ((14, 14), 7, 8, 1, True, "rows", "shared", "shared", True, 16),
    ((9, 5), 4, 2, 2, True, "rows", "head", "head", False, 48),
    ((8, 8), 8, 2, 1, True, "grid", None, None, True, 8),
    ((6, 11), 2, 5, 0, True, "none", "head", "shared", True, 8),
    ((5, 13), 1, 1, 1, False, "rows", "shared", None, False, 40),
    ((4, 6), 0, 3, 2, False, "rows", "head", "head", True, 8),
    ((10, 3), 3, None, 3, True, "grid", "shared", None, True, 16),
    ((3, 3), 5, None, 0, True, "none", None, None, True, 8),
]


def vision_id(c):
    (nx, ny), w, r, G, bias, pad, lnl, lng, after, D = c
    return (f"B2-H3-grid{nx}x{ny}-D{D}-w{w}-r{r}-G{G}{'-bias' if bias else ''}-pad_{pad}-lnL_{lnl}-lnG_{lng}"
            f"{'-after' if after else ''}")


def vision_inputs(c, seed=0):
    """fp64 inputs by name (q, k, v, proj, global keys and values, bias table, LN weights and biases), the key
    padding mask and the keyword settings of ls_attention_2d."""
    (nx, ny), w, r, G, bias, pad, lnl, lng, after, D = c
    B, H, N = 2, 3, nx * ny
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"q": randn(B, H, N, D), "k": randn(B, H, N, D), "v": randn(B, H, N, D)}
    if r is not None:
        x["proj"] = randn(B, H, N, r)
    if G:
        x["global_k"], x["global_v"] = randn(B, H, G, D), randn(B, H, G, D)
    if bias:
        x["rel_pos_bias"] = randn(rel_pos_rows(w), H)
    for side, kind in (("ln_local", lnl), ("ln_global", lng)):
        shape = {None: None, "shared": (D,), "head": (H, D)}[kind]
        if shape is not None:
            x[side + "_w"], x[side + "_b"] = 1 + 0.5 * randn(*shape), 0.5 * randn(*shape)
    mask = None
    if pad != "none":
        mask = torch.rand(B, N, generator=g) < 0.3
        if pad == "grid":  # the second image fully padded
            mask[1] = True
    return x, mask, dict(grid=(nx, ny), window=w, project_after_ln=after)


def run_2d(fn, inputs, mask, settings, dtype, **extra):
    """Output and gradients of sum(out * g_out) w.r.t. every input of a 2D attention function."""
    x = {n: t.to(dtype).requires_grad_() for n, t in inputs.items()}
    ln = lambda side: (x[side + "_w"], x[side + "_b"]) if side + "_w" in x else None  # noqa: E731
    out = fn(x["q"], x["k"], x["v"], x.get("proj"), global_k=x.get("global_k"), global_v=x.get("global_v"),
             rel_pos_bias=x.get("rel_pos_bias"), ln_local=ln("ln_local"), ln_global=ln("ln_global"),
             key_padding_mask=mask, **settings, **extra)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, list(x.values()), g_out, allow_unused=True)
    res = {n: torch.zeros_like(x[n]) if g is None else g for n, g in zip(x, grads)}
    res["out"] = out
    return res


# ----------------------------------------------------------------------------- Triton kernels

# tiny atol of the 2x rule: covers rounding of the output cast when both errors are ~0
TINY = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}
# readable absolute bound on the max error for inputs of unit scale
MAX_ERR = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}

TRITON_AXES = dict(
    causal=[False, True], N=[1, 7, 63, 111, 256], w=[0, 1, 3, 8, 16, 300], r=[None, 1, 2, 5],
    chunk=[1, 4, 16], D=[8, 40, 64], pad=["none", "rows", "seq", "chunk"],
    ln_local=[None, "shared", "head"], ln_global=[None, "shared", "head"], after=[False, True],
)
STEPS = dict(causal=1, N=3, w=5, r=3, chunk=2, D=1, pad=3, ln_local=2, ln_global=1, after=1)


def triton_grid(n):
    """n cases in which every value of every axis appears, mixed by coprime steps."""
    cases = []
    for i in range(n):
        c = {a: vals[(i * STEPS[a] + i // len(vals)) % len(vals)] for a, vals in TRITON_AXES.items()}
        if c["w"] == 0 and c["r"] is None:
            c["r"] = 2
        cases.append(c)
    return cases


def triton_id(c):
    return (f"{'causal' if c['causal'] else 'bidir'}-N{c['N']}-D{c['D']}-w{c['w']}-r{c['r']}-l{c['chunk']}"
            f"-pad_{c['pad']}-lnL_{c['ln_local']}-lnG_{c['ln_global']}{'-after' if c['after'] else ''}")


TRITON_PAPER = {  # (causal, N, H, D, w, r, chunk) at reduced N
    "lra-w8-r32": (False, 512, 2, 32, 8, 32, 16),
    "text-w1-r1": (False, 512, 2, 32, 1, 1, 16),
    "listops-w16-r2": (False, 512, 2, 32, 16, 2, 16),
    "retrieval-w1-r254": (False, 512, 2, 32, 1, 254, 16),
    "charlm-w512-l16-r1": (True, 1024, 2, 64, 512, 1, 16),
}
