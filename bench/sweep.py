"""Time and peak memory of long-short attention against full attention, sequence length doubling
until the memory budget runs out: the paper's Figure 3 (Zhu et al. 2021), on your hardware.

    python bench/sweep.py                      # char-LM config, every method, fwd and fwd+bwd
    python bench/sweep.py --preset lra         # LRA config (rows are added to the same CSV)
    python bench/sweep.py --preset vil         # vision: image resolution, 2D windows, CLS token, bias
    python bench/sweep.py --quick              # a small sweep, < 3 minutes on a 2-core CPU
    python bench/plot.py                       # figures and README tables from the CSV

Each point (method, mode, batch, seqlen) runs in its own child process under a hard memory
limit: on CUDA torch.cuda.set_per_process_memory_fraction (so a larger GPU behaves like one
of the budget's size), on CPU RLIMIT_AS set to the child's address space after imports plus
the budget (a failed allocation raises). Running out gives status "oom", running past the
time limit (or being predicted to within the budget, from the curve's last two points:
--no-predict runs it anyway) "timeout"; either ends that curve.

Per point: a first call (compilation, caches); the peak memory of one call, inputs included:
torch.cuda.max_memory_allocated on GPU; on CPU the child's peak resident set during the call
(VmHWM, reset by writing 5 to /proc/self/clear_refs) above its resident set before it, plus the
inputs' bytes, with malloc set from the child's start to unmap every freed block of 64 KiB or
more; then warm-up and the timed repeats: median, p20, p80 (CUDA events on GPU; on CPU malloc
set as glibc's dynamic thresholds settle for large tensors).
"""
import argparse
import ctypes
import datetime
import math
import multiprocessing
import os
import resource
import sys
import time
import warnings

# OpenMP threads that spin while waiting stall every op for a time slice when another process holds a
# core (measured here: 6 ms -> 290 ms per call on a shared 2-core machine); sleep instead. Read when
# libgomp loads, so before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from flex_ls import ls_flex  # noqa: E402
from ls_kernels import ls_attention, ls_attention_2d, torch_backend  # noqa: E402
from ls_kernels.checks import check_attention  # noqa: E402
from ls_kernels.config import rel_pos_rows  # noqa: E402

