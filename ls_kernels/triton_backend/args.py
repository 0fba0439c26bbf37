"""Host-side twins of the kernels' arguments: the scalars tensor, LayerNorm parameters, the stand-in for an
absent optional tensor, padding as int8, projected-vector visibility, strides and tile formulas."""
import torch

from ..common import projected_visibility
from ..config import INTERPRET, LOG2E, acc_dtype


def kernel_dtype(dtype):
    """The dtype the kernels compute q, k, v in: the input's, but fp32 for bf16 in the interpreter, whose bf16
    arithmetic is wrong (compiled kernels compute bf16 natively)."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def block_d(D):
    """Tile width over the head dim: a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, next_pow2(D))


def block_g(NG, BLOCK_N):
    """Tile of projected vectors: at most the key tile, at least 16, no wider than NG needs."""
    return max(16, min(BLOCK_N, next_pow2(max(NG, 1))))


# the compute capability the default tiles are chosen for (H100); older GPUs take smaller tiles (launch.py)
HOPPER = 90


def gpu_arch(device):
    """Compute capability of a CUDA device as an int (80 for sm_80, 90 for sm_90a); HOPPER for any other
    device (tiles there only matter to tests that run the GPU's tiles in the interpreter)."""
    if device.type != "cuda":
        return HOPPER
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def make_scalars(scale, eps, dtype, device):
    """[4] in the accumulation dtype, read by kernels/common._load_scalars: the score scale in the kernels' exp
    units (times log2(e) unless fp64), eps, 0, the plain score scale."""
    acc = acc_dtype(dtype)
    qk_scale = scale if acc == torch.float64 else scale * LOG2E
    return torch.tensor([qk_scale, eps, 0.0, scale], dtype=acc, device=device)


def absent(device):
    """The pointer passed for an optional tensor that is absent: the kernel never reads it (a constexpr flag
    is off)."""
    return torch.empty(1, dtype=torch.int8, device=device)


def ln_params(ln, H, D, dtype, device):
    """(weight, bias, stride_h) as contiguous (H or 1, D) tensors in dtype; stand-ins when ln is None."""
    if ln is None:
        return absent(device), absent(device), 0
    weight, bias = (x.to(dtype).reshape(-1, D).contiguous() for x in ln)
    return weight, bias, (D if ln[0].dim() == 2 else 0)


def pad_int8(pad):
    """(pad as contiguous int8 (B, N) or None, its batch stride): what the kernels' PAD pointer reads."""
    if pad is None:
        return None, 0
    pad8 = pad.contiguous().view(torch.int8)
    return pad8, pad8.stride(0)


def gvis_int8(pad, B, N, rank, causal, chunk, NG, device, given=None):
    """(B, NG) int8, contiguous: whether each projected vector comes from a sequence / chunk with real tokens
    (given: that (B, NG) bool, as the caller knows it)."""
    if NG == 0:
        return torch.empty(B, 0, dtype=torch.int8, device=device)
    vis = given if given is not None else projected_visibility(pad, B, N, rank, causal=causal, chunk=chunk,
                                                                device=device)
    return vis.to(torch.int8).contiguous()


def bhn_strides(*xs):
    """Batch, head and row strides of (B, H, N, ...) tensors, in kernel argument order."""
    return [st for x in xs for st in x.stride()[:3]]
