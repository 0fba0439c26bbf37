"""Blocked PyTorch path (backend="torch") against the dense fp64 reference: forward and every gradient."""
import itertools
import random

import pytest
import torch

from ls_kernels import blocked, ls_attention
from reference import ls_attention_ref


AXES = {
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
    return {(a, case[a], b, case[b]) for a, b in itertools.combinations(AXES, 2)}


def covering_cases(n_total, seed=0):
    """Every pair of values of every two axes appears at least once (greedy), then random cases up to n_total."""
    rng = random.Random(seed)

    def draw(fixed):
        while True:
            case = {a: fixed[a] if a in fixed else rng.choice(vals) for a, vals in AXES.items()}
            if allowed(case):
                return case

    todo = {(a, x, b, y) for a, b in itertools.combinations(AXES, 2)
            for x in AXES[a] for y in AXES[b]} - {("w", 0, "r", None)}
    cases = []
    while todo:
        a, x, b, y = min(todo, key=repr)
        best = max((draw({a: x, b: y}) for _ in range(20)), key=lambda c: len(value_pairs(c) & todo))
        cases.append(best)
        todo -= value_pairs(best)
    cases += [draw({}) for _ in range(n_total - len(cases))]
    return [dict(c, B=2, H=3) for c in cases]


def case_id(c):
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


def make_inputs(c, seed=0):
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


def check_case(c):
    inputs, mask = make_inputs(c)
    ref = run(ls_attention_ref, c, inputs, mask, torch.float64)
    got64 = run(ls_attention, c, inputs, mask, torch.float64, backend="torch")
    got32 = run(ls_attention, c, inputs, mask, torch.float32, backend="torch")
    assert_matches(got64, ref, rtol=1e-10)
    assert_matches(got32, ref, rtol=1e-5)
    for name, t in got32.items():
        assert torch.isfinite(t).all(), name
    if mask is not None:  # padded positions: zero output, zero gradients of q, k, v, proj
        for name in ("out", "q", "k", "v", "proj"):
            if name in got32:
                assert (got32[name].transpose(1, 2)[mask] == 0).all(), name


CASES = covering_cases(200)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_blocked_matches_reference(c):
    check_case(c)


PAPER = {  # (causal, w, r, chunk, N, H, D); LN shared on both sides as DualLN
    "lra": (False, 8, 32, 16, 512, 2, 32),
    "text": (False, 1, 1, 16, 512, 2, 32),
    "listops": (False, 16, 2, 16, 512, 2, 32),
    "retrieval": (False, 1, 254, 16, 512, 2, 32),
    "charlm": (True, 512, 1, 16, 1024, 2, 64),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs(name):
    causal, w, r, chunk, N, H, D = PAPER[name]
    check_case(dict(causal=causal, w=w, r=r, chunk=chunk, N=N, H=H, D=D, B=1, pad="none",
                    lnL="shared", lnG="shared", after=not causal))  # LRA code projects after LN, char-LM before


GROUPED = dict(causal=True, B=2, H=3, N=63, D=8, w=3, r=2, chunk=4, pad="rows", lnL="shared", lnG="head", after=False)
ELEMS_PER_QUERY = 2 * 3 * (63 // 4) * 2  # B * H * n_chunks * r: causal projected scores per query


def test_causal_global_query_groups(monkeypatch):
    """Long causal inputs are scored in checkpointed query groups; force groups of 3 chunks at N = 63."""
    monkeypatch.setattr(blocked, "_CAUSAL_GLOBAL_ELEMS", ELEMS_PER_QUERY * 12)
    check_case(GROUPED)


def test_causal_global_query_groups_of_one_chunk(monkeypatch):
    monkeypatch.setattr(blocked, "_CAUSAL_GLOBAL_ELEMS", ELEMS_PER_QUERY * 4)
    check_case(GROUPED)
