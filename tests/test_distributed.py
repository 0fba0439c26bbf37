"""Context parallelism on CPU: gloo process groups of 2 and 4 spawned processes, each holding one shard of the
sequence. Outputs and gradients equal one process's ``ls_attention`` over the whole sequence (fp64 within
1e-10; fp32 within the 2x rule), both modes, padding (a fully padded shard too), both backends (Triton in the
interpreter), the layer with a process group; bad shard lengths raise ValueError on every rank."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cases import DEVICE
from ls_kernels.config import INTERPRET

# every spawned group must finish within this many seconds (a hang fails the test instead of blocking CI)
SPAWN_TIMEOUT = 240
# (causal, shard lengths, D, w, r, chunk, padding, ln_local, ln_global, project_after_ln)
CASES = {
    2: [
        (False, [16, 16], 8, 8, 3, 4, "none", "head", "shared", True),
        (False, [16, 13], 8, 8, 2, 4, "seq", "shared", None, False),  # a fully padded sequence
        (False, [6, 7], 8, 0, 2, 4, "none", None, "head", False),  # projection only
        (True, [12, 12], 8, 5, 2, 4, "none", "head", "shared", False),
        (True, [8, 9], 8, 1, None, 4, "rows", "head", None, False),  # window 1, window only
        (True, [16, 5], 16, 7, 3, 8, "rows", None, "head", True),  # w - 1 > the last shard
    ],
    4: [
        (False, [16, 8, 8, 5], 8, 8, 3, 4, "rows", "shared", "head", False),
        (True, [8, 12, 4, 9], 8, 5, 2, 4, "rows", "shared", "head", True),
        (True, [8, 8, 8, 8], 8, 3, 1, 4, "shard", "head", "shared", False),  # shard 2 all padding
    ],
}


def case_id(c):
    causal, lens, D, w, r, l, pad, lnL, lnG, after = c
    return (f"{'causal' if causal else 'bidir'}-shards{'_'.join(map(str, lens))}-D{D}-w{w}-r{r}-l{l}-pad_{pad}"
            f"-lnL_{lnL}-lnG_{lnG}{'-after' if after else ''}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    """fn(rank, world, *args) in `world` processes joined in a gloo group; fails on any child's exception or
    when the group runs past SPAWN_TIMEOUT."""
    ctx = mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.time() + SPAWN_TIMEOUT
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the process group of {world} ranks ran past {SPAWN_TIMEOUT} s")


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _inputs(c, dtype):
    from reference.inputs import make_inputs
    causal, lens, D, w, r, l, pad, lnL, lnG, after = c
    N = sum(lens)
    q, k, v, proj, kw = make_inputs(2, 3, N, D, r, dtype=dtype, pad="rows" if pad == "shard" else pad, chunk=l,
                                    ln_local=lnL, ln_global=lnG, requires_grad=True)
    if pad == "shard":  # the third shard all padding
        kw["key_padding_mask"][:, sum(lens[:2]):sum(lens[:3])] = True
    return q, k, v, proj, kw


def _leaves(q, k, v, proj, kw):
    return [x for x in (q, k, v, proj) if x is not None] + \
        [x for side in ("ln_local", "ln_global") if kw[side] is not None for x in kw[side]]


def _run_cases(rank, world, cases, backend, dtype, rule):
    """Every case: this rank's shard through ls_attention_cp against one process's ls_attention on the whole
    sequence (output rows and shard gradients; LN parameter gradients summed over the ranks)."""
    from ls_kernels import ls_attention
    from ls_kernels.distributed import ls_attention_cp
    from reference import ls_attention_ref
    from reference.inputs import to64
    for c in cases:
        causal, lens, D, w, r, l, pad, lnL, lnG, after = c
        q, k, v, proj, kw = _inputs(c, dtype)
        common = dict(window=w, causal=causal, project_after_ln=after)
        g_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        full = ls_attention(q, k, v, proj, backend="torch", **common, **kw)
        want = torch.autograd.grad(full, _leaves(q, k, v, proj, kw), g_out.to(dtype), allow_unused=True)
        s0 = sum(lens[:rank])
        rows = slice(s0, s0 + lens[rank])
        shard = [None if x is None else x.detach()[:, :, rows].clone().requires_grad_() for x in (q, k, v, proj)]
        ln = {side: None if kw[side] is None else tuple(x.detach().clone().requires_grad_() for x in kw[side])
              for side in ("ln_local", "ln_global")}
        mask = None if kw["key_padding_mask"] is None else kw["key_padding_mask"][:, rows]
        out = ls_attention_cp(*shard, chunk=l, key_padding_mask=mask, backend=backend, **ln, **common)
        leaves = _leaves(*shard, ln)
        got = torch.autograd.grad(out, leaves, g_out[:, :, rows].to(dtype), allow_unused=True)
        n_shard = sum(x is not None for x in shard)
        pairs = [(out, full[:, :, rows])]
        for i, (a, b, x) in enumerate(zip(got, want, leaves)):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            if i < n_shard:
                b = b[:, :, rows]
            else:  # a parameter every shard uses: its gradient is the sum of theirs
                a = a.clone()
                dist.all_reduce(a)
            pairs.append((a, b))
        if rule == "exact":
            for i, (a, b) in enumerate(pairs):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case_id(c)} #{i}: {m}")
        else:  # the 2x rule against fp64: the sharded call's error at most twice the single call's
            kw64 = dict(kw, **{s: None if kw[s] is None else tuple(to64(x) for x in kw[s])
                               for s in ("ln_local", "ln_global")})
            ref = ls_attention_ref(to64(q), to64(k), to64(v), to64(proj), **common, **kw64)[:, :, rows]
            err, err_single = ((x.double() - ref).abs().max().item() for x in (out, full[:, :, rows]))
            assert err <= 2 * err_single + 1e-6, (case_id(c), err, err_single)


BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" or INTERPRET else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 4])
def test_shards_equal_one_process_fp64(world, backend):
    cases = CASES[world] if backend == "torch" else CASES[world][:3]  # the interpreter: fewer cases
    _spawn(_run_cases, world, cases, backend, torch.float64, "exact")


def test_shards_fp32_two_times_rule():
    _spawn(_run_cases, 2, [CASES[2][0], CASES[2][3]], "torch", torch.float32, "2x")


def _bad_lengths(rank, world):
    from ls_kernels.distributed import ls_attention_cp
    for causal, n, w, l, match in ((False, [12, 16][rank], 8, 4, "multiple of window = 8"),
                                   (True, [10, 16][rank], 4, 4, "multiple of chunk = 4"),
                                   (True, [3, 16][rank], 8, 1, "at least window - 1 = 7")):
        q = torch.randn(1, 2, n, 8)
        with pytest.raises(ValueError, match=rf"shard lengths \[.*\].*{match}"):
            ls_attention_cp(q, q, q, q[..., :2], window=w, causal=causal, chunk=l)


def test_bad_shard_lengths_raise_on_every_rank():
    _spawn(_bad_lengths, 2)


def _layer_cases(rank, world):
    from ls_kernels import LongShortAttention
    lens = [16, 8, 8, 11][:world] if world == 4 else [16, 13]
    for causal, dual_ln in ((False, "model"), (True, "head"), (True, "model"), (False, None)):
        torch.manual_seed(0)
        kw = dict(window=8, rank=2, causal=causal, chunk=4, dual_ln=dual_ln, backend="torch")
        single = LongShortAttention(32, 4, **kw).double()
        with torch.no_grad():
            for p in single.parameters():
                p.add_(0.1 * torch.randn_like(p))
        sharded = LongShortAttention(32, 4, process_group=dist.group.WORLD, **kw).double()
        sharded.load_state_dict(single.state_dict())
        x = torch.randn(2, sum(lens), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        mask = torch.zeros(2, sum(lens), dtype=torch.bool)
        mask[1, -5:] = True
        g = torch.randn(2, sum(lens), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x_full = x.clone().requires_grad_()
        (single(x_full, key_padding_mask=mask) * g).sum().backward()
        s0 = sum(lens[:rank])
        rows = slice(s0, s0 + lens[rank])
        x_shard = x[:, rows].clone().requires_grad_()
        out = sharded(x_shard, key_padding_mask=mask[:, rows])
        (out * g[:, rows]).sum().backward()
        torch.testing.assert_close(out, single(x, key_padding_mask=mask)[:, rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x_shard.grad, x_full.grad[:, rows], rtol=1e-10, atol=1e-10)
        for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # data-parallel style: the shards' parameter gradients summed
            torch.testing.assert_close(grad, q.grad, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_layer_with_a_process_group():
    _spawn(_layer_cases, 2)


def test_cp_bench_counts_equal_the_formula():
    """bench/cp.py --quick: the bytes of the wrapped collectives of 2- and 4-process runs (both presets,
    forward and backward, sent and received) equal its formula, which the README's table uses."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "cp.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, env=env, cwd=root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "16 of 16 rows equal" in run.stdout
