"""
Generation speed and memory of SWAT's ring KV cache, next to its peers, on one GPU.

    python bench_generate.py                                   # the table, bfloat16
    python bench_generate.py --long_tokens=1000000             # + latency at token 1,000,000
    python bench_generate.py --device=cpu --dtype=float32 --batch_sizes=1 --tokens=256 --span=64

The model is the default one (train.py's shape: 6 layers, 6 heads, 384 wide, window 128) with
random weights, sampling (temperature 1, top_k 200) after a 16-token prompt. For each batch size
and method it generates `tokens` tokens per row after a warm-up and reports the median tokens/s
over spans of `span` tokens, and the median and 99th-percentile latency of single tokens:

- graph:     SWAT.generate_tokens as sample.py runs it: the ring cache, one CUDA graph a token;
- compiled:  the same with compile=True: the decode step compiled (fused), then recorded;
- eager:     the same code with cuda_graph=False (every kernel launched from Python);
- unbounded: the peer, a cache that keeps every token (torch.cat at every step, keys rotated
             at their absolute positions, the window applied by a mask): what a KV cache without
             SWAT's bound does. It lives here, not in the model: only this benchmark needs it.

--profile=True also prints, for the first batch size and each method but `unbounded`, the
kernels of one decode step (operators on a CPU) from torch.profiler over 20 steps: how many a
step, and the time of each, longest first.

--long_tokens=N also runs the fastest path (compiled on a GPU, graph elsewhere) at batch 1 for N
tokens and compares the latency of the 1,000 tokens around token 1,000 with that of 1,000 tokens
near token N, and the peak memory at both.

--token_linear_rows=N: decode steps of at most N rows (on a GPU) run each linear layer of a
block as token_linear's one kernel, as the model does for up to kernel.TOKEN_LINEAR_ROWS; 0
never (the modules: the norms, cuBLAS's matmuls, GELU and the adds), to time the one against
the other.
"""

import statistics
import time

import torch
import torch.nn.functional as F

import kernel
from configurator import apply_overrides
from runtime import DTYPES, check_device, synchronize
from swat import SWAT, SWATConfig, apply_rope, sample

# -----------------------------------------------------------------------------
batch_sizes = '1,8,64'  # rows generated together, comma-separated
methods = ('graph,compiled,eager,unbounded' if torch.cuda.is_available()
           else 'graph,eager,unbounded')  # the ways of generating to time, comma-separated
tokens = 2048           # tokens per row for each measurement, after a warm-up of 64
span = 256              # tokens/s is measured over spans of this many tokens
long_tokens = 0         # > 0: latency at token 1,000 against token long_tokens (batch 1)
profile = False         # also where one decode step's time goes, kernel by kernel (the profiler)
token_linear_rows = kernel.TOKEN_LINEAR_ROWS  # up to this many rows token_linear's kernel; 0: never
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # of the weights and the cache
config_keys = ['batch_sizes', 'methods', 'tokens', 'span', 'long_tokens', 'profile',
               'token_linear_rows', 'device', 'dtype']
# -----------------------------------------------------------------------------
METHODS = ('graph', 'compiled', 'eager', 'unbounded')
TIMED = 100                 # tokens timed one by one around each point of latency_at
LONG_TIMED = 1000           # ... for the long run: its p99 the 10th slowest, not one host hiccup


