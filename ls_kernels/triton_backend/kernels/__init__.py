"""Triton kernels: common jit helpers, window/projected visibility, forward, backward, projection."""