GiB, MiB = 2 ** 30, 2 ** 20
METHODS = ["ls", "ls_torch", "full_naive", "full_sdpa", "flex"]
MODES = ["fwd", "fwd+bwd"]
PRESETS = {  # the paper's char-level LM (causal), Long Range Arena (bidirectional) and vision (2D) attention
    "charlm": dict(causal=True, heads=8, dim=64, window=512, chunk=16, rank=1, project_after_ln=False, vision=False),
    "lra": dict(causal=False, heads=2, dim=32, window=8, chunk=16, rank=32, project_after_ln=True, vision=False),
    # ViL-LS stage 1 (model dim 96 in 3 heads), w 8 (384 px), r 8, one CLS token, relative-position bias
    "vil": dict(causal=False, heads=3, dim=32, window=8, chunk=16, rank=8, project_after_ln=True, vision=True),
}
# vil: square grids from the stage-1 grid of a 224 px image (56 x 56 tokens), tokens about doubling per step
VIL_SIDES = [56, 80, 112, 160, 224, 320, 448, 640, 896, 1280, 1792, 2560]
COLUMNS = ["method", "mode", "batch", "seqlen", "config", "metric", "unit", "median", "p20", "p80", "status",
           "device", "threads", "budget_gib", "torch", "triton", "date", "note"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- child process: one point

def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _limit_cpu_memory(budget, threads):
    """Threads and malloc settled first, then RLIMIT_AS = address space now + budget."""
    torch.set_num_threads(threads)
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks >= 64 KiB mmapped, unmapped when freed
    torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool and its malloc arenas
    resource.setrlimit(resource.RLIMIT_AS, (_status_kb("VmSize") + budget, resource.RLIM_INFINITY))


def _cpu_peak(step):
    """Peak resident bytes one call adds (VmHWM during it minus VmRSS before it, after clear_refs 5 sets
    VmHWM := VmRSS); with every block >= 64 KiB its own mapping, that is the call's peak allocation.
    Then malloc is set as glibc's dynamic thresholds settle for large tensors, for the timing."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM") - rss0
    libc.mallopt(-3, 32 * MiB)  # M_MMAP_THRESHOLD (its dynamic maximum)
    libc.mallopt(-1, 64 * MiB)  # M_TRIM_THRESHOLD (twice that)
    return peak


def _is_oom(e):
    msg = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(
        s in msg for s in ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory"))


def _naive(q, k, v, causal):
    """softmax(Q K^T / sqrt(D)) V with the (N, N) scores materialized, as Transformer-XL computes it."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        N = q.shape[2]
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _full_2d_bias(table, side):
    """(H, N, N + 1) for an N = side^2 grid and one CLS key first: the relative-position bias of every pair of
    patch tokens from a (2 side - 1)^2-row table, 0 for the CLS key (as full attention with a global bias
    table computes it)."""
    pos = torch.arange(side * side, device=table.device, dtype=torch.int32)
    dr = (pos // side)[:, None] - (pos // side)[None, :] + side - 1
    dc = (pos % side)[:, None] - (pos % side)[None, :] + side - 1
    bias = table[(dr * (2 * side - 1) + dc).long()].permute(2, 0, 1)
    return torch.nn.functional.pad(bias, (1, 0))


def _build_vision(p, q, k, v, rand, leaves):
    """The forward of a vil point: q, k, v (B, H, N, D) on a square grid, one CLS key and value, the bias."""
    B, H, N, D, r, w = p["batch"], p["heads"], p["seqlen"], p["dim"], p["rank"], p["window"]
    side = math.isqrt(N)
    gk, gv = rand(B, H, 1, D), rand(B, H, 1, D)
    leaves += [gk, gv]
    if p["method"] in ("full_naive", "full_sdpa"):
        table = rand((2 * side - 1) ** 2, H, s=0.02)
        leaves.append(table)
        keys = lambda: (torch.cat([gk, k], 2), torch.cat([gv, v], 2))  # noqa: E731
        if p["method"] == "full_naive":
            def fwd():
                kk, vv = keys()
                s = (q @ kk.transpose(-1, -2)) * D ** -0.5 + _full_2d_bias(table, side)
                return torch.softmax(s, -1) @ vv
        else:
            def fwd():
                return torch.nn.functional.scaled_dot_product_attention(q, *keys(),
                                                                        attn_mask=_full_2d_bias(table, side))
        return fwd
    proj, table = rand(B, H, N, r), rand(rel_pos_rows(w), H, s=0.02)
    ln = lambda: (1 + rand(D, s=0.1).float(), rand(D, s=0.1).float())  # noqa: E731  (fp32, as under AMP)
    ln_l, ln_g = ln(), ln()
    leaves += [proj, table, *ln_l, *ln_g]
    kw = dict(grid=(side, side), window=w, global_k=gk, global_v=gv, rel_pos_bias=table, ln_local=ln_l,
              ln_global=ln_g, project_after_ln=p["project_after_ln"],
              backend="auto" if p["method"] == "ls" else "torch")
    return lambda: ls_attention_2d(q, k, v, proj, **kw)


def build(p):
    """The step to time (forward, or forward + backward) and the bytes of its inputs."""
    dev, dt, grad = torch.device(p["device"]), DTYPES[p["dtype"]], p["mode"] == "fwd+bwd"
    B, N, H, D, r = p["batch"], p["seqlen"], p["heads"], p["dim"], p["rank"]
    gen = torch.Generator(device=dev).manual_seed(0)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, device=dev) * s).to(dt)  # noqa: E731
    q, k, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    leaves = [q, k, v]
    if p["vision"]:
        fwd = _build_vision(p, q, k, v, rand, leaves)
    elif p["method"] in ("full_naive", "full_sdpa"):
        if p["method"] == "full_naive":
            fwd = lambda: _naive(q, k, v, p["causal"])  # noqa: E731
        else:
            fwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=p["causal"])  # noqa: E731
    else:
        proj = rand(B, H, N, r) if r else None
        ln = lambda: (1 + rand(D, s=0.1).float(), rand(D, s=0.1).float())  # noqa: E731  (fp32, as under AMP)
        ln_l, ln_g = ln(), ln()
        leaves += [x for x in (proj, *ln_l, *ln_g) if x is not None]
        kw = dict(window=p["window"], causal=p["causal"], chunk=p["chunk"], ln_local=ln_l, ln_global=ln_g,
                  project_after_ln=p["project_after_ln"])
        if p["method"] == "flex":
            fwd = lambda: ls_flex(q, k, v, proj, **kw)  # noqa: E731
        elif p["method"] == "ls":
            fwd = lambda: ls_attention(q, k, v, proj, **kw)  # noqa: E731
        else:  # ls_torch: the unfused blocked path (scores materialized by matmuls) on every device
            cfg, _ = check_attention(q, k, v, proj, key_padding_mask=None, scale=None, eps=1e-5, backend="torch", **kw)
            unfused = torch_backend.Options(fused_cpu=False)
            fwd = lambda: torch_backend.attention(q, k, v, cfg=cfg, proj=proj, ln_local=ln_l, ln_global=ln_g,  # noqa: E731
                                                  opts=unfused)
    if not grad:
        def step():
            with torch.no_grad():
                fwd()
        return step, sum(x.numel() * x.element_size() for x in leaves)
    for x in leaves:
        x.requires_grad_()
    dout = rand(B, H, N, D)

    def step():  # gradients freed at the end, so every call allocates them anew and counts them
        fwd().backward(dout)
        for x in leaves:
            x.grad = None
    return step, sum(x.numel() * x.element_size() for x in leaves + [dout])


