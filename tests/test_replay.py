"""bench/replay.py, the launch replay behind the time model: its mirrors of the kernels' loop bounds visit every
visible (query, key) pair, interior tiles hold only visible pairs, and no visited tile is invisible to the whole
block; every configuration's replay is well formed."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import perf_model  # noqa: E402
import replay  # noqa: E402

from ls_kernels.config import half_width  # noqa: E402

GRID = [(causal, N, w, block) for causal in (False, True) for N in (1, 63, 111, 200) for w in (1, 8, 16, 40)
        for block in (16, 32)]


def _id(c):
    return f"{'causal' if c[0] else 'bidir'}-N{c[1]}-w{c[2]}-b{c[3]}"


def _visible(t, key, N, w, causal):
    if causal:
        return t - w < key <= t
    s = (t // w) * w
    return 0 <= key < N and s - half_width(w) <= key < s + w + half_width(w)


def _tiles(lo, hi, inner_lo, inner_hi, block):
    """(start, interior) of each tile the kernels visit, from replay.tile_split's counts."""
    e0, mid, e1 = replay.tile_split(lo, hi, inner_lo, inner_hi, block)
    return [(lo + j * block, e0 <= j < e0 + mid) for j in range(e0 + mid + e1)]


def _check(rows, cols, tiles, block, visible):
    """Every visible (row, col) pair lies in a visited tile; interior tiles hold only visible pairs (cols
    inside the sequence); every visited tile holds at least one visible pair."""
    covered = set()
    for start, interior in tiles:
        cols_in = range(start, start + block)
        pairs = [(r, c) for r in rows for c in cols_in if visible(r, c)]
        assert pairs, (start, interior)
        covered.update(pairs)
        if interior:
            assert len(pairs) == len(rows) * block, (start, "interior tile with invisible pairs")
    want = {(r, c) for r in rows for c in range(-64, 300) if visible(r, c)}
    assert want <= covered


@pytest.mark.parametrize("c", GRID, ids=_id)
def test_window_tiles_of_each_query_block(c):
    causal, N, w, block = c
    half = half_width(w)
    for start in range(0, N, block):
        last = min(start + block, N) - 1
        fl, fh = replay.window_bounds(start, N, w, half, causal)
        ll, lh = replay.window_bounds(last, N, w, half, causal)
        _check(range(start, last + 1), None, _tiles(fl, lh, ll, fh, block), block,
               lambda t, key: 0 <= key < N and _visible(t, key, N, w, causal))


@pytest.mark.parametrize("c", GRID, ids=_id)
def test_query_tiles_of_each_key_block(c):
    causal, N, w, block = c
    half = half_width(w)
    for start in range(0, N, block):
        last = min(start + block, N) - 1
        fl, fh = replay.query_bounds(start, N, w, half, causal)
        ll, lh = replay.query_bounds(last, N, w, half, causal)
        _check(range(start, last + 1), None, _tiles(fl, lh, ll, fh, block), block,
               lambda key, t: 0 <= t < N and _visible(t, key, N, w, causal))


@pytest.mark.parametrize("name", list(perf_model.CONFIGS))
def test_every_configuration_replays(name):
    runs = replay.runs(perf_model.CONFIGS[name])
    assert {r.pass_name for r in runs} == {"forward", "backward"}
    for r in runs:
        assert r.iters.ndim == 2 and r.iters.shape[1] == len(r.loops) == len(r.loop_bytes) == len(r.loop_flops)
        assert (r.iters >= 0).all() and r.dram_bytes > 0 and len(r.iters) > 0, r.label
    fwd = next(r for r in runs if r.label.startswith("_ls_fwd_kernel"))
    assert 0 < sum(perf_model.useful_pairs(perf_model.CONFIGS[name])) <= fwd.extra["issued_scores"]
    assert np.all(fwd.iters[:, 3] >= 0)
