"""Config-level performance model of the long-short kernels on an H100 SXM, without a GPU.

Each kernel launch is described by a few figures (a ``Launch``: instructions issued, tensor-core FLOPs,
bytes from DRAM and through L2); ``estimate`` turns them into a time from fixed H100 rates, the time of
the slowest resource plus the launch overhead. ``summarize`` adds a configuration's launches and the
PyTorch glue between them (``glue_bytes``, counted by running the launchers with every Triton kernel
stubbed out) and compares the sum with FlashAttention-2 and FlashAttention-3 running full attention at
their published H100 rates, and with the physical limit of the useful work.

Units: seconds, bytes, FLOPs (one multiply-add is 2 FLOPs), warp-instructions; rates per second.
The hardware figures below are fixed assumptions, not fitted to any measurement.

    python bench/perf_model.py   # the constants, the configurations' useful work and their glue bytes
"""
import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# --- H100 SXM5 (fixed assumptions) --------------------------------------------------------------
SM_COUNT = 132  # streaming multiprocessors
CLOCK_HZ = 1.83e9  # SM clock, cycles per second
SCHEDULERS_PER_SM = 4  # warp schedulers, each issuing one warp-instruction per cycle
ISSUE_EFFICIENCY = 0.6  # fraction of issue slots used when the SMs are full
LONE_CTA_ISSUE_EFFICIENCY = 0.35  # fraction of cycles one warp of a lone CTA issues (latencies exposed)
TENSOR_PEAK_FLOPS = 989e12  # fp16 dense tensor-core FLOP/s
TENSOR_EFFICIENCY = 0.6  # fraction of the tensor-core peak reached
DRAM_PEAK_BYTES = 3.35e12  # HBM3 bytes per second
DRAM_EFFICIENCY = 0.8  # fraction of the DRAM peak reached
L2_BYTES = 5.5e12  # L2 bytes per second
LAUNCH_OVERHEAD_S = 2e-6  # seconds added per kernel launch

# rates the terms of ``estimate`` divide by
ISSUE_RATE = SM_COUNT * SCHEDULERS_PER_SM * CLOCK_HZ * ISSUE_EFFICIENCY  # warp-instructions per second
LONE_WARP_RATE = CLOCK_HZ * LONE_CTA_ISSUE_EFFICIENCY  # one warp's warp-instructions per second
TENSOR_RATE = TENSOR_PEAK_FLOPS * TENSOR_EFFICIENCY  # FLOP/s
DRAM_RATE = DRAM_PEAK_BYTES * DRAM_EFFICIENCY  # bytes per second

# --- Published H100 SXM5 rates, fp16, head dim 64, full attention, non-causal, sequence length 16k ----------
# Shah et al. 2024, "FlashAttention-3" (arXiv 2407.08608), the bar labels at 16k of:
#   Figure 5 (a), "Attention forward speed (FP16/BF16) on H100", without causal mask, head dim 64:
#     FlashAttention-2 324, Triton 403, FlashAttention-3 497 TFLOP/s;
#   Figure 6 (a), "Attention backward speed (FP16/BF16) on H100", head dim 64:
#     FlashAttention-2 291, FlashAttention-3 474 TFLOP/s (the figure has no Triton bar).
# The paper counts 4 * N^2 * D FLOPs per head forward and 2.5 times that backward. Causal full attention is
# timed here at these same rates with half the FLOPs (the paper's causal bars are a little lower: a
# generous baseline for causal configurations).
TERA, GIGA, MEGA = 1e12, 1e9, 1e6  # unit prefixes (TFLOP/s = TERA FLOP/s)
FA_RATES = {
    "fa2": {"forward": 324 * TERA, "backward": 291 * TERA},
    "fa3": {"forward": 497 * TERA, "backward": 474 * TERA},
}
TRITON_FWD_RATE = 403 * TERA  # the paper's Triton forward: the model's calibration point
PASSES = ("forward", "backward")
BWD_ATTENTION_FACTOR = 2.5  # backward / forward attention FLOPs: 5 matmuls against 2 (FlashAttention's count)
BWD_PROJECTION_FACTOR = 2.0  # backward / forward projection FLOPs: the gradients of both matmul operands
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # Config.dtype -> torch dtype


