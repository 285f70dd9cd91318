"""Greedy decoding of a small sequence-to-sequence Transformer in plain NumPy + fastattn.

    python examples/greedy_decode.py [--check] [--threads N] [--steps N]

The pieces of a translation-style model, none of them from a deep-learning framework:
token embeddings (scaled by sqrt(d_model)), sinusoidal positions, ``fastattn.Transformer``
(encoder + decoder), an output projection to vocabulary scores, and the decoder's KV cache,
so that each step runs the decoder on one new position only.  The weights are random (load
trained ones with ``model.load_state_dict`` / ``Transformer.from_torch``), so the tokens mean
nothing; what the example shows is the data flow.  Sources of different lengths are padded on
the right and described by ``key_lengths`` / ``memory_key_lengths``.

``--check`` also decodes without the cache (re-running the decoder on the whole prefix at each
step, as ``torch.nn.TransformerDecoder`` users do) and checks that both give the same tokens.
"""
import argparse
import time

import numpy as np

import fastattn

PAD, BOS, EOS = 0, 1, 2


def sinusoidal_positions(length, dim):
    """PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(...) (Vaswani et al.)."""
    pos = np.arange(length)[:, None]
    freq = np.power(10000.0, -np.arange(0, dim, 2) / dim)[None, :]
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return pe


class Seq2Seq:
    def __init__(self, vocab_size=64, d_model=64, num_heads=4, num_layers=2, dim_feedforward=128,
                 max_positions=256, seed=0):
        rng = np.random.default_rng(seed)
        self.d_model = d_model
        self.embedding = (rng.standard_normal((vocab_size, d_model)) / np.sqrt(d_model)).astype(
            np.float32)                                                   # (V, E)
        self.positions = sinusoidal_positions(max_positions, d_model)    # (P, E)
        self.model = fastattn.Transformer(d_model, num_heads, num_layers, num_layers,
                                          dim_feedforward, seed=seed)
        self.out_weight = rng.standard_normal((vocab_size, d_model)).astype(np.float32)  # (V, E)
        self.out_bias = np.zeros(vocab_size, np.float32)

    def embed(self, tokens, start=0):
        """(B, L) token ids at positions start.. -> (B, L, E)."""
        L = tokens.shape[1]
        return self.embedding[tokens] * np.sqrt(self.d_model) + self.positions[start:start + L]

    def logits(self, y):
        """(B, E) decoder states -> (B, V) scores."""
        return fastattn.linear(y, self.out_weight, self.out_bias)

    def encode(self, src, src_lengths):
        return self.model.encode(self.embed(src), key_lengths=src_lengths)    # (B, S, E)

    def greedy(self, src, src_lengths, max_length):
        """Decode with the KV cache: one new position per step."""
        memory = self.encode(src, src_lengths)
        cache = self.model.new_cache(memory, max_length, memory_key_lengths=src_lengths)
        B = src.shape[0]
        tokens = np.full((B, 1), BOS, np.int64)
        done = np.zeros(B, bool)
        for step in range(max_length):
            x = self.embed(tokens[:, -1:], start=step)                    # (B, 1, E)
            y = self.model.decode(x, memory, cache=cache)                 # (B, 1, E)
            nxt = np.where(done, PAD, self.logits(y[:, -1]).argmax(-1))
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            done |= nxt == EOS
            if done.all():
                break
        return tokens[:, 1:]

    def greedy_uncached(self, src, src_lengths, max_length):
        """The same decoding, re-running the decoder on the whole prefix at each step."""
        memory = self.encode(src, src_lengths)
        B = src.shape[0]
        tokens = np.full((B, 1), BOS, np.int64)
        done = np.zeros(B, bool)
        for _ in range(max_length):
            y = self.model.decode(self.embed(tokens), memory, memory_key_lengths=src_lengths)
            nxt = np.where(done, PAD, self.logits(y[:, -1]).argmax(-1))
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            done |= nxt == EOS
            if done.all():
                break
        return tokens[:, 1:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="also decode without the cache and compare")
    ap.add_argument("--threads", type=int, default=None,
                    help="fastattn's thread count (default: all usable cores)")
    ap.add_argument("--steps", type=int, default=24, help="tokens to decode at most")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        try:
            fastattn.set_num_threads(args.threads)
        except ValueError as exc:
            ap.error(f"--threads: {exc}")

    model = Seq2Seq()
    rng = np.random.default_rng(1)
    src_lengths = np.array([12, 7, 9, 3])
    src = rng.integers(3, 64, size=(4, 12))
    src[np.arange(12)[None, :] >= src_lengths[:, None]] = PAD            # right padding

    t = time.perf_counter()
    out = model.greedy(src, src_lengths, args.steps)
    t_cached = time.perf_counter() - t
    for b in range(len(src)):
        print(f"source {src[b, :src_lengths[b]].tolist()}\n  -> {out[b].tolist()}")
    print(f"greedy decoding with the cache: {t_cached * 1e3:.1f} ms for {out.shape[1]} steps")

    if args.check:
        t = time.perf_counter()
        ref = model.greedy_uncached(src, src_lengths, args.steps)
        t_full = time.perf_counter() - t
        print(f"without the cache: {t_full * 1e3:.1f} ms")
        if not np.array_equal(out, ref):
            raise SystemExit("cached and uncached decoding DISAGREE")
        print("cached and uncached decoding agree")


if __name__ == "__main__":
    main()
