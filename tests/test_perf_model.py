"""bench/perf_model.py: useful work against brute-force enumeration, the launch estimate's terms, the
per-configuration summary's comparisons, and the glue counter (kernels stubbed, bytes of aten ops)."""
import dataclasses
import os
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import perf_model as pm  # noqa: E402

SMALL = pm.Config("small", causal=False, batch=2, heads=3, dim=64, window=8, chunk=4, rank=3, seqlen=111,
                  project_after_ln=False)


def brute_force_pairs(cfg):
    """(window_pairs, projected_pairs) by testing the visibility rule on every (query, key) pair."""
    N, w, l, r = cfg.seqlen, cfg.window, cfg.chunk, cfg.rank
    window = projected = 0
    for t in range(N):
        for key in range(N):
            if cfg.causal:
                window += t - w + 1 <= key <= t
            else:
                s = t // w
                window += s * w - w // 2 <= key <= s * w + w + w // 2 - 1
        if cfg.causal:  # chunk c's projected keys exist when the chunk is full; t sees those of c < t // l
            projected += r * sum(1 for c in range(N // l) if c < t // l)
        else:
            projected += r
    sequences = cfg.batch * cfg.heads
    return window * sequences, projected * sequences


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window", [3, 8, 16, 128], ids=lambda w: f"w{w}")
def test_useful_pairs_match_brute_force(causal, window):
    cfg = dataclasses.replace(SMALL, causal=causal, window=window)
    assert pm.useful_pairs(cfg) == brute_force_pairs(cfg)


def test_useful_pairs_of_the_charlm_config_by_hand():
    # per sequence: window sum(min(t + 1, 512)); projected sum((t // 16) * 1) over 1024 full chunks of 16
    window = 512 * 513 // 2 + (16384 - 512) * 512
    projected = 16 * 1024 * 1023 // 2
    assert pm.useful_pairs(pm.CONFIGS["charlm_b1"]) == (8 * window, 8 * projected)
    assert pm.useful_pairs(pm.CONFIGS["charlm_b4"]) == (32 * window, 32 * projected)


def test_useful_flops_and_min_bytes_of_a_tiny_config():
    # one segment of 8 sees all 8 keys: 64 window pairs, 8 * 2 projected pairs
    cfg = pm.Config("tiny", causal=False, batch=1, heads=1, dim=4, window=8, chunk=4, rank=2, seqlen=8,
                    project_after_ln=False)
    attention, projection = 4 * 4 * (64 + 16), 4 * 8 * 2 * 4
    assert pm.useful_flops(cfg) == {"forward": attention + projection,
                                    "backward": 2.5 * attention + 2 * projection}
    qkv, proj = 8 * 4, 8 * 2  # elements
    assert pm.min_bytes(cfg) == {"forward": 2 * (4 * qkv + proj), "backward": 2 * (7 * qkv + 2 * proj)}


def test_causal_projection_flops_count_full_chunks_only():
    cfg = pm.Config("tiny", causal=True, batch=1, heads=1, dim=4, window=2, chunk=4, rank=1, seqlen=10,
                    project_after_ln=False)
    assert pm.projection_flops(cfg) == 4 * 8 * 1 * 4  # chunks 0 and 1; positions 8, 9 are never projected


def test_full_attention_flops_halve_when_causal():
    bidirectional = pm.full_attention_flops(SMALL)
    causal = pm.full_attention_flops(dataclasses.replace(SMALL, causal=True))
    assert bidirectional["forward"] == 4 * 111 ** 2 * 64 * 6
    assert causal["forward"] == bidirectional["forward"] // 2
    assert causal["backward"] == 2.5 * causal["forward"]


def launch_taking(**seconds):
    """A Launch whose terms take the given seconds (keys of pm.TERMS; the rest 0)."""
    rates = dict(issue=pm.ISSUE_RATE, critical=pm.LONE_WARP_RATE, tensor=pm.TENSOR_RATE, dram=pm.DRAM_RATE,
                 l2=pm.L2_BYTES)
    x = {t: seconds.get(t, 0.0) * rates[t] for t in pm.TERMS}
    return pm.Launch("k", warps=4, ctas=100, warp_instructions=x["issue"],
                     longest_cta_warp_instructions=x["critical"], tensor_flops=x["tensor"], dram_bytes=x["dram"],
                     l2_bytes=x["l2"])


@pytest.mark.parametrize("term", pm.TERMS)
def test_estimate_picks_the_largest_term_and_adds_the_launch_overhead(term):
    seconds = {t: 0.5e-3 for t in pm.TERMS}
    seconds[term] = 1e-3
    est = pm.estimate(launch_taking(**seconds))
    assert est["bound"] == term
    assert est["time_s"] == pytest.approx(1e-3 + 2e-6)
    for t in pm.TERMS:
        assert est[f"{t}_s"] == pytest.approx(seconds[t])


def test_estimate_terms_use_the_stated_rates():
    est = pm.estimate(pm.Launch("k", warps=4, ctas=1, warp_instructions=132 * 4 * 1.83e9 * 0.6,
                                longest_cta_warp_instructions=1.83e9 * 0.35, tensor_flops=0.6 * 989e12,
                                dram_bytes=0.8 * 3.35e12, l2_bytes=5.5e12))
    for t in pm.TERMS:
        assert est[f"{t}_s"] == pytest.approx(1.0)


def test_load_balance_is_longest_over_mean():
    assert pm.load_balance([1, 2, 3]) == pytest.approx(1.5)
    assert pm.load_balance([7, 7]) == 1.0


def at_limit(cfg):
    """One launch per pass, DRAM-bound, taking exactly the pass's limit time, launch overhead included."""
    limit = pm.limit_times(cfg)
    return [launch_taking(dram=limit[p] - pm.LAUNCH_OVERHEAD_S) for p in pm.PASSES]


def test_launches_at_the_physical_limit_reach_100_percent():
    cfg = pm.CONFIGS["lra_n64k"]
    flops, nbytes = pm.useful_flops(cfg), pm.min_bytes(cfg)
    for p in pm.PASSES:  # the limit is the minimum bytes: the launches move exactly those, less the overhead
        assert nbytes[p] / pm.DRAM_RATE > flops[p] / pm.FA_RATES["fa3"][p]
        assert pm.limit_times(cfg)[p] == nbytes[p] / pm.DRAM_RATE
    fwd, bwd = at_limit(cfg)
    s = pm.summarize(cfg, [fwd], [bwd], glue={"forward": 0, "backward": 0})
    assert s["pct_physical_limit"] == pytest.approx(100.0)
    assert s["speedup_fa3"] == pytest.approx(s["limit_speedup"])
    fa3 = sum(pm.fa_times(cfg, "fa3").values())
    assert s["limit_speedup"] == pytest.approx(fa3 / sum(pm.limit_times(cfg).values()))


def test_glue_bytes_are_timed_at_the_dram_rate_and_compared_with_the_minimum():
    cfg = pm.CONFIGS["mid_n32k"]
    fwd, bwd = at_limit(cfg)
    nbytes = pm.min_bytes(cfg)
    bare = pm.summarize(cfg, [fwd], [bwd], glue={"forward": 0, "backward": 0})
    glued = pm.summarize(cfg, [fwd], [bwd], glue=nbytes)
    for p, key in (("forward", "time_fwd_s"), ("backward", "time_bwd_s")):
        assert glued[key] - bare[key] == pytest.approx(nbytes[p] / pm.DRAM_RATE)
    assert glued["glue_bytes_ratio"] == {"forward": 1.0, "backward": 1.0}
    assert glued["pct_physical_limit"] < bare["pct_physical_limit"]


def test_speedups_against_flashattention_at_its_published_rates():
    cfg = pm.CONFIGS["charlm_b1"]
    fa2, fa3 = sum(pm.fa_times(cfg, "fa2").values()), sum(pm.fa_times(cfg, "fa3").values())
    # causal: half of 4 N^2 D B H FLOPs forward at 497 TFLOP/s, 2.5x that backward at 474 TFLOP/s
    half = 2 * 16384 ** 2 * 64 * 8
    assert fa3 == pytest.approx(half / 497e12 + 2.5 * half / 474e12)
    ours = fa3 / 4
    fwd, bwd = launch_taking(tensor=ours / 2 - 2e-6), launch_taking(issue=ours / 2 - 2e-6)
    s = pm.summarize(cfg, [fwd], [bwd], glue={"forward": 0, "backward": 0})
    assert s["speedup_fa3"] == pytest.approx(4.0)
    assert s["speedup_fa2"] == pytest.approx(4.0 * fa2 / fa3)
    assert [(k["name"], k["pass"], k["bound"]) for k in s["kernels"]] == [("k", "forward", "tensor"),
                                                                          ("k", "backward", "issue")]


def test_summary_passes_extras_through():
    cfg = pm.CONFIGS["charlm_b1"]
    fwd = dataclasses.replace(launch_taking(dram=1e-4), name="fwd", extra={"tile_efficiency": 0.75})
    s = pm.summarize(cfg, [fwd], [], glue={"forward": 0, "backward": 0}, extra={"note": "x"})
    assert s["kernels"][0]["tile_efficiency"] == 0.75
    assert s["note"] == "x"
    assert s["time_bwd_s"] == 0
    assert s["config"] == "charlm_b1"


def test_plain_calibration_reports_the_models_rate_beside_the_papers_triton_rate():
    flops = 4 * 16384 ** 2 * 64 * 32
    cal = pm.plain_calibration(launch_taking(tensor=flops / pm.TENSOR_RATE), flops)
    model = flops / (flops / pm.TENSOR_RATE + 2e-6) / 1e12
    assert cal["model_tflops"] == pytest.approx(model)
    assert cal["paper_triton_tflops"] == 403
    assert cal["ratio"] == pytest.approx(model / 403)
    assert cal["bound"] == "tensor"


def test_constants_table_lists_every_rate():
    table = pm.constants_table()
    rows = table.splitlines()
    assert all(row.startswith("|") and row.count("|") == 5 for row in rows)
    for expected in ("| SMs | 132 |", "| SM clock | 1.83 |", "| tensor cores | 989 |", "| DRAM | 3.35 |",
                     "| L2 | 5.5 |", "| launch overhead | 2 |", "| FlashAttention-2 forward | 324 |",
                     "| FlashAttention-2 backward | 291 |", "| FlashAttention-3 forward | 497 |",
                     "| FlashAttention-3 backward | 474 |", "| Triton forward | 403 |"):
        assert expected in table


def test_glue_counter_counts_inputs_and_outputs_but_not_views_or_allocations():
    x, y = torch.ones(1000, dtype=torch.float16), torch.ones(1000, dtype=torch.float16)
    with pm.GlueCounter() as counter:
        z = x + y  # reads 2 x 2000 bytes, writes 2000
        z.view(10, 100)
        torch.empty(10 ** 6)
        torch.empty_like(x)
    assert counter.bytes == 3 * 2000


@triton.jit
def _fill_ones(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.full([BLOCK], 1.0, tl.float32), mask=offs < n)


def test_stubbed_kernels_do_nothing_and_are_restored():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(16, device=device)
    original = KernelInterface.__getitem__
    with pm.stub_kernels():
        _fill_ones[(1,)](x, 16, BLOCK=16)
    assert KernelInterface.__getitem__ is original
    assert (x == 0).all()
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        _fill_ones[(1,)](x, 16, BLOCK=16)
        assert (x == 1).all()


GLUE_CFG = pm.Config("glue", causal=False, batch=1, heads=2, dim=64, window=16, chunk=16, rank=4, seqlen=256,
                     project_after_ln=True)


def test_glue_bytes_count_the_ops_between_stubbed_kernels(monkeypatch):
    """With launchers whose glue is known (one fp16 add forward, one multiply backward) and which launch a kernel
    that would write ones: exactly the glue's bytes are counted and the kernel never runs."""
    from ls_kernels.triton_backend import launch

    cfg = GLUE_CFG
    shape = (cfg.batch, cfg.heads, cfg.seqlen, cfg.dim)
    nbytes = 2 * cfg.batch * cfg.heads * cfg.seqlen * cfg.dim  # one fp16 (B, H, N, D) tensor
    flag = torch.zeros(16)  # made outside the counter
    seen = {}

    def forward(q, k, v, *, cfg, proj, ln_local, ln_global, pad, store_acc, gpu_tiles):
        assert q.shape == k.shape == v.shape == shape and q.dtype == torch.float16
        assert proj.shape == (*shape[:3], GLUE_CFG.rank) and store_acc and gpu_tiles and pad is None
        assert cfg.scale == pytest.approx(GLUE_CFG.dim ** -0.5) and cfg.project_after_ln and not cfg.causal
        _fill_ones[(1,)](flag, 16, BLOCK=16)
        out = q + k
        return launch.Forward(out=out, o_res=None, lse="lse", projected="projected", ln_stats="ln_stats")

    def backward(do, q, k, v, *, cfg, o, o_res, lse, projected, ln_stats, proj, ln_local, ln_global, gpu_tiles):
        assert do.shape == shape and (lse, projected, ln_stats) == ("lse", "projected", "ln_stats")
        seen["o"], seen["o_res"] = o, o_res
        return do * o

    monkeypatch.setattr(launch, "forward", forward)
    monkeypatch.setattr(launch, "backward", backward)
    assert pm.glue_bytes(cfg) == {"forward": 3 * nbytes, "backward": 3 * nbytes}
    assert (flag == 0).all()  # the kernel was stubbed
    assert seen["o"].shape == shape and seen["o_res"] is None  # out is the backward's o, no residual kept


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_glue_bytes_of_the_real_launchers(causal):
    cfg = dataclasses.replace(GLUE_CFG, causal=causal, project_after_ln=not causal)
    original = KernelInterface.__getitem__
    glue = pm.glue_bytes(cfg)
    assert KernelInterface.__getitem__ is original
    assert all(isinstance(b, int) and b >= 0 for b in glue.values())
    assert glue["forward"] + glue["backward"] > 0
