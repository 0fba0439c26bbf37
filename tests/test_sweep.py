"""bench/sweep.py --quick, bench/plot.py and bench/traffic.py run and write what they promise.

Timings are not checked (benchmarks measure speed, tests do not); what is checked: the CSV's
columns and statuses, that the small memory budget stops curves with a real OOM, that the
CPU peak-memory method sees the (N, N) scores full attention materializes, the figures and
tables of plot.py, the traffic counter's table, and clear errors for bad flags.
"""
import os
import subprocess
import sys

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import sweep  # noqa: E402


def run(script, *args, check=True):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # sweep and plot need no interpreter; traffic.py sets it itself
    res = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if check:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep_cpu_quick.csv"
    res = run("sweep.py", "--quick", "--threads", "1", "--out", str(out))
    return pd.read_csv(out), res.stdout + res.stderr, out


def test_quick_csv_columns_and_statuses(quick):
    df, _, _ = quick
    assert list(df.columns) == sweep.COLUMNS
    assert set(df.method) == {"ls", "full_naive", "full_sdpa"} and set(df["mode"]) == {"fwd", "fwd+bwd"}
    assert set(df.metric) == {"time", "peak_memory"} and set(df.unit) == {"s", "MiB"}
    assert set(df.status) <= {"ok", "oom", "timeout"}, df[df.status == "error"].note.tolist()
    assert (df.budget_gib == 0.25).all() and (df.threads == 1).all()
    ok = df[df.status == "ok"]
    assert (ok["median"] > 0).all() and (ok.p20 <= ok["median"]).all() and (ok["median"] <= ok.p80).all()
    assert df[df.status != "ok"][["median", "p20", "p80"]].isna().all().all()


def test_quick_curves_stop_at_the_budget(quick):
    df, log, _ = quick
    t = df[df.metric == "time"]
    for key, g in t.groupby(["method", "mode", "batch"]):
        g = g.sort_values("seqlen")
        assert list(g.seqlen) == [256 * 2 ** i for i in range(len(g))], key  # doubling from 256
        assert (g.status[:-1] == "ok").all(), key  # a curve ends at its first failure
    oom = t[t.status == "oom"]
    assert len(oom) > 0 and "DefaultCPUAllocator" in " ".join(oom.note)  # a real allocation failure
    naive = t[(t.method == "full_naive") & (t.status == "oom")]
    assert set(naive["mode"]) == {"fwd", "fwd+bwd"}  # full attention's (N, N) scores run out first
    assert naive.seqlen.max() <= 2048  # 8 heads x N^2 x 4 B: 128 MiB per score matrix at 2048
    assert "oom at N=" in log


def test_cpu_peak_memory_sees_materialized_scores(quick):
    """full_naive forward at N = 1024 holds the scores and their softmax (8 heads x 1024^2 x 4 B = 32 MiB
    each) and the inputs (6 MiB)."""
    df, _, _ = quick
    mem = df[(df.metric == "peak_memory") & (df.status == "ok")].set_index(["method", "mode", "seqlen"])["median"]
    assert 64 + 6 <= mem["full_naive", "fwd", 1024] < 256
    inputs = 3 * 8 * 64 * 4 / 2 ** 20  # q, k, v in MiB per token
    for (method, mode, n), peak in mem.items():
        assert peak >= inputs * n, (method, mode, n)
        assert peak < 256, (method, mode, n)  # under the budget


def test_plot_writes_figures_and_tables(quick, tmp_path):
    _, _, csv = quick
    res = run("plot.py", str(csv), "--out-dir", str(tmp_path))
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert pngs == ["sweep_cpu_quick_charlm_fwd.png", "sweep_cpu_quick_charlm_fwdbwd.png"]
    assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)
    assert "| full_naive | 1024 (OOM at 2048) |" in res.stdout
    assert "ls / full_sdpa" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "--batches must be >= 1"),
    (["--min-seqlen", "512", "--max-seqlen", "256"], "--max-seqlen must be >= --min-seqlen"),
    (["--memory-budget", "0"], "--memory-budget must be a finite number of GiB > 0, got 0.0"),
    (["--memory-budget", "inf"], "--memory-budget must be a finite number of GiB > 0, got inf"),
    (["--time-limit", "nan"], "--time-limit must be a finite number of seconds > 0, got nan"),
    (["--methods", "nope"], "invalid choice: 'nope'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--window", "0", "--rank", "0"], "nothing to attend to"),
])
def test_bad_flags_give_clear_errors(args, message):
    if "--device" in args and sweep.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = run("sweep.py", *args, "--out", os.devnull, check=False)
    assert res.returncode != 0 and message in res.stderr


