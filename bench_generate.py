"""
Generation with the bounded KV cache next to the same model with an unbounded one, on one GPU.

    python bench_generate.py                            # 65536 tokens, bfloat16, on the GPU
    python bench_generate.py --tokens=2000 --device=cpu

The model is the default one (train.py's shape: 6 layers, 6 heads, 384 wide, window 128) with
random weights, decoding greedily (top_k=1) from a short prompt. Peer: the same model whose
caches keep every token (bounded=False). The attention still applies the window, so both compute
the same thing; only the time per token and the memory can differ. Reported for each: tokens/s
over the first and over the last 1k tokens, and the peak GPU memory after 1k and after all.
"""

import sys
import time
from contextlib import nullcontext

import torch

from configurator import apply_overrides
from swat import SWAT, SWATConfig

# -----------------------------------------------------------------------------
tokens = 65536          # tokens generated per run
device = 'cuda' if torch.cuda.is_available() else 'cpu'
apply_overrides(globals(), ['tokens', 'device'], sys.argv[1:])
# -----------------------------------------------------------------------------

if tokens < 1000:
    raise SystemExit(f"tokens={tokens}: generate at least 1000 tokens (the report uses 1k spans)")
cuda = device.startswith('cuda')
if cuda and not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU here; run with --device=cpu")
if not cuda:
    print("note: on the CPU in float32; the GPU memory columns stay empty")
ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()

torch.manual_seed(0)
model = SWAT(SWATConfig()).to(device).eval()      # random weights are fine for timing
prompt = torch.randint(0, 50257, (1, 16), device=device)


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None


def run(bounded, n):
    """Generate n tokens; return the clock and peak memory at the span boundaries {t: (s, MiB)}."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    marks = {}
    with ctx:
        sync()
        marks[0] = (time.perf_counter(), peak_mib())
        for t, _ in enumerate(model.generate_tokens(prompt, n, top_k=1, bounded=bounded), 1):
            if t in (1000, n - 1000, n):          # synchronise here only, not at every token
                sync()
                marks[t] = (time.perf_counter(), peak_mib())
    return marks


run(True, 100)                                  # warm up: kernels, allocator, autocast
print(f"generating {tokens} tokens greedily, window {model.config.window}, "
      f"{model.config.n_layer} layers, on {device}")
print(f"{'cache':<10} {'tok/s first 1k':>15} {'tok/s last 1k':>14} "
      f"{'peak MiB @1k':>13} {f'peak MiB @{tokens}':>17}")
for name, bounded in (('bounded', True), ('unbounded', False)):
    marks = run(bounded, tokens)
    first = 1000 / (marks[1000][0] - marks[0][0])
    last = 1000 / (marks[tokens][0] - marks[tokens - 1000][0])
    memory = [f"{marks[t][1]:.1f}" if cuda else '-' for t in (1000, tokens)]
    print(f"{name:<10} {first:>15.1f} {last:>14.1f} {memory[0]:>13} {memory[1]:>17}")
