"""Context parallelism: the bytes each rank sends and receives per layer, and a long run over gloo processes.

    python bench/cp.py                 # bytes counted over P = 2, 4, 8 gloo processes (N = 16k .. 64k), the
                                       # byte formula checked against the counts, then the table for
                                       # N = 64k .. 1M beside ring attention and Ulysses; plots/cp_bytes.csv
    python bench/cp.py --run           # N = 1,048,576 tokens over 4 processes, LRA preset, forward and
                                       # backward: each rank's time and peak memory; plots/cp_run.csv
    python bench/cp.py --quick         # small counts only (tests use this)

Bytes are counted by wrapping the torch.distributed calls the layer makes (all_reduce, all_gather, isend,
irecv) with the volume each moves per rank, as its usual algorithm does: point-to-point messages as sent; an
all-reduce of S bytes 2 S (P - 1) / P sent and as many received (ring); an all-gather of S bytes per rank
S (P - 1) sent and received. Bytes are exact, so P may exceed the cores.

The formula (per rank, per layer, forward; B sequences, H heads, D head dim, s bytes per element, r rank):
bidirectional: halo 2 e (2 D + 1) B H s each way (one neighbour's share when P = 2; e = max(w // 2, 1)),
projection all-reduces of the maxima
B H r 4 and of the sums B H r (2 D + 1) 4 bytes; causal: halo (w - 1)(2 D + 1) B H s, the all-gather of
the finished chunks' vectors 2 B H G_max D s + B G_max per rank (G_max: the most any shard holds). The
backward moves the halo back, the sums' all-reduce again and, causal, an all-reduce of the gathered vectors'
gradients. Ring attention moves every other shard's K and V through each rank (forward 2 N (P - 1) / P H D s,
backward twice that plus dK, dV); Ulysses all-to-alls q, k, v and the output (4 N / P (P - 1) / P H D s
forward, as much backward).
"""
import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import time

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {  # the paper's char-level LM (causal) and Long Range Arena (bidirectional) attention
    "charlm": dict(causal=True, heads=8, dim=64, window=512, chunk=16, rank=1),
    "lra": dict(causal=False, heads=2, dim=32, window=8, chunk=16, rank=32),
}
ELEMENT = 4  # fp32 on the CPU processes; every formula takes s


# ----------------------------------------------------------------------------- counting the collectives

class Counter:
    """Bytes sent and received by this rank through the wrapped torch.distributed calls."""

    def __init__(self):
        self.sent = self.received = 0

    def add(self, sent, received):
        self.sent += sent
        self.received += received


@contextlib.contextmanager
def counting(counter):
    """torch.distributed's all_reduce, all_gather, isend and irecv wrapped to add their volume to counter."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "isend", "irecv")}
    size = lambda t: t.numel() * t.element_size()  # noqa: E731

    def all_reduce(t, *a, **k):
        P = dist.get_world_size(k.get("group"))
        counter.add(2 * size(t) * (P - 1) // P, 2 * size(t) * (P - 1) // P)
        return originals["all_reduce"](t, *a, **k)

    def all_gather(out, t, *a, **k):
        counter.add(size(t) * (len(out) - 1), size(t) * (len(out) - 1))
        return originals["all_gather"](out, t, *a, **k)

    def isend(t, *a, **k):
        counter.add(size(t), 0)
        return originals["isend"](t, *a, **k)

    def irecv(t, *a, **k):
        counter.add(0, size(t))
        return originals["irecv"](t, *a, **k)

    for name, fn in (("all_reduce", all_reduce), ("all_gather", all_gather), ("isend", isend), ("irecv", irecv)):
        setattr(dist, name, fn)
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ----------------------------------------------------------------------------- the formulas

def cp_bytes(preset, N, P, s=ELEMENT, B=1):
    """{(pass, "sent"/"received"): bytes} of the most loaded rank per layer, from the formula above (the shard
    length message, 8 bytes per rank, included)."""
    c = PRESETS[preset]
    H, D, w, l, r = c["heads"], c["dim"], c["window"], c["chunk"], c["rank"]
    ring = lambda S: 2 * S * (P - 1) // P  # noqa: E731
    lengths = 8 * (P - 1)
    if not c["causal"]:
        e = max(w // 2, 1)
        halo = min(2, P - 1) * e * (2 * D + 1) * B * H * s  # a middle rank has two neighbours
        sums = ring(B * H * r * 4) + ring(B * H * r * (2 * D + 1) * 4)
        fwd = lengths + halo + sums
        return {("forward", "sent"): fwd, ("forward", "received"): fwd,
                ("backward", "sent"): halo + ring(B * H * r * (2 * D + 1) * 4),
                ("backward", "received"): halo + ring(B * H * r * (2 * D + 1) * 4)}
    n = N // P
    halo = (w - 1) * (2 * D + 1) * B * H * s
    g_max = (n // l) * r
    gathered = (2 * B * H * g_max * D * s + B * g_max) * (P - 1)
    grads = 2 * ring(B * H * (N // l) * r * D * s)
    return {("forward", "sent"): lengths + halo + gathered, ("forward", "received"): lengths + halo + gathered,
            ("backward", "sent"): halo + grads, ("backward", "received"): halo + grads}


def ring_attention_bytes(preset, N, P, s=ELEMENT, B=1):
    c = PRESETS[preset]
    kv = 2 * N * (P - 1) // P * c["heads"] * c["dim"] * s * B
    return {"forward": kv, "backward": 2 * kv + kv}


def ulysses_bytes(preset, N, P, s=ELEMENT, B=1):
    c = PRESETS[preset]
    a2a = 4 * (N // P) * (P - 1) // P * c["heads"] * c["dim"] * s * B
    return {"forward": a2a, "backward": a2a}


# ----------------------------------------------------------------------------- spawned ranks

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, P, port, preset, N, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=P, timeout=datetime.timedelta(seconds=1800))
    torch.set_num_threads(1)
    from ls_kernels.distributed import ls_attention_cp
    c = PRESETS[preset]
    H, D, r = c["heads"], c["dim"], c["rank"]
    n = N // P
    g = torch.Generator().manual_seed(rank)
    x = [torch.randn(1, H, n, D, generator=g).requires_grad_() for _ in range(3)]
    proj = torch.randn(1, H, n, r, generator=g).requires_grad_()
    ln = tuple((torch.ones(H, D, requires_grad=True), torch.zeros(H, D, requires_grad=True)) for _ in range(2))
    kw = dict(window=c["window"], causal=c["causal"], chunk=c["chunk"], ln_local=ln[0], ln_global=ln[1],
              project_after_ln=not c["causal"], backend="torch")
    result = dict(rank=rank)
    if mode == "count":
        fwd, bwd = Counter(), Counter()
        with counting(fwd):
            out = ls_attention_cp(*x, proj, **kw)
        with counting(bwd):
            out.sum().backward()
        result.update(fwd_sent=fwd.sent, fwd_received=fwd.received, bwd_sent=bwd.sent, bwd_received=bwd.received)
    else:
        rss0 = _vm_hwm_reset()
        dist.barrier()
        t0 = time.perf_counter()
        out = ls_attention_cp(*x, proj, **kw)
        t1 = time.perf_counter()
        out.sum().backward()
        t2 = time.perf_counter()
        result.update(fwd_s=t1 - t0, bwd_s=t2 - t1, peak_mib=(_vm_hwm() - rss0) / 2 ** 20,
                      inputs_mib=sum(t.numel() * 4 for t in (*x, proj)) / 2 ** 20)
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _vm_hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _vm_hwm_reset():
    """Reset the peak resident set to the current one (Linux: writing 5 to clear_refs); returns it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _vm_hwm()


