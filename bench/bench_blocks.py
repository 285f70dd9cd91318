"""Benchmarks of fastattn's transformer blocks against torch.nn, same weights, same process.

    python bench/bench_blocks.py [--threads 1,2] [--repeats 7] [--decode-repeats 3]
                                 [--markdown bench/RESULTS.md]

At each thread count (fastattn.set_num_threads and torch.set_num_threads both set to it):

1. BERT-base encoder layer (E=768, H=12, F=3072, gelu, B=8, L=128): fastattn.EncoderLayer
   against torch.nn.TransformerEncoderLayer in eval mode (inference_mode).  Target: torch's
   time / fastattn's time >= 1.
2. A 6-layer BERT-base fastattn.Encoder against one layer.  Target: 6-layer time / 1-layer
   time <= 6.3 (layers back to back do not collide).
3. Greedy decoding, 32 steps, of a 6-layer decoder (E=512, H=8, F=2048, relu, batch 4, memory
   length 64, vocabulary 1000 with an embedding, sinusoidal positions and an output
   projection): fastattn.Decoder with its KV cache against torch.nn.TransformerDecoder
   recomputing the whole prefix at each step.  Target: torch's time / fastattn's >= 20.
   Each cached step must read every weight it multiplies by (all of the decoder's but the
   cross-attention K/V projections, used once by new_cache, plus the output projection), so
   the decode can take no less than steps x those bytes / the machine's read bandwidth
   (fastattn.bench.memory_bandwidth, measured in the same run): that floor, and the speedup
   it would allow, are reported beside the measured times.

Timings are interleaved (fastattn, torch, fastattn, torch, ..., the order rotating each round)
and the medians reported, because the machine is shared: only ratios measured in the same run
mean anything.
"""
import argparse
import math
import statistics
import sys
import time

import numpy as np

import fastattn
from fastattn.bench import (BLOCKS_SECTION, _check_output, _positive_arg, _threads_arg,
                            command_line)

TARGETS = {"encoder_layer": 1.0, "stack": 6.3, "decode": 20.0}


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns, repeats, warmup=1):
    """Median seconds of each of fns, run in turn `repeats` times after `warmup` rounds; the
    order rotates each round, so no function always runs right after the same other one."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    n = len(fns)
    for r in range(repeats):
        for i in list(range(r % n, n)) + list(range(r % n)):
            times[i].append(_time(fns[i]))
    return [statistics.median(ts) for ts in times], times


def sinusoidal(length, dim):
    pos = np.arange(length)[:, None]
    i = np.arange(0, dim, 2)[None, :]
    angle = pos / np.power(10000.0, i / dim)
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


def bench_encoder(torch, repeats):
    E, H, F, B, L = 768, 12, 3072, 8, 128
    torch.manual_seed(0)
    tl = torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation="gelu",
                                          batch_first=True).eval()
    layer = fastattn.EncoderLayer.from_torch(tl)
    stack = fastattn.Encoder([fastattn.EncoderLayer.from_torch(tl) for _ in range(6)])
    x = np.random.default_rng(0).standard_normal((B, L, E)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        err = float(np.abs(layer(x) - tl(xt).numpy()).max())
        (t_fa, t_torch, t_stack), _ = interleaved(
            [lambda: layer(x), lambda: tl(xt), lambda: stack(x)], repeats)
    return {"fastattn_layer_ms": t_fa * 1e3, "torch_layer_ms": t_torch * 1e3,
            "fastattn_6layer_ms": t_stack * 1e3, "encoder_layer_ratio": t_torch / t_fa,
            "stack_ratio": t_stack / t_fa, "max_abs_err": err}


def step_weight_bytes(dec, w_out):
    """Bytes of the weights one cached decoding step multiplies by."""
    total = w_out.nbytes
    for name, w in dec.state_dict().items():
        if ".multihead_attn.in_proj_" in name:
            rows = w.shape[0] // 3                        # q rows per step; k, v rows only once
            total += w[:rows].nbytes
        elif "k_proj" not in name and "v_proj" not in name:
            total += np.asarray(w).nbytes
    return total


def bench_decode(torch, repeats, steps=32):
    E, H, F, NL, B, S, V = 512, 8, 2048, 6, 4, 64, 1000
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(E, H, F, dropout=0.0, batch_first=True)
    tdec = torch.nn.TransformerDecoder(layer, NL).eval()
    dec = fastattn.Decoder.from_torch(tdec)
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((V, E)) * 0.5).astype(np.float32)
    w_out = (rng.standard_normal((V, E)) / math.sqrt(E)).astype(np.float32)
    b_out = np.zeros(V, np.float32)
    pe = sinusoidal(steps + 1, E)
    memory = rng.standard_normal((B, S, E)).astype(np.float32)
    emb_t, w_out_t, b_out_t = map(torch.from_numpy, (emb, w_out, b_out))
    pe_t, mem_t = torch.from_numpy(pe), torch.from_numpy(memory)

    def run_fastattn():
        tokens = np.zeros((B, 1), np.int64)
        cache = dec.new_cache(memory, steps)
        for t in range(steps):
            x = emb[tokens[:, -1:]] + pe[t]                               # (B, 1, E)
            y = dec(x, cache=cache)                                       # (B, 1, E)
            logits = fastattn.linear(y[:, -1], w_out, b_out)              # (B, V)
            tokens = np.concatenate([tokens, logits.argmax(-1)[:, None]], 1)
        return tokens

    def run_torch():
        tokens = torch.zeros((B, 1), dtype=torch.long)
        for t in range(steps):
            x = emb_t[tokens] + pe_t[: t + 1]                             # (B, t+1, E)
            mask = torch.nn.Transformer.generate_square_subsequent_mask(t + 1)
            y = tdec(x, mem_t, tgt_mask=mask, tgt_is_causal=True)
            logits = torch.nn.functional.linear(y[:, -1], w_out_t, b_out_t)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
        return tokens.numpy()

    with torch.inference_mode():
        same = bool((run_fastattn() == run_torch()).all())
        (t_fa, t_torch), _ = interleaved([run_fastattn, run_torch], repeats, warmup=0)
    from fastattn.bench import memory_bandwidth
    nt = fastattn.get_num_threads()
    gbs = memory_bandwidth([nt], mbytes=512)[nt]["gbs"]
    floor = steps * step_weight_bytes(dec, w_out) / (gbs * 1e9)
    return {"fastattn_decode_ms": t_fa * 1e3, "torch_decode_ms": t_torch * 1e3,
            "decode_speedup": t_torch / t_fa, "tokens_match": same,
            "read_gbs": gbs, "weights_mb_per_step": step_weight_bytes(dec, w_out) / 1e6,
            "floor_ms": floor * 1e3, "floor_speedup": t_torch / floor}


def write_markdown(path, table, missed, command, decoded=True):
    """Replace (or append) the blocks section of the results file."""
    import datetime
    import os
    text = open(path).read() if os.path.exists(path) else ""
    if BLOCKS_SECTION in text:
        text = text[:text.index(BLOCKS_SECTION)].rstrip() + "\n"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    verdict = (f"Targets missed: {'; '.join(missed)}." if missed else
               "All targets met." if decoded else
               "The targets measured were met; the decode target was not measured "
               "(--skip-decode).")
    text += f"""
{BLOCKS_SECTION}