def measure(p):
    """Run one point in this (child) process; returns status, times (s), peak memory (bytes), note."""
    start = time.monotonic()
    warnings.filterwarnings("ignore")
    cuda = p["device"] == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, p["budget"] / total))
    else:
        _limit_cpu_memory(p["budget"], p["threads"])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        step, in_bytes = build(p)
        t0 = time.monotonic()
        step()  # compilation, caches
        sync()
        first = time.monotonic() - t0
        if cuda:  # peak memory of one call, inputs included
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _cpu_peak(step) + in_bytes
        for i in range(p["warmup"]):
            step()
            sync()
        times = []
        for i in range(p["repeats"]):  # stop early when the next repeat would pass 90% of the time limit
            if i > 0 and time.monotonic() - start + np.median(times) > 0.9 * p["time_limit"]:
                break
            if cuda:
                ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev[0].record()
                step()
                ev[1].record()
                sync()
                times.append(ev[0].elapsed_time(ev[1]) / 1e3)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        return dict(status="ok", times=times, peak=peak, first=first,
                    note=f"{len(times)} repeats; first call {first:.3g} s")
    except Exception as e:  # noqa: BLE001: every failure is a data point
        return dict(status="oom" if _is_oom(e) else "error", note=f"{type(e).__name__}: {str(e)[:300]}")


def _child(p, conn):
    ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the sweep dies
    conn.send(measure(p))
    conn.close()


def run_point(p):
    """measure(p) in a child process: fork on CPU (torch is already imported), spawn on CUDA."""
    ctx = multiprocessing.get_context("spawn" if p["device"] == "cuda" else "fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(p, send))
    proc.start()
    send.close()
    try:
        result = recv.recv() if recv.poll(p["time_limit"]) else None
        timed_out = result is None
    except EOFError:  # the child died without a result
        result, timed_out = None, False
    if result is None:
        proc.kill()
    proc.join()
    if result is not None:
        return result
    if timed_out:
        return dict(status="timeout", note=f"no result after {p['time_limit']:.0f} s")
    if proc.exitcode == -9:
        return dict(status="oom", note="killed by SIGKILL (the kernel's OOM killer?)")
    return dict(status="error", note=f"child exited with code {proc.exitcode}")


# ----------------------------------------------------------------------------- parent: the sweep

def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model} ({os.cpu_count()} cores)"


