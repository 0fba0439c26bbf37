"""Per-token decoding latency and cache bytes against the context length t: ``ls_decode`` with its cache,
full attention with a KV cache (SDPA of one query over the t cached keys), and recomputing causal
``ls_attention`` over the whole prefix for each new token.

    python bench/decode.py                 # char-LM attention (H 8, D 64, w 512, l 16, r 1), t = 1k .. 64k,
                                           # batch 1 and 8; CSV plots/decode_<device>.csv, figure beside it
    python bench/decode.py --quick         # t = 1k .. 4k, batch 1, a few seconds
    python bench/decode.py --plot-only     # the figure and README table from the CSV

A cache of t tokens is filled with random contents of the right shapes (the latency of a step does not depend
on the values), then single-token steps are timed (median, p20, p80). Cache bytes: the long-short cache's
contents (``LSCache.nbytes``: w - 1 window keys, t r / l projected vectors, the unfinished chunk) against
2 t H D values of a full KV cache. A method whose step is predicted past --time-limit is skipped.
"""
import argparse
import datetime
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ls_kernels import LSCache, ls_attention, ls_decode
from ls_kernels.cache import full_kv_cache_nbytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARLM = dict(heads=8, dim=64, window=512, chunk=16, rank=1)
METHODS = ["ls_decode", "full_kv_sdpa", "ls_recompute"]
COLUMNS = ["method", "batch", "context", "metric", "unit", "median", "p20", "p80", "status", "device", "threads",
           "dtype", "config", "torch", "date"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def filled_cache(batch, t, *, heads, dim, window, chunk, rank, device, dtype, generator):
    """An LSCache of `batch` sequences of t tokens each, with random contents."""
    cache = LSCache.empty(batch, heads, dim, window=window, chunk=chunk, rank=rank, device=device, dtype=dtype)
    cache.reserve(t // chunk)
    for x in (cache.win_k, cache.win_v, cache.kg, cache.vg, cache.part_k, cache.part_v, cache.part_logits):
        x.copy_(torch.randn(x.shape, generator=generator).to(device, x.dtype))
    cache.lengths.fill_(t)
    return cache


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=2):
    """Seconds per call: (median, p20, p80) over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    s = pd.Series(times)
    return s.median(), s.quantile(0.2), s.quantile(0.8)


def step_fn(method, batch, t, cfg, device, dtype, generator):
    """A function running one decoding step of `method` at context t, and its cache bytes."""
    H, D, w, l, r = cfg["heads"], cfg["dim"], cfg["window"], cfg["chunk"], cfg["rank"]
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    q, k, v, proj = rand(batch, H, 1, D), rand(batch, H, 1, D), rand(batch, H, 1, D), rand(batch, H, 1, r)
    ln = (torch.ones(H, D, device=device, dtype=dtype), torch.zeros(H, D, device=device, dtype=dtype))
    if method == "ls_decode":
        cache = filled_cache(batch, t, device=device, dtype=dtype, generator=generator, **cfg)

        def run():
            ls_decode(q, k, v, proj, cache, window=w, chunk=l, ln_local=ln, ln_global=ln)
            cache.lengths -= 1  # every step at context t
        return run, cache.nbytes()
    if method == "full_kv_sdpa":
        K, V = rand(batch, H, t + 1, D), rand(batch, H, t + 1, D)
        return (lambda: F.scaled_dot_product_attention(q, K, V)), full_kv_cache_nbytes([t] * batch, H, D, dtype)
    if method == "ls_recompute":
        Q, K, V, P = rand(batch, H, t + 1, D), rand(batch, H, t + 1, D), rand(batch, H, t + 1, D), \
            rand(batch, H, t + 1, r)

        def run():
            with torch.no_grad():
                ls_attention(Q, K, V, P, window=w, causal=True, chunk=l, ln_local=ln, ln_global=ln)
        return run, full_kv_cache_nbytes([t] * batch, H, D, dtype)  # the prefix is kept whole
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def sweep(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = dict(CHARLM)
    config = " ".join(f"{k}={v}" for k, v in cfg.items()) + f" {args.dtype}"
    contexts = [2 ** i for i in range(10, 13 if args.quick else 17)]
    batches = [1] if args.quick else [1, 8]
    g = torch.Generator().manual_seed(0)
    rows, last = [], {}
    points = [(m, b, t) for m in METHODS for b in batches for t in contexts]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    for method, batch, t in tqdm(points, desc="decode sweep", unit="point"):
        base = dict(method=method, batch=batch, context=t, device=name, threads=torch.get_num_threads(),
                    dtype=args.dtype, config=config, torch=torch.__version__, date=str(datetime.date.today()))
        prev = last.get((method, batch))
        if prev is not None and prev[1] * t / prev[0] > args.time_limit:  # linear in t at least
            rows.append(dict(base, metric="latency", unit="ms", status="skipped"))
            continue
        run, nbytes = step_fn(method, batch, t, cfg, device, dtype, g)
        med, p20, p80 = timed(run, device, args.repeats)
        last[(method, batch)] = (t, med)
        rows.append(dict(base, metric="latency", unit="ms", median=1e3 * med, p20=1e3 * p20, p80=1e3 * p80,
                         status="ok"))
        rows.append(dict(base, metric="cache", unit="MiB", median=nbytes / 2 ** 20, p20=nbytes / 2 ** 20,
                         p80=nbytes / 2 ** 20, status="ok"))
        del run
    return pd.DataFrame(rows, columns=COLUMNS)


def plot(df, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "latency", "ms per token"), (axes[1], "cache", "cache MiB")):
        for (method, batch), part in df[(df.metric == metric) & (df.status == "ok")].groupby(["method", "batch"]):
            part = part.sort_values("context")
            ax.plot(part.context, part["median"], marker="o", linestyle="-" if method == "ls_decode" else "--",
                    label=f"{method} B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context t (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Decoding, {df.config.iloc[0]} on {df.device.iloc[0]}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(df):
    """README table: ms per token of each method, and the cache MiB of ls_decode against a full KV cache."""
    ok = df[df.status == "ok"]
    get = lambda m, metric: ok[(ok.method == m) & (ok.metric == metric)].set_index(["batch", "context"])["median"]  # noqa
    cols = [(f"{m} ms/token", get(m, "latency")) for m in METHODS]
    cols += [("ls cache MiB", get("ls_decode", "cache")), ("full KV cache MiB", get("full_kv_sdpa", "cache"))]
    keys = sorted(set().union(*(c.index for _, c in cols)))
    lines = ["| batch | context | " + " | ".join(name for name, _ in cols) + " |", "|---" * (2 + len(cols)) + "|"]
    for b, t in keys:
        cells = [f"{c[(b, t)]:.3g}" if (b, t) in c.index else "" for _, c in cols]
        lines.append(f"| {b} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per step beyond which a method stops")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's)")
    p.add_argument("--out", default=None, help="CSV path (default plots/decode_<device type>.csv)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(ROOT, "plots", f"decode_{torch.device(args.device).type}.csv")
    if args.plot_only:
        df = pd.read_csv(out)
    else:
        df = sweep(args)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        df.to_csv(out, index=False)
        print(f"wrote {out}")
    plot(df, out[:-len(".csv")] + ".png")
    print(table(df))


if __name__ == "__main__":
    main()
