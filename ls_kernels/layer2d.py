"""``LongShortAttention2d``: the vision attention layer of Transformer-LS (ViL-LS), two-dimensional windows,
global (CLS) tokens and a relative-position bias around ``ls_attention_2d_projected``."""
import torch
from torch import nn

from .api import dynamic_projection, ls_attention_2d_projected
from .checks import check_layer_2d_args, check_layer_2d_input, check_official_vil
from .common import merged_heads_layer_norm, model_layer_norm
from .config import LAYER_LN_EPS, acc_dtype, default_scale, rel_pos_rows

BIAS_INIT_STD = 0.02  # the relative-position table's truncated-normal initialisation (as the official layer's)


class LongShortAttention2d(nn.Module):
    """Long-short attention over an image's patch tokens (the ViL-LS layer of Transformer-LS).

    ``forward(x, grid=(nx, ny))`` maps x (B, G + nx * ny, E), the G global tokens (e.g. CLS) first and then
    the patch tokens row-major, to the same shape:

    - Q, K, V are Linear maps of x; K and V are normalised by LayerNorm(E) (``ln_local``) before the head
      split, global tokens included;
    - each patch token attends, under one softmax, to the keys of the (w + 2s) x (w + 2s) neighbourhood of its
      w x w patch (s = max(w // 2, 1), clipped to the grid; plus the relative-position bias ``rel_pos_bias``,
      per head), to r projected keys and values (P = softmax over the patch positions of a Linear map of
      the patch tokens, head-major channels; Kg = LayerNorm(E) (``ln_global``) of P^T K with the heads merged,
      likewise Vg) and to the G global keys (``ls_attention_2d_projected``);
    - each global query attends, in its own softmax, to the global keys (values: the global values) and to
      the patch tokens' attention outputs (used as both keys and values);
    - the heads are merged and mapped by the output Linear.

    Args:
        embed_dim: E, divisible by ``num_heads``.
        num_heads: H.
        window: w >= 0, the patch side (0: no window).
        rank: r >= 0, projected keys (0: none).
        num_global: G >= 0, the global tokens at the front of x.
        rel_pos_bias: whether window scores get the learned relative-position bias (a table (rows, H),
            rows = 2 (w + p - 1)(w + 2p + 1) + 1, p = w // 2; needs w >= 2).
        qkv_bias: whether the Q, K, V maps have biases (the output map always has one).
        scale: score scale, default 1 / sqrt(E / H).
        backend: as ``ls_attention_2d``.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Linear E -> E), ``dproj`` (Linear
    E -> H * r, None when r = 0), ``ln_local_weight/bias`` and ``ln_global_weight/bias`` (E,), ``rel_pos_bias``
    (rows, H) or None. LayerNorm statistics and softmaxes in fp32.
    """

    def __init__(self, embed_dim, num_heads, *, window, rank, num_global=1, rel_pos_bias=True, qkv_bias=False,
                 scale=None, backend="auto"):
        super().__init__()
        embed_dim, num_heads, window, rank, num_global = check_layer_2d_args(
            embed_dim, num_heads, window, rank, num_global, rel_pos_bias, qkv_bias, scale, backend)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.window, self.rank, self.num_global = window, rank, num_global
        self.scale = default_scale(self.head_dim) if scale is None else float(scale)
        self.backend = backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dproj = nn.Linear(embed_dim, num_heads * rank) if rank > 0 else None
        for side in ("ln_local", "ln_global"):
            self.register_parameter(side + "_weight", nn.Parameter(torch.ones(embed_dim)))
            self.register_parameter(side + "_bias", nn.Parameter(torch.zeros(embed_dim)))
        self.rel_pos_bias = None
        if rel_pos_bias:
            self.rel_pos_bias = nn.Parameter(torch.empty(rel_pos_rows(window), num_heads))
            nn.init.trunc_normal_(self.rel_pos_bias, std=BIAS_INIT_STD)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, rank={self.rank}, "
                f"num_global={self.num_global}, rel_pos_bias={self.rel_pos_bias is not None}, scale={self.scale}, "
                f"backend={self.backend!r}")

    def _ln(self, side):
        return getattr(self, side + "_weight"), getattr(self, side + "_bias")

    def forward(self, x, grid):
        """x (B, G + nx * ny, E), the global tokens first, then the patch tokens row-major over grid (nx, ny)
        -> (B, G + nx * ny, E)."""
        grid = check_layer_2d_input(x, self.embed_dim, self.q_proj.weight, grid, self.num_global)
        B, T, E = x.shape
        H, D, G, r = self.num_heads, self.head_dim, self.num_global, self.rank

        def heads(t):  # (B, T, E) -> (B, H, T, D)
            return t.reshape(B, T, H, D).transpose(1, 2)

        q = heads(self.q_proj(x))
        k = heads(model_layer_norm(self.k_proj(x), self._ln("ln_local"), LAYER_LN_EPS))
        v = heads(model_layer_norm(self.v_proj(x), self._ln("ln_local"), LAYER_LN_EPS))
        kg = vg = None
        if r > 0:
            proj = self.dproj(x[:, G:]).reshape(B, T - G, H, r).transpose(1, 2)  # head-major channels
            kg, vg = dynamic_projection(proj, k[:, :, G:], v[:, :, G:])  # (B, H, r, D)
            kg, vg = (merged_heads_layer_norm(t, self._ln("ln_global"), LAYER_LN_EPS) for t in (kg, vg))
        k, v = k.to(q.dtype), v.to(q.dtype)
        glob = dict(global_k=k[:, :, :G], global_v=v[:, :, :G]) if G > 0 else {}
        o = ls_attention_2d_projected(q[:, :, G:], k[:, :, G:], v[:, :, G:], kg, vg, grid=grid, window=self.window,
                                      rel_pos_bias=self.rel_pos_bias, scale=self.scale, backend=self.backend, **glob)
        if G > 0:
            o = torch.cat([self._global_queries(q[:, :, :G], k[:, :, :G], v[:, :, :G], o), o], dim=2)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, E))

    def _global_queries(self, q_glob, k_glob, v_glob, out):
        """(B, H, G, D): each global query's softmax over the global keys and the patch outputs `out`
        (B, H, N, D), which serve as keys and values; products and statistics in fp32."""
        acc = acc_dtype(q_glob.dtype)
        q_glob, k_glob, v_glob, out_acc = (t.to(acc) for t in (q_glob, k_glob, v_glob, out))
        scores = torch.cat([q_glob @ k_glob.transpose(-1, -2), q_glob @ out_acc.transpose(-1, -2)], dim=-1)
        probs = torch.softmax(scores * self.scale, dim=-1)
        G = k_glob.shape[2]
        return (probs[..., :G] @ v_glob + probs[..., G:] @ out_acc).to(out.dtype)

    @classmethod
    def from_official_vil(cls, state_dict, *, num_heads, window, rank, num_global=1, prefix="", scale=None,
                          backend="auto"):
        """A layer holding the weights of the official vision attention.

        ``state_dict`` is that of ``AttentionLS`` in NVIDIA/transformer-ls,
        imagenet/models/layers/transformer_ls.py (keys ``qkv``, ``proj``, ``to_dynamic_projection``,
        ``dual_ln_full``, ``dual_ln_dp``, optionally ``local_relative_position_bias_table`` and
        ``relative_position_index``), or of a model holding it with ``prefix``. ``num_heads``, ``window``,
        ``rank``, ``num_global`` are the official ``num_heads``, ``w``, ``dp_rank``, ``nglo``; ``scale`` its
        ``qk_scale`` (default head_dim ** -0.5). The Q, K, V maps are the three E-row blocks of ``qkv``; the bias
        table is used with the official index. The result is in the state dict's dtype and device.

        Equivalence (within fp32 rounding): ``layer(x, grid=(n, n))`` equals the official
        ``AttentionLS.forward(x, n, n)`` in eval mode (or with dropouts 0) for square grids whose side is a
        multiple of ``window`` (the official code needs both) and one global token (with two or more, the
        official layer multiplies the global attention weights and values elementwise, which only broadcasts
        for one; this layer sums over the global tokens). This layer also takes rectangular grids and grids
        that ``window`` does not divide.
        """
        sd, E, qkv_bias, has_table = check_official_vil(state_dict, prefix, num_heads, rank)
        layer = cls(E, num_heads, window=window, rank=rank, num_global=num_global, rel_pos_bias=has_table,
                    qkv_bias=qkv_bias, scale=scale, backend=backend)
        if has_table and tuple(sd["local_relative_position_bias_table"].shape) != tuple(layer.rel_pos_bias.shape):
            raise ValueError(f"local_relative_position_bias_table has shape "
                             f"{tuple(sd['local_relative_position_bias_table'].shape)}, but window {window} and "
                             f"num_heads {num_heads} give {tuple(layer.rel_pos_bias.shape)}: check window")
        ref = sd["qkv.weight"]
        layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                getattr(layer, name).weight.copy_(sd["qkv.weight"][i * E:(i + 1) * E])
                if qkv_bias:
                    getattr(layer, name).bias.copy_(sd["qkv.bias"][i * E:(i + 1) * E])
            pairs = [("proj", "out_proj")] + ([("to_dynamic_projection", "dproj")] if rank > 0 else [])
            for official, ours in pairs:
                getattr(layer, ours).weight.copy_(sd[official + ".weight"])
                getattr(layer, ours).bias.copy_(sd[official + ".bias"])
            for official, ours in (("dual_ln_full", "ln_local"), ("dual_ln_dp", "ln_global")):
                getattr(layer, ours + "_weight").copy_(sd[official + ".weight"])
                getattr(layer, ours + "_bias").copy_(sd[official + ".bias"])
            if has_table:
                layer.rel_pos_bias.copy_(sd["local_relative_position_bias_table"])
        return layer