def config_name(a, preset):
    if a.vision:
        return f"{preset} 2d H={a.heads} D={a.dim} w={a.window} r={a.rank} cls bias {a.dtype}"
    return (f"{preset} {'causal' if a.causal else 'bidir'} H={a.heads} D={a.dim} w={a.window} l={a.chunk} "
            f"r={a.rank}{' ln-first' if a.project_after_ln else ''} {a.dtype}")


def lengths_for(cfg, args):
    """Token counts of a curve: N doubling from --min-seqlen; vil: the square grids of VIL_SIDES (N = side^2)."""
    if cfg.vision:
        return [s * s for s in VIL_SIDES if s * s <= args.max_seqlen]
    return [n for n in (args.min_seqlen << i for i in range(40)) if n <= args.max_seqlen]


def rows_for(p, res, common):
    base = dict(common, method=p["method"], mode=p["mode"], batch=p["batch"], seqlen=p["seqlen"],
                status=res["status"], note=res.get("note", ""))
    t = np.percentile(res["times"], [50, 20, 80]) if res["status"] == "ok" else [np.nan] * 3
    m = [res["peak"] / MiB] * 3 if res["status"] == "ok" else [np.nan] * 3
    return [dict(base, metric="time", unit="s", median=t[0], p20=t[1], p80=t[2]),
            dict(base, metric="peak_memory", unit="MiB", median=m[0], p20=m[1], p80=m[2])]


def predict(history, p):
    """(seconds, bytes) the next point should take, from the curve's last two points: time per call and
    peak memory times their growth per doubling (time at least x2, linear), the seconds counting the
    first call's excess over a call (compilation), the memory call, the warm-up and one
    repeat. None with < 2 points."""
    if len(history) < 2:
        return None
    (_, t0, _, m0), (_, t1, first, m1) = history[-2:]
    growth = min(max(t1 / t0, 2.0), 8.0)
    return max(first - t1, 0.0) + (p["warmup"] + 3) * t1 * growth, m1 * min(max(m1 / m0, 1.0), 8.0)


