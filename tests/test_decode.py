"""Decoding with a cache: prefill then token-by-token (or several tokens per step) decoding gives the rows of one
causal call over each whole sequence, through ``ls_decode`` and through the layer; per-sequence prompt lengths
with right padding; what the cache holds and its size; bad calls."""
import pytest
import torch

from ls_kernels import LongShortAttention, LSCache, ls_attention, ls_decode
from ls_kernels.cache import full_kv_cache_nbytes
from reference import ls_attention_ref
from reference.inputs import make_inputs, to64
from cases import DEVICE, TINY
from ls_kernels.config import INTERPRET

# the Triton decode kernels run the one-token steps (in the interpreter without a GPU)
BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" or INTERPRET else [])

# (N, D, w, r, chunk, prefill, step, ln_local, ln_global, project_after_ln): N covers the first 3 w positions
# and several chunk boundaries
CASES = [
    (40, 8, 8, 2, 4, 7, 1, "head", "shared", False),
    (40, 16, 8, 1, 16, 0, 3, "shared", "head", True),  # no prefill, steps of 3
    (30, 8, 1, 3, 1, 5, 1, None, "head", True),  # w = 1, chunk 1
    (37, 8, 0, 3, 5, 10, 2, "shared", None, False),  # projection only
    (33, 40, 6, None, 4, 1, 1, "head", None, False),  # window only
    (45, 8, 12, 2, 7, 20, 3, "head", "head", True),
    (26, 8, 30, 1, 4, 26, 1, "shared", "shared", False),  # the whole sequence in one prefill, w > N
]


def case_id(c):
    N, D, w, r, l, P, step, lnL, lnG, after = c
    return (f"B2-H3-N{N}-D{D}-w{w}-r{r}-l{l}-prefill{P}-step{step}-lnL_{lnL}-lnG_{lnG}"
            f"{'-after' if after else ''}")


def _steps(N, prefill, step):
    sizes = [prefill] if prefill else []
    while sum(sizes) < N:
        sizes.append(min(step, N - sum(sizes)))
    return sizes


def _decode_all(q, k, v, proj, kw, c, backend="torch", cache=None):
    """ls_decode over the sequence in the case's steps; the outputs concatenated (B, H, N, D), and the cache."""
    N, D, w, r, l, P, step, lnL, lnG, after = c
    B, H = q.shape[:2]
    cache = LSCache.empty(B, H, D, window=w, chunk=l, rank=r or 0, dtype=q.dtype) if cache is None else cache
    outs, start = [], 0
    for n in _steps(N, P, step):
        sl = slice(start, start + n)
        outs.append(ls_decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], None if proj is None else proj[:, :, sl], cache,
                              window=w, chunk=l, ln_local=kw["ln_local"], ln_global=kw["ln_global"],
                              project_after_ln=after, backend=backend))
        start += n
    return torch.cat(outs, 2), cache


def _case_inputs(c, dtype):
    N, D, w, r, l, P, step, lnL, lnG, after = c
    q, k, v, proj, kw = make_inputs(2, 3, N, D, r, dtype=dtype, ln_local=lnL, ln_global=lnG, chunk=l)
    return q, k, v, proj, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_decode_equals_full_call_fp64(c, backend):
    q, k, v, proj, kw = _case_inputs(c, torch.float64)
    got, cache = _decode_all(q, k, v, proj, kw, c, backend)
    full = ls_attention(q, k, v, proj, window=c[2], causal=True, project_after_ln=c[9], backend="torch", **kw)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)
    assert cache.lengths.tolist() == [c[0]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES[:3], ids=case_id)
