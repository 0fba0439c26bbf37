"""``LongShortAttention``: the Transformer-LS attention layer (Q/K/V/output projections,
dynamic projection, DualLN) around the long-short attention op."""
import torch
from torch import nn

from .api import decode_tokens, dynamic_projection, ls_attention, ls_attention_projected
from .distributed import cp_attention
from .cache import LSCache
from .checks import (check_cache_fits, check_layer_args, check_layer_cache, check_layer_input, check_layer_sharded,
                     check_official_lra, check_official_lra_dconv, use_triton)
from .common import layer_norm, merged_heads_layer_norm, model_layer_norm
from .config import LAYER_LN_EPS, LSConfig, acc_dtype, default_scale

# official LRA AttentionLS parameters (NVIDIA/transformer-ls, lra/attention_transformer_ls.py) -> this layer's
_OFFICIAL_LRA = {
    "W_q": "q_proj", "W_k": "k_proj", "W_v": "v_proj", "W_o": "out_proj", "dconv_fc": "dproj",
    "dual_ln_l": "ln_local", "dual_ln_s": "ln_global",
}


class LongShortAttention(nn.Module):
    """Long-short attention layer (Transformer-LS, Zhu et al., NeurIPS 2021).

    ``forward(x, key_padding_mask=None)`` maps x (B, N, E) to (B, N, E): Q, K, V are Linear
    maps of x split into ``num_heads`` heads of D = E / H channels; the dynamic projection
    logits are a Linear map of x to H * r channels, head-major (head h owns channels
    h*r .. h*r + r - 1); each query attends, under one softmax, to its local window
    (``window``) and to the r projected keys and values of the whole sequence
    (bidirectional) or of every chunk of ``chunk`` positions before its own (causal);
    the heads are merged and mapped by the output Linear. The README ("What it computes")
    states the exact windows, chunks and padding rules.

    Args:
        embed_dim: E, the model dim; divisible by ``num_heads``.
        num_heads: H.
        window: w >= 0, local segment size (bidirectional: query t sees the keys of its
            segment floor(t / w) widened by max(w // 2, 1) on each side) or band width
            (causal: keys t - w + 1 .. t); 0 = projection only.
        rank: r >= 0, projected keys per sequence (bidirectional) or per chunk (causal);
            0 = window only. ``window`` and ``rank`` cannot both be 0.
        causal: autoregressive (True) or bidirectional (False).
        chunk: l >= 1, causal only: the positions projected together.
        dual_ln: where DualLN normalises (the paper's LN_L for the window keys and values,
            LN_G for the projected ones):

            - ``"head"``: per-head LayerNorms over each head's D channels, weights (H, D),
              fused into the Triton kernels (``ls_attention(ln_local=..., ln_global=...)``).
            - ``"model"``: LayerNorm(E) on the keys and values before the head split and on
              the merged projected keys and values, as the official code does; the layer
              composes ``dynamic_projection`` and ``ls_attention_projected`` for that
              (see ``ls_kernels.api``), still with the fused attention kernels.
            - ``None``: no normalisation.
        project_after_ln: what the dynamic projection reads: the LN_L-normalised keys and
            values (True) or the raw ones (False). None = the official default for the
            mode: True bidirectional (LRA, vision), False causal (autoregressive).
        dropout: dropout probability on the attention probabilities, in training mode. NOT
            in the fused Triton kernels: dropout > 0 needs the blocked PyTorch path
            (``backend="torch"``, or CPU tensors with ``"auto"``); ``backend="triton"``
            with dropout > 0 raises ValueError here, and a training-mode forward with
            dropout > 0 that would run the kernels (``"auto"`` on CUDA) raises
            ValueError. In eval mode dropout is off and every backend works.
        bias: whether the Linear maps have biases.
        backend: "auto" (Triton kernels for CUDA tensors with D <= 128, else the blocked
            PyTorch path), "triton" or "torch"; as ``ls_attention``.
        process_group: a torch.distributed group (e.g. ``torch.distributed.group.WORLD``) over
            which each sequence is split (context parallelism, ``ls_kernels.distributed``):
            each rank's ``forward`` gets its contiguous shard x (B, n_rank, E), in rank order,
            and returns the rows a forward over the whole sequence gives; parameter gradients
            are each shard's part (sum them over the ranks, as data parallelism does). None:
            every call holds whole sequences.

    ``key_padding_mask`` (B, N) bool, True = padding: padded tokens are never attended
    to and never projected; their output rows are the output Linear's bias (its input
    there is zero).

    Generation (causal layers): ``cache = layer.init_cache(B)``, then ``layer(x, cache=cache)``
    with x (B, T, E) the next T tokens of each sequence (the prompt, then one token per
    step) returns their outputs, the rows a call over each whole sequence gives, and
    updates the cache in place (``ls_decode``; inference only, no gradients). A prefill
    may give ``key_padding_mask`` (B, T) marking right padding (prompts of different
    lengths); padded tokens never enter the cache.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (Linear E -> E),
    ``dproj`` (Linear E -> H * r; None when r = 0), ``ln_local_weight/bias`` and
    ``ln_global_weight/bias`` ((H, D) for ``"head"``, (E,) for ``"model"``; None when
    absent). Autocast: the Linear maps run in the autocast dtype; LayerNorm and softmax
    statistics (and the dynamic projection) are computed in fp32.
    """

    def __init__(self, embed_dim, num_heads, *, window, rank, causal=False, chunk=16, dual_ln="head",
                 project_after_ln=None, dropout=0.0, bias=True, backend="auto", process_group=None):
        super().__init__()
        embed_dim, num_heads, window, rank, chunk = check_layer_args(
            embed_dim, num_heads, window, rank, causal, chunk, dual_ln, project_after_ln, dropout, backend)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.window, self.rank, self.causal, self.chunk = window, rank, causal, chunk
        self.dual_ln = dual_ln
        self.project_after_ln = (not causal) if project_after_ln is None else project_after_ln
        self.dropout = float(dropout)
        self.backend = backend
        self.process_group = process_group

        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dproj = nn.Linear(embed_dim, num_heads * rank, bias=bias) if rank > 0 else None
        shape = {"head": (num_heads, self.head_dim), "model": (embed_dim,), None: None}[dual_ln]
        for side, present in (("ln_local", shape is not None), ("ln_global", shape is not None and rank > 0)):
            self.register_parameter(side + "_weight", nn.Parameter(torch.ones(shape)) if present else None)
            self.register_parameter(side + "_bias", nn.Parameter(torch.zeros(shape)) if present else None)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, rank={self.rank}, "
                f"causal={self.causal}, chunk={self.chunk}, dual_ln={self.dual_ln!r}, "
                f"project_after_ln={self.project_after_ln}, dropout={self.dropout}, backend={self.backend!r}")

    def _ln(self, side):
        w = getattr(self, side + "_weight")
        return None if w is None else (w, getattr(self, side + "_bias"))

    def _ln_model(self, x, side):
        """LayerNorm `side` over the last dim E of x (..., E), statistics in fp32 (fp64 for fp64)."""
        return model_layer_norm(x, self._ln(side), LAYER_LN_EPS)

    def _ln_merged_heads(self, t, side="ln_global"):
        """LayerNorm `side` over the E = H * D channels of each position of t (B, H, G, D)."""
        return merged_heads_layer_norm(t, self._ln(side), LAYER_LN_EPS)

    def init_cache(self, batch_size, *, device=None, dtype=None):
        """An empty decoding cache (``LSCache``) of this causal layer for ``batch_size`` sequences, on the
        layer's device and in its dtype unless given."""
        if not self.causal:
            raise ValueError("init_cache: a bidirectional layer (causal=False) cannot generate; every query "
                             "sees keys after it")
        ref = self.q_proj.weight
        return LSCache.empty(batch_size, self.num_heads, self.head_dim, window=self.window, chunk=self.chunk,
                             rank=self.rank, device=ref.device if device is None else device,
                             dtype=ref.dtype if dtype is None else dtype)

    def forward(self, x, key_padding_mask=None, cache=None):
        """x (B, N, E) -> (B, N, E); key_padding_mask (B, N) bool, True = padding. With ``cache`` (causal
        layers): x holds the next N tokens of each sequence of the cache, which is updated in place."""
        check_layer_input(x, self.embed_dim, self.q_proj.weight)
        if cache is not None:
            return self._decode(x, key_padding_mask, cache)
        if self.process_group is not None:
            return self._sharded(x, key_padding_mask)
        B, N, E = x.shape
        H, D, r = self.num_heads, self.head_dim, self.rank

        def heads(t):  # (B, N, E) -> (B, H, N, D)
            return t.reshape(B, N, H, D).transpose(1, 2)

        q = heads(self.q_proj(x))
        k, v = self.k_proj(x), self.v_proj(x)
        proj = self.dproj(x).reshape(B, N, H, r).transpose(1, 2) if r > 0 else None
        p = self.dropout if self.training else 0.0
        common = dict(window=self.window, causal=self.causal, chunk=self.chunk, key_padding_mask=key_padding_mask,
                      backend=self.backend)

        if self.dual_ln == "model" or p > 0:
            # the pieces of ls_kernels.api: LN_L, projection and LN_G here, then the attention
            if self.dual_ln == "model":
                k_loc, v_loc = heads(self._ln_model(k, "ln_local")), heads(self._ln_model(v, "ln_local"))
            else:  # per head (or none), statistics in fp32
                ln = self._ln("ln_local")
                k_loc, v_loc = (layer_norm(heads(t).to(acc_dtype(t.dtype)), ln, LAYER_LN_EPS) for t in (k, v))
            kg = vg = None
            if r > 0:
                src = (k_loc, v_loc) if self.project_after_ln else (heads(k), heads(v))
                kg, vg = dynamic_projection(proj, *src, causal=self.causal, chunk=self.chunk,
                                            key_padding_mask=key_padding_mask)  # (B, H, G, D)
                if self.dual_ln == "model":  # LN_G over the merged heads of each projected vector
                    kg, vg = self._ln_merged_heads(kg), self._ln_merged_heads(vg)
                else:
                    ln = self._ln("ln_global")
                    kg, vg = layer_norm(kg, ln, LAYER_LN_EPS), layer_norm(vg, ln, LAYER_LN_EPS)
            o = ls_attention_projected(q, k_loc.to(q.dtype), v_loc.to(q.dtype), kg, vg, dropout_p=p, **common)
        else:
            o = ls_attention(q, heads(k), heads(v), proj, ln_local=self._ln("ln_local"),
                             ln_global=self._ln("ln_global"), project_after_ln=self.project_after_ln, **common)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, E))

    def _norms(self):
        """LN_L and LN_G as functions of (B, H, ., D) tensors (statistics in fp32): per head, or model-wide over
        each position's merged heads."""
        sides = ("ln_local", "ln_global")
        if self.dual_ln == "model":  # LayerNorm(E) over each position's merged heads
            return {side: (lambda t, side=side: self._ln_merged_heads(t, side)) for side in sides}
        return {side: (lambda t, side=side: layer_norm(t, self._ln(side), LAYER_LN_EPS)) for side in sides}

    def _heads_and_settings(self, x):
        """(q, k, v (B, H, T, D), proj (B, H, T, r) or None, LSConfig, LN_L and LN_G functions) of x (B, T, E)
        for the paths that normalise through functions (decoding, shards)."""
        B, T, E = x.shape
        H, D, r = self.num_heads, self.head_dim, self.rank
        q, k, v = (f(x).reshape(B, T, H, D).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        proj = self.dproj(x).reshape(B, T, H, r).transpose(1, 2) if r > 0 else None
        cfg = LSConfig(window=self.window, causal=self.causal, chunk=self.chunk, rank=r, scale=default_scale(D),
                       eps=LAYER_LN_EPS, project_after_ln=self.project_after_ln)
        return q, k, v, proj, cfg, self._norms()

    def _merge_heads(self, o):
        """(B, H, T, D) -> the output map of (B, T, E)."""
        B, H, T, D = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, H * D))

    def _sharded(self, x, key_padding_mask):
        """forward of this rank's shard x (B, n, E) of a sequence split across self.process_group
        (``ls_kernels.distributed``): the rows a forward over the whole sequence gives."""
        check_layer_sharded(self.training, self.dropout)
        q, k, v, proj, cfg, norm = self._heads_and_settings(x)
        o = cp_attention(q, k, v, proj, cfg=cfg, norm_local=norm["ln_local"], norm_global=norm["ln_global"],
                         pad=key_padding_mask, group=self.process_group, triton=use_triton(q, self.backend))
        return self._merge_heads(o)

    def _decode(self, x, key_padding_mask, cache):
        """forward with a cache: the new tokens' Q, K, V and logits, LN_L (per head or model-wide) and LN_G
        (per head, or model-wide over each projected vector's merged heads) as in forward, then ls_decode."""
        n_new = check_layer_cache(x, key_padding_mask, cache, causal=self.causal, training=self.training,
                                  dropout=self.dropout)
        q, k, v, proj, cfg, norm = self._heads_and_settings(x)
        check_cache_fits(cache, q, window=self.window, chunk=self.chunk, rank=self.rank)
        o = decode_tokens(q, k, v, proj, cache, cfg=cfg, norm_local=norm["ln_local"], norm_global=norm["ln_global"],
                          n_new=n_new, triton=use_triton(q, self.backend))
        return self._merge_heads(o)

    @classmethod
    def from_official_lra(cls, state_dict, num_heads, window, rank, *, prefix="", backend="auto"):
        """A layer holding the weights of the official Long Range Arena attention.

        ``state_dict`` is that of ``AttentionLS`` in NVIDIA/transformer-ls,
        lra/attention_transformer_ls.py (keys ``W_q``, ``W_k``, ``W_v``, ``W_o``,
        ``dconv_fc``, ``dual_ln_l``, ``dual_ln_s``, each ``.weight``/``.bias``), or of a model
        holding it with ``prefix`` (e.g. ``"transformer_0.mha."``). ``num_heads``,
        ``window``, ``rank`` are the official ``num_head``, ``window_size``,
        ``num_landmarks``; the model dim must equal num_head * head_dim (the official
        layer needs that too). The result is bidirectional, ``dual_ln="model"``,
        ``project_after_ln=True``, dropout 0, in the state dict's dtype and device.

        Equivalence (within fp32 rounding): ``layer(X, key_padding_mask=~mask.bool())``
        equals the official ``AttentionLS.forward(X, mask)`` (mask: 1 = real token)
        for a layer that gets no CLS token (``cls_embed is None`` and pooling_mode not
        "CLS"; with ``--cls_last_layer`` that is every layer but the last), has no
        depthwise conv (``conv_kernel_size <= 0``: a ``conv.weight`` raises here), runs in
        eval mode (or ``attention_dropout`` 0), for sequence lengths N that are a multiple
        of ``window`` (the official code requires it; this layer takes any N), and for
        padding masks that leave every sequence at least one real token (the official
        code gives NaN for a fully padded sequence; this layer gives the output bias).
        Padded query rows: both give the W_o bias. What the official code computes, and
        this layer does: Q = W_q X / sqrt(head_dim); K = LN_L(W_k X), V = LN_L(W_v X)
        with LN_L over the whole model dim, then split into heads; P = softmax over the
        sequence of dconv_fc(X) (padded positions -inf), head-major channels; projected
        Kg = LN_G(merge_heads(P^T K)), Vg likewise (the projection reads the normalised
        K, V; LN_G over the model dim); one softmax over the r projected keys and the
        window keys of segment floor(t / w) widened by e = max(w // 2, 1) on each side.
        """
        expected = {f"{name}.{part}" for name in _OFFICIAL_LRA for part in ("weight", "bias")}
        sd, E = check_official_lra(state_dict, prefix, expected)
        layer = cls(E, num_heads, window=window, rank=rank, causal=False, dual_ln="model", project_after_ln=True,
                    dropout=0.0, bias=True, backend=backend)
        check_official_lra_dconv(sd, num_heads, rank, E)
        ref = sd["W_q.weight"]
        layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for official, ours in _OFFICIAL_LRA.items():
                if ours.startswith("ln_"):
                    if getattr(layer, ours + "_weight") is None:  # rank 0: no LN_G
                        continue
                    getattr(layer, ours + "_weight").copy_(sd[official + ".weight"])
                    getattr(layer, ours + "_bias").copy_(sd[official + ".bias"])
                elif getattr(layer, ours) is not None:
                    getattr(layer, ours).weight.copy_(sd[official + ".weight"])
                    getattr(layer, ours).bias.copy_(sd[official + ".bias"])
        return layer
