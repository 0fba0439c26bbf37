"""Random inputs and error measures shared by the kernel tests."""
import torch

from reference import ls_attention_ref


def make_inputs(B, H, N, D, r, *, dtype=torch.float32, pad="none", ln_local="head", ln_global="shared",
                chunk=16, seed=0, device="cpu", requires_grad=False):
    """q, k, v, proj and the keyword arguments of ls_attention (everything but window/causal)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return x.requires_grad_(requires_grad)

    q, k, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D)
    proj = rand(B, H, N, r) if r else None
    mask = torch.zeros(B, N, dtype=torch.bool)
    if pad == "rows":  # random padded positions
        mask = torch.rand(B, N, generator=g) < 0.25
    elif pad == "seq":  # last sequence of the batch fully padded, first one padded at the end
        mask[-1] = True
        mask[0, N - N // 3:] = True
    elif pad == "chunk":  # a whole chunk padded in the middle
        start = (N // 2) // chunk * chunk
        mask[:, start:start + chunk] = True

    def ln(kind):
        if kind is None:
            return None
        shape = (D,) if kind == "shared" else (H, D)
        return (1.0 + 0.3 * rand(*shape)).detach().requires_grad_(requires_grad), \
            (0.3 * rand(*shape)).detach().requires_grad_(requires_grad)

    kwargs = dict(ln_local=ln(ln_local), ln_global=ln(ln_global), chunk=chunk,
                  key_padding_mask=mask.to(device) if pad != "none" else None)
    return q, k, v, proj, kwargs


def to64(x):
    return None if x is None else x.detach().double().requires_grad_(x.requires_grad)


def reference_errors(q, k, v, proj, out, **kwargs):
    """Max error against the fp64 reference of `out` and of the same-dtype PyTorch path."""
    ln = {key: None if kwargs[key] is None else tuple(to64(x) for x in kwargs[key])
          for key in ("ln_local", "ln_global")}
    ref64 = ls_attention_ref(to64(q), to64(k), to64(v), to64(proj), **{**kwargs, **ln})
    same = ls_attention_ref(q, k, v, proj, upcast=False, **kwargs)
    return (out.double() - ref64).abs().max().item(), (same.double() - ref64).abs().max().item()
