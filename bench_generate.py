"""
Generation with the bounded KV cache next to the same model with an unbounded one, on one GPU.

    python bench_generate.py                            # 65536 tokens, bfloat16, on the GPU
    python bench_generate.py --tokens=2000 --device=cpu
    python bench_generate.py --compile=True             # the per-token forward compiled
    python bench_generate.py --cache=bounded            # one of the two runs only

The model is the default one (train.py's shape: 6 layers, 6 heads, 384 wide, window 128) with
random weights, decoding greedily (top_k=1) from a short prompt. Peer: the same model whose
caches keep every token (bounded=False). The attention still applies the window, so both compute
the same thing; only the time per token and the memory can differ. Each run prints, as it goes,
tokens/s over the 1k-token spans that end at 1k, at every multiple of 8k and at the end, with the
peak GPU memory so far; a table of the first and last span closes the report.
"""

import sys
import time
from contextlib import nullcontext

import torch

from configurator import apply_overrides
from swat import SWAT, SWATConfig

# -----------------------------------------------------------------------------
tokens = 65536          # tokens generated per run
cache = 'both'          # 'bounded', 'unbounded' or 'both' (one after the other)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
compile = False         # torch.compile the model's cached forward, as sample.py --compile does
apply_overrides(globals(), ['tokens', 'cache', 'device', 'compile'], sys.argv[1:])
# -----------------------------------------------------------------------------

if tokens < 2000:
    raise SystemExit(f"tokens={tokens}: generate at least 2000 tokens (the report uses 1k spans)")
if cache not in ('bounded', 'unbounded', 'both'):
    raise SystemExit(f"cache={cache!r}: expected 'bounded', 'unbounded' or 'both'")
cuda = device.startswith('cuda')
if cuda and not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU here; run with --device=cpu")
if not cuda:
    print("note: on the CPU in float32; the GPU memory columns stay empty")
ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()
runs = [(name, name == 'bounded') for name in ('bounded', 'unbounded') if cache in (name, 'both')]

torch.manual_seed(0)
model = SWAT(SWATConfig()).to(device).eval()      # random weights are fine for timing
if compile:
    model.forward_cached = torch.compile(model.forward_cached, dynamic=True)
prompt = torch.randint(0, 50257, (1, 16), device=device)


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None


def run(name, bounded, n, report=True):
    """Generate n tokens. Times the 1k-token spans that end at 1k, at every multiple of 8k and
    at n; prints each as it ends. Returns {end: (tokens/s over the span, peak MiB so far)}."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ends = sorted({1000, n, *range(8192, n, 8192)})
    starts = {end - 1000 for end in ends}
    spans = {}
    with ctx:
        sync()
        clock = {0: time.perf_counter()}
        for t, _ in enumerate(model.generate_tokens(prompt, n, top_k=1, bounded=bounded), 1):
            if t in starts or t in ends:          # synchronise here only, not at every token
                sync()
                clock[t] = time.perf_counter()
                if t in ends:
                    spans[t] = (1000 / (clock[t] - clock[t - 1000]), peak_mib())
                    if report:
                        memory = '' if spans[t][1] is None else f", peak {spans[t][1]:.1f} MiB"
                        print(f"  {name}: tokens {t - 999}-{t}: {spans[t][0]:.1f} tokens/s{memory}",
                              flush=True)
    return spans


print(f"generating {tokens} tokens greedily, window {model.config.window}, "
      f"{model.config.n_layer} layers, on {device}{', compiled' if compile else ''}")
for name, bounded in runs:                      # warm up: kernels, allocator, autocast, compile
    run(name, bounded, 2000, report=False)
results = {name: run(name, bounded, tokens) for name, bounded in runs}
print(f"{'cache':<10} {'tok/s first 1k':>15} {'tok/s last 1k':>14} "
      f"{'peak MiB @1k':>13} {f'peak MiB @{tokens}':>17}")
for name, spans in results.items():
    memory = [f"{spans[t][1]:.1f}" if cuda else '-' for t in (1000, tokens)]
    print(f"{name:<10} {spans[1000][0]:>15.1f} {spans[tokens][0]:>14.1f} {memory[0]:>13} "
          f"{memory[1]:>17}")