def unbounded_tokens(model, prompt, n, temperature=1.0, top_k=200):
    """The peer: yield n tokens (B, 1) from a growing cache that keeps every key and value."""
    cfg = model.config
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    keys, values = [None] * cfg.n_layer, [None] * cfg.n_layer      # (B, H, p + 1, D) each
    cos, sin = model.rope_table(prompt.size(1) + n, prompt.device)

    def step(token, p):                             # read token (B, 1) at position p
        x = model.transformer.wte(token)
        for layer, block in enumerate(model.transformer.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
            q, k, v = (t.view(-1, 1, H, D).transpose(1, 2) for t in (q, k, v))
            q, k = apply_rope(q, cos[p], sin[p]), apply_rope(k, cos[p], sin[p])
            if p > 0:                               # the cache grows by one token a step
                k, v = torch.cat([keys[layer], k], dim=2), torch.cat([values[layer], v], dim=2)
            keys[layer], values[layer] = k, v
            distance = torch.arange(p, -1, -1, device=x.device)
            bias = (attn.slopes.float()[:, None] * distance).masked_fill(distance >= cfg.window,
                                                                         float('-inf'))
            logits = (q @ k.transpose(-2, -1)).float() * D ** -0.5 + bias[:, None, :]
            weights = (torch.sigmoid(logits + attn.logit_bias) if attn.kind == 'sigmoid'
                       else F.softmax(logits, -1))
            y = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(-1, 1, cfg.n_embd)
            x = x + attn.c_proj(y)
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(model.transformer.ln_f(x))[:, -1]

    for p in range(prompt.size(1) - 1):
        step(prompt[:, p:p + 1], p)
    token, p = prompt[:, -1:], prompt.size(1) - 1
    for _ in range(n):
        token = sample(step(token, p), temperature, top_k)
        p += 1
        yield token


def token_stream(model, method, prompt, n):
    if method == 'unbounded':
        return unbounded_tokens(model, prompt, n)
    return model.generate_tokens(prompt, n, temperature=1.0, top_k=200,
                                 cuda_graph=(method != 'eager'), compile=(method == 'compiled'))


def measure(model, method, batch_size, n, latency_at=(), per_point=TIMED):
    """Generate 64 + n tokens per row; return ([tokens/s over each span that holds no timed
    token], {t: latency of token t in ms} for the `per_point` tokens around each t in latency_at,
    {t: peak MiB so far}). Per-token latencies wait for each token; the spans do not (they wait
    only at their ends)."""
    cuda = torch.device(device).type == 'cuda'
    prompt = torch.randint(0, 50257, (batch_size, 16), device=device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rates, latencies, peaks, last = [], {}, {}, None
    timed = {t + d for t in latency_at for d in range(-per_point // 2, per_point // 2)}
    with torch.no_grad():
        for t, _ in enumerate(token_stream(model, method, prompt, 64 + n), -63):
            if t > 0 and (t % span == 0 or t in timed or t - 1 in timed):
                synchronize(device)
                now = time.perf_counter()
                if t % span == 0 and last is not None and t - last[0] == span:
                    rates.append(span * batch_size / (now - last[1]))
                if t - 1 in timed and t in timed:
                    latencies[t] = (now - last[1]) * 1000
                    peaks[t] = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else 0.0
                last = (t, now)
            elif t == 0:
                synchronize(device)
                last = (0, time.perf_counter())
    return rates, latencies, peaks


def step_profile(model, method, batch_size, steps=20):
    """Where a decode step's time goes: [(kernel name, launches a step, µs a step)], longest
    first, from torch.profiler over `steps` steps after 64 of warm-up; on a CPU, the operators'
    own time instead of the kernels'."""
    from torch.profiler import ProfilerActivity
    cuda = torch.device(device).type == 'cuda'
    prompt = torch.randint(0, 50257, (batch_size, 16), device=device)
    with torch.no_grad():
        tokens = iter(token_stream(model, method, prompt, 64 + steps))
        for _ in range(64):
            next(tokens)
        synchronize(device)
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA if cuda else
                                                ProfilerActivity.CPU]) as prof:
            for _ in tokens:
                pass
            synchronize(device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    rows = [(e.key, e.count / steps, (e.self_device_time_total if cuda else e.self_cpu_time_total)
             / steps) for e in prof.key_averages() if e.device_type == kind]
    return sorted((row for row in rows if row[2] > 0), key=lambda row: -row[2])


def format_profile(rows, title, shown=15):
    """The markdown table of step_profile's rows: the longest `shown`, then the others in one."""
    total = sum(us for _, _, us in rows)
    lines = [f"{title}: {sum(n for _, n, _ in rows):.0f} launches, {total:.1f} µs a step", '',
             '| kernel (on a CPU: operator) | a step | µs a step |', '|---|---|---|']
    lines += [f"| `{name[:80]}` | {n:g} | {us:.1f} |" for name, n, us in rows[:shown]]
    if len(rows) > shown:
        rest = rows[shown:]
        lines.append(f"| {len(rest)} others | {sum(n for _, n, _ in rest):g} | "
                     f"{sum(us for _, _, us in rest):.1f} |")
    return '\n'.join(lines)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def check_settings():
    """The batch sizes and the methods, or SystemExit with one line for a setting that cannot
    work: all checked before the model is built."""
    check_device(device)                    # a device that is not here: one line
    if dtype not in DTYPES:
        raise SystemExit(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        sizes = [int(b) for b in batch_sizes.split(',')]
    except ValueError:
        raise SystemExit(f"batch_sizes={batch_sizes!r}: expected comma-separated integers, "
                         f"e.g. 1,8,64") from None
    if min(sizes) < 1:
        raise SystemExit(f"batch_sizes={batch_sizes!r}: every batch size must be 1 or more")
    names = methods.split(',')
    if not set(names) <= set(METHODS):
        raise SystemExit(f"methods={methods!r}: expected some of {', '.join(METHODS)}, "
                         f"comma-separated")
    if span < 1:
        raise SystemExit(f"span={span}: expected 1 or more tokens per measured span")
    # the TIMED tokens in the middle, timed one by one, need a whole span before them
    if tokens < 2 * span + TIMED:
        raise SystemExit(f"tokens={tokens} with span={span}: expected tokens >= 2 * span + "
                         f"{TIMED}, a span before the {TIMED} tokens timed one by one in the "
                         f"middle, e.g. --tokens={2 * span + TIMED}")
    if token_linear_rows < 0:
        raise SystemExit(f"token_linear_rows={token_linear_rows}: expected 0 (the modules at every "
                         f"batch size) or more")
    # the tokens timed around 1,000 and those around long_tokens - LONG_TIMED must not overlap
    if long_tokens and long_tokens < 1000 + 2 * LONG_TIMED:
        raise SystemExit(f"long_tokens={long_tokens}: expected 0 (no long run) or at least "
                         f"{1000 + 2 * LONG_TIMED}, to compare the tokens around 1,000 with later "
                         f"ones")
    return sizes, names


def main(args=None):
    """Measure as the settings say; args: the --key=value overrides (default: sys.argv[1:])."""
    apply_overrides(globals(), config_keys, args)
    sizes, names = check_settings()
    kernel.TOKEN_LINEAR_ROWS = token_linear_rows
    cuda = torch.device(device).type == 'cuda'
    torch.manual_seed(0)
    model = SWAT(SWATConfig()).to(device, DTYPES[dtype]).eval()
    print(f"{torch.cuda.get_device_name() if cuda else device}, torch {torch.__version__}, "
          f"{dtype}; {model.config.n_layer} layers, window {model.config.window}, {tokens} "
          f"tokens per row; token_linear's kernel up to {token_linear_rows} rows")
    print("| batch | method | tokens/s (median) | ms/token p50 | ms/token p99 | peak MiB |")
    print("|---|---|---|---|---|---|")
    for batch_size in sizes:
        for method in names:
            rates, latencies, peaks = measure(model, method, batch_size, tokens,
                                              latency_at=(tokens // 2,))
            ms = list(latencies.values())
            print(f"| {batch_size} | {method} | {statistics.median(rates):,.0f} | "
                  f"{percentile(ms, 0.5):.3f} | {percentile(ms, 0.99):.3f} | "
                  f"{max(peaks.values()):.1f} |", flush=True)
    if profile:
        for method in names:
            if method != 'unbounded':
                print()
                print(format_profile(step_profile(model, method, sizes[0]),
                                     f"one decode step, batch {sizes[0]}, {method}"))
    if long_tokens:
        points = (1000, long_tokens - LONG_TIMED)
        method = 'compiled' if cuda else 'graph'
        _, latencies, peaks = measure(model, method, 1, long_tokens, latency_at=points,
                                      per_point=LONG_TIMED)
        for where in points:
            near = [t for t in latencies if abs(t - where) <= LONG_TIMED // 2]
            ms = [latencies[t] for t in near]
            print(f"{method}, batch 1, the {LONG_TIMED:,} tokens around {where:,}: p50 "
                  f"{percentile(ms, 0.5):.3f} ms, p99 {percentile(ms, 0.99):.3f} ms, peak "
                  f"{max(peaks[t] for t in near):.1f} MiB")


if __name__ == '__main__':
    main()