def test_decode_fp16_two_times_rule(c, backend):
    """fp16 decoding: max error against fp64 at most 2x that of the same-dtype reference, plus a tiny atol."""
    q, k, v, proj, kw = _case_inputs(c, torch.float16)
    got, _ = _decode_all(q, k, v, proj, kw, c, backend)
    common = dict(window=c[2], causal=True, project_after_ln=c[9])
    kw64 = dict(kw, **{s: None if kw[s] is None else tuple(to64(x) for x in kw[s]) for s in ("ln_local", "ln_global")})
    ref = ls_attention_ref(to64(q), to64(k), to64(v), to64(proj), **common, **kw64)
    same = ls_attention_ref(q, k, v, proj, upcast=False, **common, **kw)
    err, err_same = ((x.double() - ref).abs().max().item() for x in (got, same))
    assert err <= 2 * err_same + TINY[torch.float16], (err, err_same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompts_of_different_lengths_with_right_padding(backend):
    """A padded prefill (prompts of 3, 11 and 0 tokens), then steps of 1 and 2 tokens, and a step in which one
    sequence sits out (padding): each sequence's outputs are the rows of a call over that sequence alone;
    padded rows are zero and never enter the cache."""
    N, D, w, r, l = 24, 8, 5, 2, 4
    prompts = [3, 11, 0]
    q, k, v, proj, kw = make_inputs(3, 2, N, D, r, dtype=torch.float64, ln_local="head", ln_global="shared", chunk=l)
    ln = dict(ln_local=kw["ln_local"], ln_global=kw["ln_global"], window=w, chunk=l)
    run = dict(ln, backend=backend)
    cache = LSCache.empty(3, 2, D, window=w, chunk=l, rank=r, dtype=torch.float64)
    P = max(prompts)
    pad = torch.arange(P)[None, :] >= torch.tensor(prompts)[:, None]
    # each sequence's tokens start at index 0 of its own stream: row b's prompt is q[b, :, :prompts[b]]
    out = ls_decode(q[:, :, :P], k[:, :, :P], v[:, :, :P], proj[:, :, :P], cache, key_padding_mask=pad, **run)
    assert cache.lengths.tolist() == prompts
    assert (out.transpose(1, 2)[pad] == 0).all()
    outs = [[out[b, :, :prompts[b]]] for b in range(3)]
    pos = list(prompts)
    for n, sits_out in ((1, None), (2, None), (1, 1), (1, None), (2, 0), (2, None)):
        idx = torch.tensor([[p + i for i in range(n)] for p in pos])  # (3, n): each sequence's next positions
        pick = lambda x: x.gather(2, idx[:, None, :, None].expand(3, x.shape[1], n, x.shape[3]))  # noqa: E731
        step_pad = torch.zeros(3, n, dtype=torch.bool)
        if sits_out is not None:
            step_pad[sits_out] = True
        o = ls_decode(pick(q), pick(k), pick(v), pick(proj), cache, key_padding_mask=step_pad, **run)
        for b in range(3):
            if b == sits_out:
                assert (o[b] == 0).all()
            else:
                outs[b].append(o[b])
        pos = [p + (0 if b == sits_out else n) for b, p in enumerate(pos)]
    assert cache.lengths.tolist() == pos
    for b in range(3):
        alone = ls_attention(q[b:b + 1, :, :pos[b]], k[b:b + 1, :, :pos[b]], v[b:b + 1, :, :pos[b]],
                             proj[b:b + 1, :, :pos[b]], causal=True, backend="torch", **ln)
        torch.testing.assert_close(torch.cat(outs[b], 1), alone[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual_ln", ["head", "model", None])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_layer_with_cache_equals_full_forward(dual_ln, after, backend):
    """Prefill of 9 tokens, steps of 3, then steps of 1 (the decode kernels on the Triton backend)."""
    torch.manual_seed(0)
    layer = LongShortAttention(32, 4, window=5, rank=2, causal=True, chunk=4, dual_ln=dual_ln,
                               project_after_ln=after, backend=backend).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.init_cache(2)
    outs = [layer(x[:, :9], cache=cache)] + [layer(x[:, i:i + 3], cache=cache) for i in range(9, 18, 3)]
    outs += [layer(x[:, i:i + 1], cache=cache) for i in range(18, 30)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_cache_holds_the_window_and_finished_chunks():
    """After t tokens: the last w - 1 LN_L keys (oldest first), floor(t / l) * r projected vectors, t mod l rows of
    the unfinished chunk; the used bytes follow the formula and stay far below a full KV cache."""
    N, D, w, r, l = 43, 8, 6, 2, 4
    q, k, v, proj, kw = make_inputs(1, 2, N, D, r, dtype=torch.float64, ln_local=None, ln_global=None, chunk=l)
    cache = LSCache.empty(1, 2, D, window=w, chunk=l, rank=r, dtype=torch.float64, capacity=1)
    for i in range(N):
        ls_decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], proj[:, :, i:i + 1], cache, window=w, chunk=l)
    last = torch.arange(N - w + 1, N)  # the last w - 1 positions, in slots p mod (w - 1); no LN_L: keys as given
    torch.testing.assert_close(cache.win_k[:, :, last % (w - 1)], k[:, :, last], rtol=0, atol=0)
    assert cache.kg.shape[2] >= (N // l) * r  # grown from room for one chunk
    P = torch.softmax(proj[:, :, :N // l * l].reshape(1, 2, N // l, l, r), dim=3)
    kg = (P.transpose(-1, -2) @ k[:, :, :N // l * l].reshape(1, 2, N // l, l, D)).reshape(1, 2, -1, D)
    torch.testing.assert_close(cache.kg[:, :, :(N // l) * r], kg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.part_k[:, :, :N % l], k[:, :, N // l * l:], rtol=0, atol=0)  # slots p mod l
    es = 8
    expected = 2 * (w - 1) * D * es * 2 + 2 * (N // l) * r * D * es * 2 + ((l - 1) * (2 * D + r) * es) * 2 + 8
    assert cache.nbytes() == expected
    assert cache.nbytes() < full_kv_cache_nbytes([N], 2, D, torch.float64)


def test_decode_bad_calls():
    layer = LongShortAttention(16, 2, window=4, rank=1, causal=True, chunk=4)
    bidir = LongShortAttention(16, 2, window=4, rank=1, causal=False)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="cache: a bidirectional layer"):
        bidir(x, cache=layer.init_cache(2))
    with pytest.raises(ValueError, match="init_cache: a bidirectional layer"):
        bidir.init_cache(2)
    with pytest.raises(ValueError, match="batch_size 3"):
        layer(x, cache=layer.init_cache(3))
    with pytest.raises(ValueError, match="dtype = torch.float64"):
        layer(x, cache=layer.init_cache(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must hold at least one new token"):
        layer(x[:, :0], cache=layer.init_cache(2))
    with pytest.raises(ValueError, match="right padding"):
        layer(x, key_padding_mask=torch.tensor([[True, False, False], [False, False, False]]),
              cache=layer.init_cache(2))
    with pytest.raises(ValueError, match="cache must be an LSCache"):
        layer(x, cache={})
    q = torch.randn(2, 2, 3, 8)
    cache = LSCache.empty(2, 2, 8, window=4, chunk=4, rank=1)
    with pytest.raises(ValueError, match="window = 4, but this call has window = 5"):
        ls_decode(q, q, q, q[..., :1], cache, window=5, chunk=4)
    with pytest.raises(ValueError, match="rank = 1, but this call has rank = 0"):
        ls_decode(q, q, q, None, cache, window=4, chunk=4)
    with pytest.raises(ValueError, match="q must hold at least one new token"):
        ls_decode(q[:, :, :0], q[:, :, :0], q[:, :, :0], q[:, :, :0, :1], cache, window=4, chunk=4)


def _char_lm_module():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "char_lm.py")
    spec = importlib.util.spec_from_file_location("char_lm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dual_ln", ["head", "model"])
def test_greedy_generation_with_the_cache_equals_recomputation(dual_ln):
    """The example's model: greedy tokens with the cache (prefill, then one token per step) are those of
    recomputing the whole prefix for every token, past several windows and chunks."""
    char_lm = _char_lm_module()
    torch.manual_seed(0)
    model = char_lm.CharLM(11, 16, 2, 2, window=5, rank=2, chunk=3, dual_ln=dual_ln).double()
    prompt = torch.tensor([[1, 4, 2, 7, 3], [0, 0, 9, 9, 5]])
    cached = char_lm.generate(model, prompt, 40, temperature=0)
    recomputed = char_lm.generate(model, prompt, 40, use_cache=False, temperature=0)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, 5:].flatten().tolist())) > 1  # the tokens are not all one