def skip_reason(method, mode, device, vision=False):
    if method == "flex" and vision:
        return "the vil preset has no FlexAttention statement (2D windows, CLS token, bias)"
    if method == "flex" and mode == "fwd+bwd" and device == "cpu":
        return "FlexAttention has no backward on CPU (it raises)"
    return None


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog="Defaults in [] depend on the device (and on --quick).")
    p.add_argument("--preset", choices=list(PRESETS), nargs="+", default=["charlm"],
                   help="attention config(s): charlm = causal H=8 D=64 w=512 chunk=16 r=1; "
                        "lra = bidirectional H=2 D=32 w=8 r=32, projection after LN_L; vil = 2D windows on square "
                        "grids of 56^2 .. 2560^2 tokens, H=3 D=32 w=8 r=8, a CLS token and the relative-position "
                        "bias (full attention: with a bias over the whole grid) (default: charlm)")
    for name, kind, what in [("heads", int, "H"), ("dim", int, "head dim D"), ("window", int, "window w"),
                             ("chunk", int, "causal chunk length l"), ("rank", int, "projected length r (0: none)")]:
        p.add_argument(f"--{name}", type=kind, help=f"override the preset's {what}")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, help="override the preset's causality")
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help="[all; --quick: ls full_naive full_sdpa] ls: ls_attention backend='auto' (Triton on CUDA, "
                        "the blocked path with ATen's fused CPU "
                        "kernel on CPU); ls_torch: the blocked path with materialized scores (unfused); full_naive: "
                        "softmax(QK^T)V with the scores materialized; full_sdpa: scaled_dot_product_attention; "
                        "flex: compiled FlexAttention with the same long-short semantics")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                   help="fwd: forward under no_grad; fwd+bwd: forward and backward of every input (default: both)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes, one curve each [CUDA: 1 2 4 8 16; CPU: 1 4]")
    p.add_argument("--min-seqlen", type=int, default=256,
                   help="first sequence length, doubled from there (default: 256)")
    p.add_argument("--max-seqlen", type=int, help="last sequence length (vil: tokens) [CUDA: 2^20; CPU: 65536]")
    p.add_argument("--memory-budget", type=float,
                   help="GiB per point, inputs included [CUDA: 32; CPU: min(32, a quarter of RAM)]")
    p.add_argument("--time-limit", type=float, help="seconds per point, start-up and compilation included "
                                                    "[CUDA: 120; CPU: 20]")
    p.add_argument("--predict", action=argparse.BooleanOptionalAction, default=True,
                   help="end a curve without running its next point when the last two points predict that it "
                        "would pass the time limit within the memory budget (status timeout, note 'not run: "
                        "predicted ...'); a point predicted to pass the budget is run (default: on)")
    p.add_argument("--repeats", type=int, help="timed repeats per point (fewer if the time limit is near) "
                                               "[CUDA: 10; CPU: 3]")
    p.add_argument("--warmup", type=int, help="untimed calls before timing, after the first call and the memory "
                                              "call [CUDA: 3; CPU: 1]")
    p.add_argument("--dtype", choices=list(DTYPES), help="[CUDA: fp16; CPU: fp32]")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu",
                   help="(default: cuda when available)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"CPU threads per point (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--out", help="CSV to write; rows of other configs/curves already in it are kept "
                                 "[plots/sweep_<device>.csv, plots/sweep_<device>_quick.csv with --quick]")
    p.add_argument("--quick", action="store_true",
                   help="small sweep for a smoke test: charlm, batch 1, ls/full_naive/full_sdpa, N 256..8192, "
                        "256 MiB budget, 20 s limit, 2 repeats; flags given explicitly still win")
    a = p.parse_args(argv)
    if a.device == "cuda" and not cuda:
        p.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    gpu = a.device == "cuda"
    quick = dict(batches=[1], max_seqlen=8192, memory_budget=0.25, time_limit=20, repeats=2, warmup=1)
    defaults = dict(batches=[1, 2, 4, 8, 16] if gpu else [1, 4], max_seqlen=2 ** 20 if gpu else 65536,
                    memory_budget=32.0 if gpu else min(32.0, mem_total / GiB / 4), time_limit=120 if gpu else 20,
                    repeats=10 if gpu else 3, warmup=3 if gpu else 1, dtype="fp16" if gpu else "fp32")
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, quick.get(key, value) if a.quick else value)
    if a.methods is None:
        a.methods = ["ls", "full_naive", "full_sdpa"] if a.quick else METHODS
    checks = [(min(a.batches) >= 1, "--batches must be >= 1"), (a.min_seqlen >= 1, "--min-seqlen must be >= 1"),
              (a.max_seqlen >= a.min_seqlen, "--max-seqlen must be >= --min-seqlen"),
              (0 < a.memory_budget < math.inf, f"--memory-budget must be a finite number of GiB > 0, got {a.memory_budget}"),
              (0 < a.time_limit < math.inf, f"--time-limit must be a finite number of seconds > 0, got {a.time_limit}"),
              (a.repeats >= 1, "--repeats must be >= 1"), (a.warmup >= 1, "--warmup must be >= 1"),
              (a.threads >= 1, "--threads must be >= 1"),
              (all(getattr(a, n) is None or getattr(a, n) >= 0 for n in ("window", "rank")), "--window/--rank >= 0"),
              (all(getattr(a, n) is None or getattr(a, n) >= 1 for n in ("heads", "dim", "chunk")),
               "--heads/--dim/--chunk must be >= 1")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    if a.out is None:
        a.out = os.path.join(ROOT, "plots", f"sweep_{a.device}{'_quick' if a.quick else ''}.csv")
    _check_out(p, a.out)
    return a


def _check_out(parser, out):
    """--out must be a file path whose directory can be made, and an existing file a CSV of this sweep."""
    if os.path.isdir(out):
        parser.error(f"--out {out} is a directory; give the path of a CSV file")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        parser.error(f"--out {out}: {parent} is not a directory")
    if not os.path.exists(out) or os.path.getsize(out) == 0:
        return
    try:
        header = list(pd.read_csv(out, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        parser.error(f"--out {out} exists but is not a CSV this sweep can extend ({type(e).__name__}: {e}); "
                     "give another path or remove it")
    if header != COLUMNS:
        parser.error(f"--out {out} exists with other columns ({', '.join(map(str, header)) or 'none'}); this sweep "
                     f"writes {', '.join(COLUMNS)}: give another path or remove it")


def main(argv=None):
    args = parse_args(argv)
    common = dict(device=device_name(args.device), threads=args.threads if args.device == "cpu" else np.nan,
                  budget_gib=args.memory_budget, torch=torch.__version__, triton=triton.__version__,
                  date=datetime.date.today().isoformat())
    curves = []
    for preset in args.preset:
        cfg = argparse.Namespace(**{k: getattr(args, k) if getattr(args, k, None) is not None else v
                                    for k, v in PRESETS[preset].items()}, dtype=args.dtype)
        if cfg.window == 0 and cfg.rank == 0:
            sys.exit("error: --window 0 and --rank 0 leave long-short attention nothing to attend to")
        for mode in args.modes:
            for method in args.methods:
                reason = skip_reason(method, mode, args.device, cfg.vision)
                if reason:
                    print(f"skipping {method} {mode} on {args.device}: {reason}")
                    continue
                curves += [(cfg, config_name(cfg, preset), mode, method, b) for b in args.batches]
    if not curves:
        sys.exit("error: no curve to run (every method skipped)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    old = pd.read_csv(args.out) if os.path.exists(args.out) else pd.DataFrame(columns=COLUMNS)
    redo = {(c[1], c[3], c[2], c[4]) for c in curves}
    keep = [(cf, me, mo, b) not in redo for cf, me, mo, b in zip(old.config, old.method, old["mode"], old.batch)]
    rows = old[keep].to_dict("records")
    print(f"{len(curves)} curves, budget {args.memory_budget:.3g} GiB, time limit {args.time_limit:.0f} s per point, "
          f"{common['device']} -> {args.out}")
    tqdm.monitor_interval = 0  # no monitor thread: children are forked
    with tqdm(total=sum(len(lengths_for(c[0], args)) for c in curves), unit="pt") as bar:
        for cfg, cname, mode, method, batch in curves:
            lengths = lengths_for(cfg, args)
            history = []  # (N, median s per call, first call s, peak bytes) of the curve's points so far
            for i, n in enumerate(lengths):
                bar.set_description(f"{cname.split()[0]} {method} {mode} B={batch} N={n}")
                p = dict(vars(cfg), config=cname, method=method, mode=mode, batch=batch, seqlen=n,
                         device=args.device, budget=int(args.memory_budget * GiB), time_limit=args.time_limit,
                         repeats=args.repeats, warmup=args.warmup, threads=args.threads)
                guess = predict(history, p) if args.predict else None
                # too slow but within the budget: not run (one that should run out of memory is run, to fail fast)
                if guess and guess[0] > args.time_limit and guess[1] <= p["budget"]:
                    res = dict(status="timeout", note=f"not run: predicted {guess[0]:.0f} s > {args.time_limit:.0f} s "
                                                      f"from {history[-1][1]:.3g} s per call at N={history[-1][0]}")
                else:
                    res = run_point(p)
                if res["status"] == "ok":
                    history.append((n, float(np.median(res["times"])), res["first"], res["peak"]))
                rows += rows_for(p, res, dict(common, config=cname))
                pd.DataFrame(rows, columns=COLUMNS).to_csv(args.out, index=False)
                bar.update(1)
                if res["status"] != "ok":
                    bar.write(f"{cname.split()[0]} {method} {mode} B={batch}: {res['status']} at N={n} "
                              f"({res.get('note', '')[:120]})")
                    bar.update(len(lengths) - i - 1)
                    break
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