def test_out_that_is_a_directory_is_refused(tmp_path):
    res = run("sweep.py", "--out", str(tmp_path), check=False)
    assert res.returncode == 2 and f"--out {tmp_path} is a directory" in res.stderr
    assert "Traceback" not in res.stderr


def test_out_csv_with_other_columns_is_refused(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    res = run("sweep.py", "--out", str(other), check=False)
    assert res.returncode == 2 and "exists with other columns (a, b)" in res.stderr
    assert "Traceback" not in res.stderr and other.read_text() == "a,b\n1,2\n"  # left as it was


def test_plot_rejects_a_csv_that_is_not_a_sweep(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    res = run("plot.py", str(bad), check=False)
    assert res.returncode != 0 and "not a sweep CSV" in res.stderr


def test_traffic_counter_table():
    """Counted bytes are at least the minimum (every input read, every output written once)."""
    res = run("traffic.py", "--preset", "lra", "--seqlen", "64")
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| lra")]
    assert [r[1].strip() for r in rows] == ["forward", "backward"]
    for r in rows:
        total, minimum, ratio = float(r[2]), float(r[3]), float(r[4])
        assert minimum > 0 and total >= minimum and ratio == pytest.approx(total / minimum, abs=0.01)
    assert "ls_fwd_kernel" in rows[0][5] and "ls_bwd_dq_kernel" in rows[1][5]
    # rowsum(dO * O) runs inside the projected vectors' kernel here (bidirectional, one block of r = 32
    # vectors: each query visited by one program), with no pre-pass
    assert "ls_bwd_delta_kernel" not in rows[1][5] and "ls_bwd_dkv_global_kernel" in rows[1][5]
    # the PyTorch glue is counted apart: sums of per-block partials, at most 10% of the minimum
    glue, glue_ratio = float(rows[1][6]), float(rows[1][7])
    assert 0 < glue and glue_ratio <= 0.10 and glue_ratio == pytest.approx(glue / float(rows[1][3]), abs=0.01)


def test_traffic_counter_delta_prepass():
    """Causal (many blocks of projected vectors): delta = rowsum(dO * O) by its pre-pass, which per token reads
    dO, the output and its rounding residual in fp16 for H = 8 heads of D = 64 and writes delta (fp32)."""
    res = run("traffic.py", "--preset", "charlm", "--seqlen", "64")
    backward = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| charlm | backward")]
    assert f"ls_bwd_delta_kernel {8 * (64 * (2 + 2 + 2) + 4)}" in backward[0][5]


def test_vil_preset_sweeps_square_grids(tmp_path):
    """--preset vil: points on the square grids 56^2, 80^2, ... tokens; full attention with a bias over the
    whole grid materializes (H, N, N) scores and bias, and runs out of a small budget before ls does."""
    out = tmp_path / "vil.csv"
    res = run("sweep.py", "--preset", "vil", "--max-seqlen", "12544", "--batches", "1", "--methods", "ls",
              "full_naive", "--modes", "fwd", "--memory-budget", "0.75", "--threads", "1", "--out", str(out))
    df = pd.read_csv(out)
    t = df[df.metric == "time"]
    assert set(t.config) == {"vil 2d H=3 D=32 w=8 r=8 cls bias fp32"}
    assert set(df.status) <= {"ok", "oom", "timeout"}, df[df.status == "error"].note.tolist()
    ls = t[t.method == "ls"].sort_values("seqlen")
    assert list(ls.seqlen) == [56 ** 2, 80 ** 2, 112 ** 2] and (ls.status == "ok").all()
    naive = t[t.method == "full_naive"]
    assert "oom" in set(naive.status)  # 3 heads x 12544^2 x 4 B = 1.8 GiB of scores alone
    assert "skipping" not in res.stdout