def run_ranks(preset, N, P, mode):
    """Every rank's result dict, from P spawned gloo processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(P, _free_port(), preset, N, mode, out_dir), nprocs=P)
        return [json.load(open(os.path.join(out_dir, f"{i}.json"))) for i in range(P)]


# ----------------------------------------------------------------------------- main

def count_table(Ns, Ps, presets):
    """Counted bytes of the most loaded rank against the formula, per preset, N and P."""
    rows = []
    for preset, N, P in tqdm([(p, n, k) for p in presets for n in Ns for k in Ps], desc="counting", unit="run"):
        ranks = run_ranks(preset, N, P, "count")
        want = cp_bytes(preset, N, P)
        for pass_, key in (("forward", "fwd"), ("backward", "bwd")):
            for way in ("sent", "received"):
                got = max(r[f"{key}_{way}"] for r in ranks)
                rows.append(dict(preset=preset, N=N, P=P, pass_=pass_, way=way, counted=got,
                                 formula=want[(pass_, way)]))
    return pd.DataFrame(rows)


def volume_table(Ns, Ps, presets):
    rows = []
    for preset in presets:
        for N in Ns:
            for P in Ps:
                cp = cp_bytes(preset, N, P)
                ring, uly = ring_attention_bytes(preset, N, P), ulysses_bytes(preset, N, P)
                for pass_ in ("forward", "backward"):
                    rows.append(dict(preset=preset, N=N, P=P, pass_=pass_, long_short=cp[(pass_, "sent")],
                                     ring_attention=ring[pass_], ulysses=uly[pass_]))
    return pd.DataFrame(rows)


def _fmt(b):
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="the N = 1,048,576 run over 4 processes (LRA preset)")
    p.add_argument("--quick", action="store_true", help="count at N = 4096 over P = 2, 4 only")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "plots"))
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.run:
        rows = []
        for preset, N, P in (("lra", 1 << 20, 4), ("charlm", 1 << 16, 4)):
            for r in run_ranks(preset, N, P, "time"):
                rows.append(dict(preset=preset, N=N, P=P, **r))
                print(f"{preset} N={N} P={P} rank {r['rank']}: forward {r['fwd_s']:.2f} s, backward "
                      f"{r['bwd_s']:.2f} s, peak {r['peak_mib']:.0f} MiB above the start (inputs "
                      f"{r['inputs_mib']:.0f} MiB)")
        pd.DataFrame(rows).to_csv(os.path.join(args.out_dir, "cp_run.csv"), index=False)
        return
    Ns, Ps = ([4096], [2, 4]) if args.quick else ([1 << 14, 1 << 15, 1 << 16], [2, 4, 8])
    counted = count_table(Ns, Ps, list(PRESETS))
    bad = counted[counted.counted != counted.formula]
    print(f"counted against the formula: {len(counted) - len(bad)} of {len(counted)} rows equal")
    if len(bad):
        print(bad.to_string())
        sys.exit(1)
    if args.quick:
        return
    counted.to_csv(os.path.join(args.out_dir, "cp_counted.csv"), index=False)
    table = volume_table([1 << k for k in range(16, 21)], [2, 4, 8], list(PRESETS))
    table.to_csv(os.path.join(args.out_dir, "cp_bytes.csv"), index=False)
    print("| preset | N | P | pass | long-short | ring attention | Ulysses |\n|---|---|---|---|---|---|---|")
    for row in table.itertuples():
        print(f"| {row.preset} | {row.N} | {row.P} | {row.pass_} | {_fmt(row.long_short)} | "
              f"{_fmt(row.ring_attention)} | {_fmt(row.ulysses)} |")


if __name__ == "__main__":
    main()