```
{command}
```

Run of {when}, on the same machine; fastattn and torch.nn with the same weights in one
process, interleaved, medians. Encoder layer: BERT-base (E=768, H=12, F=3072, gelu, B=8,
L=128) against `torch.nn.TransformerEncoderLayer` in eval mode. Decode: 32 greedy steps of a
6-layer decoder (E=512, H=8, F=2048, batch 4, memory length 64), fastattn with the KV cache
against `torch.nn.TransformerDecoder` recomputing the prefix each step. The floor is the time
to read, once per step, every weight a cached step multiplies by (decoder and output
projection, 90 MB of float32: nearly three times the 32 MB L3, so they come from memory at
every step) at the read bandwidth measured in this run; the last column is the speedup a
decode that did nothing but read its weights would reach.

""" + "\n".join(table) + "\n\n" + verdict + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=_threads_arg, default=(1, 2),
                    help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--repeats", type=_positive_arg, default=7)
    ap.add_argument("--decode-repeats", type=_positive_arg, default=3)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--markdown", metavar="PATH",
                    help="write the table into this Markdown file (bench/RESULTS.md), replacing "
                         "its blocks section")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.markdown == "-":
        ap.error("--markdown: give a file path")
    _check_output(ap, args.markdown, "--markdown")      # before minutes of work, not after
    try:
        import torch
    except ImportError as exc:
        ap.error(f"torch is needed (the blocks are timed against torch.nn): {exc}")

    threads = args.threads
    rows = []
    for nt in threads:
        fastattn.set_num_threads(nt)
        torch.set_num_threads(nt)
        r = {"threads": nt}
        r.update(bench_encoder(torch, args.repeats))
        if not args.skip_decode:
            r.update(bench_decode(torch, args.decode_repeats))
        rows.append(r)
        print(f"threads={nt}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                             f"{k}={v}" for k, v in r.items() if k != "threads"),
              flush=True)

    lines = ["| threads | encoder layer fastattn / torch (ms) | torch÷fastattn (≥1) "
             "| 6-layer / 1-layer (≤6.3) | decode fastattn / torch (ms) | speedup (≥20) "
             "| decode floor: weights at the read bandwidth | speedup at the floor |",
             "|---|---|---|---|---|---|---|---|"]
    missed = []
    for r in rows:
        n = r["threads"]
        dec = ("n/a",) * 4
        if "decode_speedup" in r:
            dec = (f"{r['fastattn_decode_ms']:.1f} / {r['torch_decode_ms']:.1f}",
                   f"{r['decode_speedup']:.1f}×" + ("" if r["tokens_match"] else " (tokens differ)"),
                   f"{r['floor_ms']:.0f} ms ({r['weights_mb_per_step']:.0f} MB/step at "
                   f"{r['read_gbs']:.1f} GB/s)", f"{r['floor_speedup']:.1f}×")
            if r["decode_speedup"] < TARGETS["decode"]:
                missed.append(f"decode at {n}T ({r['decode_speedup']:.1f}x < 20)")
        if r["encoder_layer_ratio"] < TARGETS["encoder_layer"]:
            missed.append(f"encoder layer at {n}T ({r['encoder_layer_ratio']:.3f} < 1)")
        if r["stack_ratio"] > TARGETS["stack"]:
            missed.append(f"6-layer stack at {n}T ({r['stack_ratio']:.3f} > 6.3)")
        lines.append(f"| {r['threads']} | {r['fastattn_layer_ms']:.1f} / {r['torch_layer_ms']:.1f} "
                     f"| {r['encoder_layer_ratio']:.3f} | {r['stack_ratio']:.3f} | {dec[0]} "
                     f"| {dec[1]} | {dec[2]} | {dec[3]} |")
    print()
    print("\n".join(lines))
    if args.markdown:
        write_markdown(args.markdown, lines, missed,
                       command_line(argv, "python bench/bench_blocks.py"),
                       decoded=not args.skip_decode)
    print(("\nall targets met" if not missed else "\ntargets missed: " + "; ".join(missed))
          + ("" if not args.skip_decode else " (the decode target not measured: --skip-decode)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
