"""Peak process memory of the blocked PyTorch path's forward on CPU (fp32, no_grad, inputs included).

The measurement runs in a fresh child process with MALLOC_MMAP_THRESHOLD_=65536, so large tensors are
mmapped and returned to the OS when freed; the child reads its peak resident set (VmHWM) from
/proc/self/status after `import torch`, after creating the inputs, and after the forward.

    python bench/memory_blocked.py [--seqlen 65536 --heads 4 --dim 64 --window 128 --rank 16 --batch 1 --causal]
"""
import argparse
import os
import subprocess
import sys

MiB = 2 ** 20


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(a):
    import torch
    print(f"peak after import torch:      {vm_hwm_mib():9.1f} MiB")
    from ls_kernels import ls_attention
    print(f"peak after import ls_kernels: {vm_hwm_mib():9.1f} MiB")

    torch.manual_seed(0)
    B, H, N, D, r = a.batch, a.heads, a.seqlen, a.dim, a.rank
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    proj = torch.randn(B, H, N, r) if r > 0 else None
    size = sum(x.numel() * x.element_size() for x in (q, k, v, proj) if x is not None)
    print(f"inputs (q, k, v, proj):       {size / MiB:9.1f} MiB")
    print(f"peak after creating inputs:   {vm_hwm_mib():9.1f} MiB")
    with torch.no_grad():
        out = ls_attention(q, k, v, proj, window=a.window, causal=a.causal, backend="torch")
    print(f"peak after forward:           {vm_hwm_mib():9.1f} MiB")
    print(f"output:                       {out.numel() * out.element_size() / MiB:9.1f} MiB")
    print(f"full attention (N, N) fp32 scores alone for B*H = {B * H} heads: {B * H * N * N * 4 / 1e9:.1f} GB")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="r, projected length; 0 for window only")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    print(f"blocked forward, fp32, CPU, no_grad: B={a.batch} H={a.heads} N={a.seqlen} D={a.dim} "
          f"w={a.window} r={a.rank} {'causal' if a.causal else 'bidirectional'}", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    return subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
