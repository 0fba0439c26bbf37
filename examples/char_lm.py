"""A tiny causal character-level language model built from ``LongShortAttention``.

It trains on the text this repository ships (README.md and the package's Python
sources, read from the checkout; ``--text FILE`` to use another file), prints the
loss falling under a progress bar, then samples a few lines with the decoding cache
(``LongShortAttention.init_cache``: per token O(w + t r / l) work, not a recomputation of
the whole prefix). On CPU the default settings train for about 45 seconds; ``--device cuda``
runs the fused Triton kernels.

    python examples/char_lm.py                      # CPU, blocked PyTorch path
    python examples/char_lm.py --device cuda        # GPU, Triton kernels
    python examples/char_lm.py --compile --amp      # torch.compile, bf16 autocast
    python examples/char_lm.py --generate 2000      # sample 2000 characters; tokens per second with and
                                                    # without the cache
"""
import argparse
import glob
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from ls_kernels import LongShortAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_text(path=None):
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "ls_kernels", "*.py")))
    text = "\n".join(open(f, encoding="utf-8").read() for f in files if os.path.exists(f))
    if len(text) < 10_000:
        raise SystemExit(f"found only {len(text)} characters of text under {ROOT}; pass --text FILE")
    return text


def sinusoid(positions, dim):
    """(T, dim) fixed sinusoidal position codes of these positions (any position: generation may run past the
    training length)."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angle = positions[:, None].float() * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class Block(nn.Module):
    def __init__(self, dim, heads, **attn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LongShortAttention(dim, heads, causal=True, **attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, **attn):
        super().__init__()
        self.dim = dim
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, **attn) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def init_caches(self, batch_size):
        return [block.attn.init_cache(batch_size) for block in self.blocks]

    def forward(self, ids, caches=None, start=0):
        """Logits (B, T, vocab) of tokens ids (B, T) at positions start ..; with caches (init_caches), the
        next T tokens of each sequence, the caches updated."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tok(ids) + sinusoid(positions, self.dim).to(self.tok.weight.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        return self.head(self.norm(x))


@torch.no_grad()
def generate(model, prompt_ids, length, *, use_cache=True, temperature=0.8, generator=None, progress=False):
    """prompt_ids (B, P) followed by `length` sampled tokens (temperature 0: greedy), (B, P + length); with the
    decoding cache (prefill, then one token per step) or by recomputing the whole prefix for each token."""
    model.eval()
    ids = prompt_ids
    caches = model.init_caches(ids.shape[0]) if use_cache else None
    steps = tqdm(range(length), desc="generating", unit="tok", disable=not progress)
    for i in steps:
        if use_cache:
            new = ids if i == 0 else ids[:, -1:]
            logits = model(new, caches, start=ids.shape[1] - new.shape[1])[:, -1].float()
        else:
            logits = model(ids)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    model.train()
    return ids


def decode_text(ids, itos):
    return "".join(itos[i] for i in ids.tolist())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (blocked PyTorch path) or cuda (Triton kernels)")
    p.add_argument("--text", help="train on this UTF-8 file instead of the repository's own text")
    p.add_argument("--seconds", type=float, default=45.0, help="training time budget")
    p.add_argument("--steps", type=int, default=2000, help="at most this many steps")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="local window w (keys t - w + 1 .. t)")
    p.add_argument("--chunk", type=int, default=16, help="chunk length l of the causal dynamic projection")
    p.add_argument("--rank", type=int, default=1, help="projected vectors r per chunk")
    p.add_argument("--dual-ln", default="head", choices=["head", "model", "none"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--sample", type=int, default=200, help="characters to sample after training")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also sample N characters with the cache and without it, printing tokens per second")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    text = load_text(args.text)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    print(f"{len(text):,} characters, vocabulary {len(chars)}; training on {device}")

    model = CharLM(len(chars), args.dim, args.heads, args.layers, window=args.window, rank=args.rank,
                   chunk=args.chunk, dual_ln=None if args.dual_ln == "none" else args.dual_ln).to(device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; attention: {model.blocks[0].attn}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step_fn = torch.compile(model, fullgraph=True) if args.compile else model
    g = torch.Generator().manual_seed(args.seed)

    def batch(source):
        starts = torch.randint(0, len(source) - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([source[s:s + args.seq_len + 1] for s in starts.tolist()]).to(device)
        return x[:, :-1], x[:, 1:]

    def loss_of(fn, x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = fn(x)
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def val_loss(n=8):
        model.eval()
        loss = sum(loss_of(model, *batch(val)).item() for _ in range(n)) / n
        model.train()
        return loss

    start_loss = val_loss()
    print(f"validation loss before training: {start_loss:.3f} (uniform guess: {math.log(len(chars)):.3f})")
    t0, smooth = time.time(), None
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / 50)  # short warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_fn, *batch(train))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smooth:.3f}")
        if time.time() - t0 > args.seconds:
            break
    bar.close()
    end_loss = val_loss()
    print(f"validation loss: {start_loss:.3f} -> {end_loss:.3f} after {step + 1} steps in {time.time() - t0:.0f} s")
    prompt = torch.tensor([[stoi.get(c, 0) for c in "def "]], device=device)
    print("sample:\n" + decode_text(generate(model, prompt, args.sample)[0], chars))
    if args.generate:
        for use_cache in (True, False):
            t0 = time.time()
            ids = generate(model, prompt, args.generate, use_cache=use_cache, progress=True)
            rate = args.generate / (time.time() - t0)
            how = "with the cache" if use_cache else "recomputing the prefix"
            print(f"{how}: {rate:,.0f} tokens/s over {args.generate} tokens")
            if use_cache:
                print(decode_text(ids[0], chars))


if __name__ == "__main__":
    main()