@dataclass(frozen=True)
class Config:
    """One benchmark shape: B batch, H heads, D head dim, N seqlen; window w, chunk l (causal only), rank r."""
    name: str
    causal: bool
    batch: int
    heads: int
    dim: int
    window: int
    chunk: int
    rank: int
    seqlen: int
    project_after_ln: bool
    dtype: str = "fp16"


CONFIGS = {c.name: c for c in (
    Config("charlm_b1", causal=True, batch=1, heads=8, dim=64, window=512, chunk=16, rank=1, seqlen=16384,
           project_after_ln=False),
    Config("charlm_b4", causal=True, batch=4, heads=8, dim=64, window=512, chunk=16, rank=1, seqlen=16384,
           project_after_ln=False),
    Config("lra_n64k", causal=False, batch=1, heads=8, dim=64, window=8, chunk=16, rank=32, seqlen=65536,
           project_after_ln=True),
    Config("mid_n32k", causal=False, batch=1, heads=8, dim=64, window=128, chunk=16, rank=64, seqlen=32768,
           project_after_ln=True),
)}


# --- Useful work ---------------------------------------------------------------------------------------

def half_width(window):
    """e: a bidirectional segment of w positions is widened by e keys on each side (the package's rule)."""
    return max(window // 2, 1)


def _bidirectional_window_pairs(N, w):
    """Visible (query, window key) pairs of one sequence: segment s holds queries s*w .. s*w + w - 1 and sees
    keys s*w - e .. s*w + w + e - 1, both clipped to [0, N)."""
    if w <= 0 or N <= 0:
        return 0
    e = half_width(w)
    start = torch.arange(0, N, w, dtype=torch.int64)
    queries = torch.clamp(N - start, max=w)
    keys = torch.clamp(start + w + e, max=N) - torch.clamp(start - e, min=0)
    return int((queries * keys).sum())


def _causal_window_pairs(N, w):
    """Visible (query, window key) pairs of one sequence: query t sees keys max(0, t - w + 1) .. t, that is
    min(t + 1, w) of them."""
    if w <= 0 or N <= 0:
        return 0
    if N <= w:
        return N * (N + 1) // 2
    return w * (w + 1) // 2 + (N - w) * w


def _causal_projected_pairs(N, chunk, r):
    """Visible (query, projected key) pairs of one sequence: query t sees the r projected keys of each chunk
    before its own, (t // chunk) * r of them."""
    full = N // chunk
    tail = N - full * chunk  # queries of the last, partial chunk
    return r * (chunk * full * (full - 1) // 2 + tail * full)


def useful_pairs(cfg):
    """(window_pairs, projected_pairs): visible (query, key) pairs summed over all queries, heads and batch."""
    N, w, r = cfg.seqlen, cfg.window, cfg.rank
    if cfg.causal:
        window, projected = _causal_window_pairs(N, w), _causal_projected_pairs(N, cfg.chunk, r)
    else:
        window, projected = _bidirectional_window_pairs(N, w), N * r
    sequences = cfg.batch * cfg.heads
    return window * sequences, projected * sequences


def projection_flops(cfg):
    """Forward FLOPs of P^T k and P^T v: P is (N, r) bidirectional, or one (chunk, r) per full chunk."""
    positions = cfg.seqlen if not cfg.causal else (cfg.seqlen // cfg.chunk) * cfg.chunk
    return 2 * 2 * positions * cfg.rank * cfg.dim * cfg.batch * cfg.heads


def useful_flops(cfg):
    """{pass: FLOPs}: QK^T and PV over the visible pairs plus the projection; the backward 2.5x the attention
    and 2x the projection."""
    attention = 2 * 2 * cfg.dim * sum(useful_pairs(cfg))
    projection = projection_flops(cfg)
    return {"forward": attention + projection,
            "backward": BWD_ATTENTION_FACTOR * attention + BWD_PROJECTION_FACTOR * projection}


def min_bytes(cfg):
    """{pass: bytes} read and written at least once. Forward: q, k, v, proj in, o out. Backward: q, k, v, proj,
    dO in, dq, dk, dv, dproj out."""
    rows = cfg.batch * cfg.heads * cfg.seqlen
    qkv, proj = rows * cfg.dim, rows * cfg.rank  # elements of one (B, H, N, D) tensor, of proj
    size = DTYPES[cfg.dtype].itemsize  # bytes per element
    return {"forward": size * (4 * qkv + proj), "backward": size * (7 * qkv + 2 * proj)}


def full_attention_flops(cfg):
    """{pass: FLOPs} of full attention at the same shape: 4 N^2 D per head forward (half when causal), 2.5x
    that backward."""
    forward = 4 * cfg.seqlen ** 2 * cfg.dim * cfg.batch * cfg.heads
    if cfg.causal:
        forward //= 2
    return {"forward": forward, "backward": BWD_ATTENTION_FACTOR * forward}


def fa_times(cfg, which):
    """{pass: seconds} of full attention at FlashAttention's published rates (which: "fa2" or "fa3")."""
    flops = full_attention_flops(cfg)
    return {p: flops[p] / FA_RATES[which][p] for p in PASSES}


def limit_times(cfg):
    """{pass: seconds} of the physical limit: the useful FLOPs at FlashAttention-3's rate for the pass, or the
    minimum bytes at the DRAM rate, whichever is longer."""
    flops, nbytes = useful_flops(cfg), min_bytes(cfg)
    return {p: max(flops[p] / FA_RATES["fa3"][p], nbytes[p] / DRAM_RATE) for p in PASSES}


# --- One kernel launch ---------------------------------------------------------------------------------------

@dataclass
class Launch:
    """Figures of one kernel launch. warps: per CTA; warp_instructions: issued by all CTAs and warps;
    longest_cta_warp_instructions: issued by one warp of the longest CTA; tensor_flops: issued MMA FLOPs;
    dram_bytes: unique bytes (each tensor read once, plus writes); l2_bytes: every byte the loads and stores
    issue, re-reads included; extra: figures passed through to the report (e.g. tile efficiency)."""
    name: str
    warps: int
    ctas: int
    warp_instructions: float
    longest_cta_warp_instructions: float
    tensor_flops: float
    dram_bytes: float
    l2_bytes: float
    extra: dict = field(default_factory=dict)


TERMS = ("issue", "critical", "tensor", "dram", "l2")  # the resources a launch may be bound by


def estimate(launch):
    """Seconds each resource needs for the launch ({term}_s), the launch's time (the largest plus the launch
    overhead) and its bound (the name of the largest)."""
    terms = {
        "issue": launch.warp_instructions / ISSUE_RATE,
        "critical": launch.longest_cta_warp_instructions / LONE_WARP_RATE,  # a lone CTA ends the launch
        "tensor": launch.tensor_flops / TENSOR_RATE,
        "dram": launch.dram_bytes / DRAM_RATE,
        "l2": launch.l2_bytes / L2_BYTES,
    }
    bound = max(TERMS, key=terms.get)
    out = {f"{t}_s": terms[t] for t in TERMS}
    out.update(time_s=terms[bound] + LAUNCH_OVERHEAD_S, bound=bound)
    return out


def load_balance(per_cta_instructions):
    """Longest CTA over the mean CTA (1.0: perfectly balanced)."""
    per_cta = list(per_cta_instructions)
    return max(per_cta) / (sum(per_cta) / len(per_cta))


# --- One configuration -----------------------------------------------------------------------------------

def _kernel_rows(launches, pass_name):
    return [{"name": launch.name, "pass": pass_name, "warps": launch.warps, "ctas": launch.ctas,
             **estimate(launch), **launch.extra} for launch in launches]


def summarize(cfg, fwd_launches, bwd_launches, glue, extra=None):
    """Times of one configuration (seconds) and their comparisons.

    fwd_launches, bwd_launches: the Launches of each pass; glue: {pass: bytes} of the PyTorch ops between the
    kernels, timed at the DRAM rate. speedup_fa2/fa3: FlashAttention's full-attention fwd+bwd time at its
    published rates over ours; limit_speedup: FlashAttention-3's over the physical limit's;
    pct_physical_limit: the percentage of that limit speedup reached. extra: merged into the result.
    """
    kernels = _kernel_rows(fwd_launches, "forward") + _kernel_rows(bwd_launches, "backward")
    time = {p: sum(k["time_s"] for k in kernels if k["pass"] == p) + glue[p] / DRAM_RATE for p in PASSES}
    ours = sum(time.values())
    fa2, fa3, limit = sum(fa_times(cfg, "fa2").values()), sum(fa_times(cfg, "fa3").values()), limit_times(cfg)
    nbytes = min_bytes(cfg)
    speedup_fa3, limit_speedup = fa3 / ours, fa3 / sum(limit.values())
    result = {
        "config": cfg.name,
        "time_fwd_s": time["forward"],
        "time_bwd_s": time["backward"],
        "speedup_fa2": fa2 / ours,
        "speedup_fa3": speedup_fa3,
        "limit_speedup": limit_speedup,
        "pct_physical_limit": 100 * speedup_fa3 / limit_speedup,
        "limit_s": limit,
        "glue_bytes": dict(glue),
        "glue_bytes_ratio": {p: glue[p] / nbytes[p] for p in PASSES},
        "useful_flops": useful_flops(cfg),
        "min_bytes": nbytes,
        "kernels": kernels,
    }
    result.update(extra or {})
    return result


def plain_calibration(launch, flops):
    """The model's TFLOP/s for a plain FlashAttention-style forward launch of `flops` FLOPs, beside the
    FlashAttention-3 paper's measured Triton forward at head dim 64 (ratio > 1: the model is optimistic)."""
    est = estimate(launch)
    model = flops / est["time_s"] / TERA
    paper = TRITON_FWD_RATE / TERA
    return {"name": launch.name, "time_s": est["time_s"], "bound": est["bound"], "model_tflops": model,
            "paper_triton_tflops": paper, "ratio": model / paper}


# --- Constants as a table ---------------------------------------------------------------------------------

def constants_table():
    """The model's fixed figures as a markdown table."""
    rows = [
        ("SMs", SM_COUNT, "", "H100 SXM5"),
        ("SM clock", CLOCK_HZ / GIGA, "GHz", ""),
        ("warp schedulers per SM", SCHEDULERS_PER_SM, "", "1 warp-instruction per cycle each"),
        ("issue efficiency", ISSUE_EFFICIENCY, "", f"issue rate {ISSUE_RATE / TERA:.3f} T warp-instr/s"),
        ("lone-CTA issue efficiency", LONE_CTA_ISSUE_EFFICIENCY, "",
         f"one warp: {LONE_WARP_RATE / GIGA:.3f} G warp-instr/s"),
        ("tensor cores", TENSOR_PEAK_FLOPS / TERA, "TFLOP/s", f"fp16 dense, used at {TENSOR_EFFICIENCY:.0%}"),
        ("DRAM", DRAM_PEAK_BYTES / TERA, "TB/s", f"used at {DRAM_EFFICIENCY:.0%}"),
        ("L2", L2_BYTES / TERA, "TB/s", ""),
        ("launch overhead", LAUNCH_OVERHEAD_S * MEGA, "us", "per kernel"),
    ]
    for which, label in (("fa2", "FlashAttention-2"), ("fa3", "FlashAttention-3")):
        for p, figure in zip(PASSES, ("5a", "6a")):
            rows.append((f"{label} {p}", FA_RATES[which][p] / TERA, "TFLOP/s",
                         f"arXiv 2407.08608 Fig. {figure}, D 64, 16k, non-causal"))
    rows.append(("Triton forward", TRITON_FWD_RATE / TERA, "TFLOP/s",
                 "arXiv 2407.08608 Fig. 5a, D 64, 16k, non-causal"))
    lines = ["| quantity | value | unit | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:g} | {unit} | {note} |" for name, value, unit, note in rows]
    return "\n".join(lines)


# --- PyTorch glue between the kernels -------------------------------------------------------------------

def _tensor_bytes(tree):
    return sum(x.numel() * x.element_size() for x in tree_leaves(tree) if isinstance(x, torch.Tensor))


# aten ops that only allocate: they move no bytes
_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}


class GlueCounter(TorchDispatchMode):
    """Under it, ``bytes`` sums over every aten op that is neither a view nor an allocation the bytes of all
    tensors among the op's inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket not in _ALLOCATIONS:
            self.bytes += _tensor_bytes((args, kwargs, out))
        return out


@contextlib.contextmanager
def stub_kernels():
    """Within it, launching any Triton kernel (``kernel[grid](...)``) does nothing. The launch goes through
    KernelInterface.__getitem__, which JITFunction and, under TRITON_INTERPRET=1, InterpretedFunction inherit;
    it is restored on exit."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def _inputs(cfg, device):
    """q, k, v, proj, dO of the config's shape and dtype, and the LayerNorm parameters (weight, bias)."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (cfg.batch, cfg.heads, cfg.seqlen, cfg.dim)
    q, k, v, do = (torch.randn(shape, generator=g, device=device, dtype=DTYPES[cfg.dtype]) for _ in range(4))
    proj = torch.randn(*shape[:3], cfg.rank, generator=g, device=device, dtype=DTYPES[cfg.dtype])
    ln_local, ln_global = ((torch.ones(cfg.dim, device=device), torch.zeros(cfg.dim, device=device)) for _ in range(2))
    return q, k, v, proj, do, ln_local, ln_global


def glue_bytes(cfg, device="cpu"):
    """{pass: bytes} the PyTorch ops between the kernels read and write in one forward (store_acc=True) and one
    backward of the fused path, with every Triton kernel stubbed out (only the glue runs; kernel outputs are
    left uninitialised, which changes no byte count)."""
    from ls_kernels.config import LSConfig
    from ls_kernels.triton_backend import launch

    q, k, v, proj, do, ln_local, ln_global = _inputs(cfg, device)
    ls_cfg = LSConfig(window=cfg.window, causal=cfg.causal, chunk=cfg.chunk, rank=cfg.rank, scale=cfg.dim ** -0.5,
                      project_after_ln=cfg.project_after_ln)
    ln = dict(ln_local=ln_local, ln_global=ln_global)
    with stub_kernels():
        with GlueCounter() as fwd:
            res = launch.forward(q, k, v, cfg=ls_cfg, proj=proj, pad=None, store_acc=True, gpu_tiles=True, **ln)
        with GlueCounter() as bwd:
            launch.backward(do, q, k, v, cfg=ls_cfg, o=res.out, o_res=res.o_res, lse=res.lse,
                            projected=res.projected, ln_stats=res.ln_stats, proj=proj, gpu_tiles=True, **ln)
    return {"forward": fwd.bytes, "backward": bwd.bytes}


def main():
    print(constants_table())
    print("\n| config | window pairs | projected pairs | useful GFLOP fwd / bwd | minimum MB fwd / bwd | "
          "glue MB fwd / bwd | glue / minimum fwd / bwd |")
    print("|---|---|---|---|---|---|---|")
    for cfg in CONFIGS.values():
        pairs, flops, nbytes, glue = useful_pairs(cfg), useful_flops(cfg), min_bytes(cfg), glue_bytes(cfg)
        print(f"| {cfg.name} | {pairs[0]} | {pairs[1]} | {flops['forward'] / GIGA:.1f} / {flops['backward'] / GIGA:.1f}"
              f" | {nbytes['forward'] / MEGA:.1f} / {nbytes['backward'] / MEGA:.1f}"
              f" | {glue['forward'] / MEGA:.4g} / {glue['backward'] / MEGA:.4g}"
              f" | {glue['forward'] / nbytes['forward']:.2g} / {glue['backward'] / nbytes['backward']:.3g} |")


if __name__ == "__main__":
    main()
