"""The settings of one long-short attention call, and the small rules every path shares.

Each rule is written once here: the bidirectional window's half width, the number of projected
vectors, the accumulation dtype, which projected vector a padded sequence or chunk may show.
Imported by every layer above; imports nothing of the package.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

# Triton runs its kernels on CPU tensors in its interpreter when this is set before import
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128  # the Triton kernels' largest head dim
HALF_DTYPES = (torch.float16, torch.bfloat16)
LAYER_LN_EPS = 1e-5  # the layers' LayerNorm epsilon (nn.LayerNorm's default, as the official layers use)


@dataclass(frozen=True)
class LSConfig:
    """What one call computes (README "What it computes").

    window: w >= 0 (0: no window), at most N; causal: autoregressive; chunk: l >= 1, positions projected
    together when causal; rank: r, projected vectors per sequence (bidirectional) or chunk (causal), 0 for
    none; project_after_ln: the projection reads LN_L(k), LN_L(v); scale: the score scale; eps: the
    LayerNorm epsilon.

    Causal keys beyond the queries (N queries, Nk >= N keys): query row i sits at key position i + query_offset
    (its window) and at chunk position i + chunk_offset (which projected vectors it sees: those of chunks
    before (i + chunk_offset) // chunk, of a list counted from chunk 0); None means Nk - N, the last N
    positions (``offsets``). A shard of a longer sequence sets them apart: its queries see a halo of keys
    before them and the chunks of the whole sequence before them.
    """
    window: int
    causal: bool
    chunk: int
    rank: int
    scale: float
    eps: float = 1e-5
    project_after_ln: bool = False
    query_offset: Optional[int] = None
    chunk_offset: Optional[int] = None

    def offsets(self, N, Nk):
        """(query offset, chunk offset) of N queries against Nk keys."""
        q_off = Nk - N if self.query_offset is None else self.query_offset
        return q_off, Nk - N if self.chunk_offset is None else self.chunk_offset

    @property
    def half_width(self):
        """e: a bidirectional window is its segment of w positions widened by e on each side."""
        return half_width(self.window)

    @property
    def window_span(self):
        """Window keys one query may see: w (causal), w + 2e (bidirectional), 0 without a window."""
        if self.window <= 0:
            return 0
        return self.window if self.causal else self.window + 2 * self.half_width

    def num_projected(self, N):
        """NG: projected vectors of a sequence of N positions (causal: of its full chunks, chunk-major)."""
        return self.rank * (N // self.chunk if self.causal else 1)


def half_width(window):
    return max(window // 2, 1)


def clamp_window(window, N):
    """Every window of N or more positions sees the whole sequence: it acts as window = N (at least 1)."""
    return min(window, max(N, 1))


def default_scale(D):
    return 1.0 / math.sqrt(D)


def acc_dtype(dtype):
    """Accumulation dtype of statistics and products: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- two-dimensional windows


@dataclass(frozen=True)
class LS2DConfig:
    """What one two-dimensional call computes (README "Vision: two-dimensional windows").

    grid: (nx, ny), the patch tokens row-major (token i * ny + j at row i, column j); window: w >= 0, the
    side of the w x w query patches (0: no window), each seeing the (w + 2s) x (w + 2s) keys around it
    (s = half_width) clipped to the grid; rank: r projected vectors (softmax over all grid positions), 0 for
    none; num_global: G global keys seen by every query; has_bias: a relative-position bias table is added to
    the window scores; scale, eps, project_after_ln: as LSConfig's.
    """
    grid: tuple
    window: int
    rank: int
    num_global: int
    has_bias: bool
    scale: float
    eps: float = 1e-5
    project_after_ln: bool = True

    @property
    def half_width(self):
        return half_width(self.window)

    @property
    def span(self):
        """Side of the neighbourhood a patch sees: w + 2s (0 without a window)."""
        return self.window + 2 * self.half_width if self.window > 0 else 0

    @property
    def patches(self):
        """(patch rows, patch columns): the grid cut into w x w patches, the last ones clipped."""
        nx, ny = self.grid
        return -(-nx // self.window), -(-ny // self.window)


def rel_pos_rows(window):
    """Rows of the relative-position bias table of patch side w (the official ViL-LS layout, one column per
    head): 2 (w + p - 1)(w + 2p + 1) + 1, p = w // 2."""
    p = window // 2
    return 2 * (window + p - 1) * (window + 2 * p + 1) + 1


def rel_pos_index(window, d_row, d_col):
    """The table row of a window score whose query lies d_row rows and d_col columns after its key (tensors or
    ints; the official index: (d_row + c)(w + 2p) + d_col + c, c = w + p - 1, p = w // 2). Defined for
    |d_row|, |d_col| <= c, which every visible pair satisfies when w >= 2 (then s = p)."""
    p = window // 2
    c = window + p - 1
    return (d_row + c) * (window + 2 * p) + d_col + c
