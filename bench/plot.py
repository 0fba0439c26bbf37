"""Figures and README tables from the CSV of bench/sweep.py, so figures can be redrawn without re-running it.

    python bench/plot.py [plots/sweep_cpu.csv] [--out-dir plots]

One PNG per (config, mode): time and peak memory against sequence length, log-log, one color per
batch size; long-short methods solid, full attention dashed, as in the paper's Figure 3; where a
curve ends because the next point ran out of memory (or time), an X marks it at that length.
Prints markdown tables: the longest sequence each method reached per batch size, the ratio of
`ls` to full attention time at the longest length both reached, and `ls` / `flex` forward time.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = {  # method: (line style, marker, label)
    "ls": ("-", "o", "ls (this package)"),
    "ls_torch": ("-", "s", "ls_torch (blocked, unfused)"),
    "flex": ("-", "^", "flex (compiled FlexAttention, LS)"),
    "full_naive": ("--", "x", "full_naive (scores materialized)"),
    "full_sdpa": ("--", "d", "full_sdpa (SDPA)"),
}
STOP = {"oom": "OOM", "timeout": "time", "error": "error"}
METRICS = {"time": ("time (s)", "time"), "peak_memory": ("peak memory (MiB)", "peak memory")}


def curves(df):
    """(config, mode, method, batch) -> (ok rows sorted by seqlen, the row that ended the curve or None)."""
    out = {}
    for key, g in df.groupby(["config", "mode", "method", "batch"], sort=False):
        g = g.sort_values("seqlen")
        bad = g[g.status != "ok"]
        out[key] = (g[g.status == "ok"], bad.iloc[0] if len(bad) else None)
    return out


def plot_config(df, config, mode, path):
    sub = df[(df.config == config) & (df["mode"] == mode)]
    batches = sorted(sub.batch.unique())
    colors = {b: plt.cm.viridis(i / max(len(batches) - 1, 1) * 0.9) for i, b in enumerate(batches)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (metric, (ylabel, title)) in zip(axes, METRICS.items()):
        m = sub[sub.metric == metric]
        for (_, _, method, batch), (ok, stop) in curves(m).items():
            ls, marker, _ = STYLE[method]
            c = colors[batch]
            ax.plot(ok.seqlen, ok["median"], ls=ls, marker=marker, color=c, ms=4, lw=1.3)
            if metric == "time":
                ax.fill_between(ok.seqlen, ok.p20, ok.p80, color=c, alpha=0.15, lw=0)
            if stop is not None and len(ok):
                ax.plot([ok.seqlen.iloc[-1], stop.seqlen], [ok["median"].iloc[-1]] * 2, ls=":", color=c, lw=1)
                ax.plot(stop.seqlen, ok["median"].iloc[-1], marker="X", color=c, ms=8, mec="k", mew=0.5)
                ax.annotate(STOP.get(stop.status, stop.status), (stop.seqlen, ok["median"].iloc[-1]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
        if metric == "peak_memory" and sub.budget_gib.notna().any():
            ax.axhline(sub.budget_gib.iloc[0] * 1024, color="gray", ls=":", lw=1)
            ax.annotate(f"budget {sub.budget_gib.iloc[0]:.3g} GiB", (sub.seqlen.min(), sub.budget_gib.iloc[0] * 1024),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
        xlabel = "tokens N (a square grid of side sqrt(N))" if config.startswith("vil") else "sequence length N"
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=f"{title}, {mode}")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    methods = [m for m in STYLE if m in set(sub.method)]
    axes[0].legend(handles=[plt.Line2D([], [], color="k", ls=STYLE[m][0], marker=STYLE[m][1], label=STYLE[m][2])
                            for m in methods], fontsize=8, loc="upper left")
    axes[1].legend(handles=[plt.Line2D([], [], color=colors[b], lw=3, label=f"batch {b}") for b in batches],
                   fontsize=8, loc="lower right")
    first = sub.iloc[0]
    threads = f", {int(first.threads)} thread{'s' if first.threads > 1 else ''}" if pd.notna(first.threads) else ""
    fig.suptitle(f"{config}\n{first.device}{threads}; torch {first.torch}, triton {first.triton}, {first.date}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reach_table(df, config, mode):
    """Markdown: longest N each method reached per batch size, and what stopped the curve."""
    sub = df[(df.config == config) & (df["mode"] == mode) & (df.metric == "time")]
    batches = sorted(sub.batch.unique())
    lines = [f"| method | {' | '.join(f'B={b}' for b in batches)} |", "|---" * (len(batches) + 1) + "|"]
    cv = curves(sub)
    for method in [m for m in STYLE if m in set(sub.method)]:
        cells = []
        for b in batches:
            ok, stop = cv.get((config, mode, method, b), (pd.DataFrame(), None))
            n = str(int(ok.seqlen.max())) if len(ok) else "-"
            cells.append(n + (f" ({STOP.get(stop.status, stop.status)} at {int(stop.seqlen)})" if stop is not None
                              else ""))
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines)


def ratio_table(df, config, mode, baselines=("full_sdpa", "full_naive")):
    """Markdown: ls time / baseline time at the longest length both reached, per batch size."""
    t = df[(df.config == config) & (df["mode"] == mode) & (df.metric == "time") & (df.status == "ok")]
    lines = ["| batch | " + " | ".join(f"ls / {b}" for b in baselines) + " |", "|---" * (len(baselines) + 1) + "|"]
    for batch in sorted(t.batch.unique()):
        cells = []
        for base in baselines:
            a = t[(t.method == "ls") & (t.batch == batch)].set_index("seqlen")["median"]
            b = t[(t.method == base) & (t.batch == batch)].set_index("seqlen")["median"]
            common = a.index.intersection(b.index)
            cells.append(f"{a[common.max()] / b[common.max()]:.3g} (N={common.max()})" if len(common) else "-")
        lines.append(f"| {batch} | {' | '.join(cells)} |")
    return "\n".join(lines)


def flex_ratio(df, config, seqlen=8192, batch=1):
    t = df[(df.config == config) & (df["mode"] == "fwd") & (df.metric == "time") & (df.status == "ok")
           & (df.batch == batch) & (df.seqlen == seqlen)].set_index("method")["median"]
    if "ls" not in t or "flex" not in t:
        return None
    return t["ls"], t["flex"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "plots", "sweep_cpu.csv"))
    ap.add_argument("--out-dir", help="where the PNGs go (default: next to the CSV)")
    a = ap.parse_args(argv)
    if not os.path.exists(a.csv):
        ap.error(f"{a.csv} does not exist; run bench/sweep.py first")
    df = pd.read_csv(a.csv)
    missing = {"method", "mode", "batch", "seqlen", "config", "metric", "median", "p20", "p80", "status"} - set(df)
    if missing:
        ap.error(f"{a.csv} is not a sweep CSV: no column(s) {sorted(missing)}")
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.csv))
    stem = os.path.splitext(os.path.basename(a.csv))[0]
    os.makedirs(out_dir, exist_ok=True)
    for config in df.config.unique():
        for mode in [m for m in ("fwd", "fwd+bwd") if m in set(df[df.config == config]["mode"])]:
            path = os.path.join(out_dir, f"{stem}_{config.split()[0]}_{mode.replace('+', '')}.png")
            plot_config(df, config, mode, path)
            print(f"wrote {path}")
            print(f"\n**{config}, {mode}: longest N reached** (what ended the curve)\n")
            print(reach_table(df, config, mode))
            print(f"\n**{config}, {mode}: time ratio at the longest N both reached**\n")
            print(ratio_table(df, config, mode) + "\n")
        r = flex_ratio(df, config)
        if r:
            print(f"{config}: ls / flex forward at N=8192, B=1: {r[0]:.4g} s / {r[1]:.4g} s = {r[0] / r[1]:.3g}\n")


if __name__ == "__main__":
    sys.exit(main())
