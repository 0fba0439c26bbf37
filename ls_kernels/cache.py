"""The decoding cache of causal long-short attention: what one layer keeps of each sequence between calls.

A query at position t sees the window keys t - w + 1 .. t and the projected vectors of the chunks before
floor(t / l). Keys older than the window are never read again, and a finished chunk is read only through its r
projected vectors, so a sequence of t tokens keeps, per head:

- the last w - 1 window keys and values after LN_L (``win_k``, ``win_v``), a ring: position p in slot
  p mod (w - 1);
- the r projected keys and values (after LN_G) of each of its floor(t / l) finished chunks, chunk-major
  (``kg``, ``vg``, grown by doubling);
- the at most l - 1 positions of its unfinished chunk as the projection reads them: keys, values and
  projection logits (``part_k``, ``part_v``, ``part_logits``), position p in slot p mod l;
- its length t (``lengths``).

That is (w - 1 + floor(t / l) r) D values twice plus (l - 1)(2 D + r) accumulation-dtype values per sequence
and head: O(w + t r / l), against O(t) for a full KV cache.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .config import acc_dtype


def rows(x, idx):
    """x (B, H, N, C) gathered along positions by idx (B, M): (B, H, M, C)."""
    B, H, _, C = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], C))


def _put_rows(x, idx, new):
    """x (B, H, N, C) with new (B, H, M, C) written at positions idx (B, M), in place."""
    B, H, M, C = new.shape
    x.scatter_(2, idx[:, None, :, None].expand(B, H, M, C), new.to(x.dtype))


def ring_order(lengths, size):
    """(B, size): the ring slots of positions lengths - size .. lengths - 1, oldest first."""
    return (lengths[:, None] - size + torch.arange(size, device=lengths.device)[None, :]) % size


def _project_chunks(k, v, logits, norm_global):
    """Projected keys and values (B, H, n * r, D) of n chunks: k, v (B, H, n, l, D), logits (B, H, n, l, r)."""
    B, H, n, l, D = k.shape
    P = torch.softmax(logits, dim=3).transpose(-1, -2)  # (B, H, n, r, l): each chunk's softmax over its l rows
    return [norm_global((P @ x).reshape(B, H, -1, D)) for x in (k, v)]


@dataclass
class LSCache:
    """One layer's decoding cache for a batch of sequences (see the module docstring). Made by
    ``LongShortAttention.init_cache`` or ``LSCache.empty``; ``ls_decode`` and the layer update it in place.

    Shapes (B sequences, H heads, D head dim, w window, l chunk, r rank; dtype the model's, acc its
    accumulation dtype): lengths (B,) int64; win_k, win_v (B, H, max(w - 1, 0), D) dtype; kg, vg
    (B, H, capacity * r, D) dtype; part_k, part_v (B, H, l, D) acc; part_logits (B, H, l, r) acc.
    """
    window: int
    chunk: int
    rank: int
    lengths: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    kg: torch.Tensor
    vg: torch.Tensor
    part_k: torch.Tensor
    part_v: torch.Tensor
    part_logits: torch.Tensor

    @classmethod
    def empty(cls, batch_size, num_heads, head_dim, *, window, chunk, rank, device=None, dtype=None,
              capacity=16):
        """An empty cache (every length 0) for ``batch_size`` sequences; room for ``capacity`` finished chunks
        before the first growth."""
        dtype = torch.get_default_dtype() if dtype is None else dtype
        acc = acc_dtype(dtype)
        B, H, D = batch_size, num_heads, head_dim
        new = lambda n, d, t: torch.zeros(B, H, n, d, device=device, dtype=t)  # noqa: E731
        return cls(window=window, chunk=chunk, rank=rank,
                   lengths=torch.zeros(B, dtype=torch.int64, device=device),
                   win_k=new(max(window - 1, 0), D, dtype), win_v=new(max(window - 1, 0), D, dtype),
                   kg=new(capacity * rank, D, dtype), vg=new(capacity * rank, D, dtype),
                   part_k=new(chunk, D, acc), part_v=new(chunk, D, acc), part_logits=new(chunk, rank, acc))

    @property
    def batch_size(self):
        return self.lengths.shape[0]

    @property
    def num_heads(self):
        return self.win_k.shape[1]

    @property
    def head_dim(self):
        return self.win_k.shape[3]

    @property
    def dtype(self):
        return self.win_k.dtype

    @property
    def device(self):
        return self.win_k.device

    def reserve(self, n_chunks):
        """Make room for n_chunks finished chunks per sequence (capacity doubled as needed)."""
        need = n_chunks * self.rank
        have = self.kg.shape[2]
        if need <= have:
            return
        new_cap = max(need, 2 * have)
        grow = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], new_cap - have, x.shape[3])], dim=2)  # noqa
        self.kg, self.vg = grow(self.kg), grow(self.vg)

    def advance_projection(self, k_src, v_src, logits, n_new, *, norm_global):
        """Append the projected vectors of the chunks that new rows finish, and keep the rows of the chunk left
        unfinished. k_src, v_src (B, H, T, D) and logits (B, H, T, r), accumulation dtype: what the projection
        reads of the next T positions (rows n_new (B,) and after are padding, never used). norm_global: LN_G
        of projected vectors (B, H, G, D) -> same. Lengths are not advanced here (``advance``).

        Chunk c of a sequence lands at rows c r .. c r + r - 1 of kg, vg; rows past a sequence's finished
        chunks may be written with unfinished sums (never visible: a query sees only finished chunks)."""
        l, r = self.chunk, self.rank
        B, H, T, D = k_src.shape
        L = self.lengths
        parts = (self.part_k, self.part_v, self.part_logits)
        if T == 1:  # one row into slot L mod l; a chunk finishes where that slot is the last
            slot = (L % l)[:, None]
            for part, x in zip(parts, (k_src, v_src, logits)):
                _put_rows(part, slot, x)
            if bool(((L + n_new) % l == 0).logical_and(n_new > 0).any()):
                self.reserve(int((L // l).max()) + 1)
                kg, vg = _project_chunks(*(p.unsqueeze(2) for p in parts), norm_global)
                target = (L // l * r)[:, None] + torch.arange(r, device=L.device)[None, :]
                _put_rows(self.kg, target, kg)
                _put_rows(self.vg, target, vg)
            return
        a = L % l  # rows of each sequence's unfinished chunk, in slots 0 .. a - 1 (its start is a slot 0)
        n_done = (a + n_new) // l  # chunks finished by these rows
        both = [torch.cat([p, x], 2) for p, x in zip(parts, (k_src, v_src, logits))]
        m = torch.arange(((l - 1 + T) // l + 1) * l, device=L.device)[None, :]  # logical rows from the chunk start
        idx = torch.where(m < a[:, None], m, l + m - a[:, None]).clamp(max=l + T - 1)  # into cat(part, new)
        max_done = int(n_done.max()) if B > 0 else 0
        if max_done > 0:
            self.reserve(int((L // l).max()) + max_done)
            chunks = [rows(x, idx[:, :max_done * l]).reshape(B, H, max_done, l, x.shape[3]) for x in both]
            kg, vg = _project_chunks(*chunks, norm_global)
            target = (L // l * r)[:, None] + torch.arange(max_done * r, device=L.device)[None, :]
            _put_rows(self.kg, target, kg)
            _put_rows(self.vg, target, vg)
        rem = a + n_new - n_done * l  # rows of the new unfinished chunk, < l
        left = idx.gather(1, (n_done * l)[:, None] + torch.arange(l, device=L.device)[None, :])
        keep = (torch.arange(l, device=L.device)[None, :] < rem[:, None])[:, None, :, None]
        for part, x in zip(parts, both):
            part.copy_(torch.where(keep, rows(x, left), 0.0))

    def advance(self, k_new, v_new, n_new):
        """Put the new window keys and values k_new, v_new (B, H, T, D) (LN_L applied; rows n_new (B,) and after
        are padding) into the ring, positions lengths .. lengths + n_new - 1, and advance the lengths."""
        W1 = self.win_k.shape[2]
        L, T = self.lengths, k_new.shape[2]
        if W1 > 0:
            n_keep = min(T, W1)  # the last W1 new rows at most, at distinct slots
            first = (n_new - n_keep).clamp(min=0)[:, None] + torch.arange(n_keep, device=L.device)[None, :]
            slots = (L[:, None] + first) % W1
            padding = (first >= n_new[:, None])[:, None, :, None]  # those slots are rewritten as they are
            src = first.clamp(max=T - 1)
            _put_rows(self.win_k, slots, torch.where(padding, rows(self.win_k, slots), rows(k_new, src)))
            _put_rows(self.win_v, slots, torch.where(padding, rows(self.win_v, slots), rows(v_new, src)))
        self.lengths += n_new

    def nbytes(self):
        """Bytes of its sequences' current contents (the formula of the module docstring, summed over the
        batch)."""
        H, D = self.num_heads, self.head_dim
        es, acc_es = self.win_k.element_size(), self.part_k.element_size()
        chunks = int((self.lengths // self.chunk).sum())
        per_seq = (2 * max(self.window - 1, 0) * D * es + 2 * (self.chunk - 1) * D * acc_es
                   + (self.chunk - 1) * self.rank * acc_es) * H + 8
        return self.batch_size * per_seq + 2 * chunks * self.rank * D * es * H


def full_kv_cache_nbytes(lengths, num_heads, head_dim, dtype):
    """Bytes of a full KV cache (every key and value of every position) for sequences of these lengths."""
    return 2 * int(sum(lengths)) * num_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def right_padding_lengths(key_padding_mask: Optional[torch.Tensor], batch_size, T, device):
    """(B,) int64: the real tokens of each row of a right-padded mask (B, T) (True = padding), T without one."""
    if key_padding_mask is None:
        return torch.full((batch_size,), T, dtype=torch.int64, device=device)
    return (~key_padding_mask).sum(1)
