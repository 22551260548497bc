"""
Times swat_attention next to the attention a user would otherwise reach for, on one GPU.

    python bench.py                      # the six shapes, then the length sweep
    python bench.py --sigmoid=exact --sweep_lengths=   # exact sigmoid, six shapes only
    python bench.py --backward_thread=caller   # every backward on the calling thread
    python bench.py --mode=tiles         # each kernel at each of its tile configurations
    python bench.py --mode=train         # training throughput of a GPT-2-small-sized model
    python bench.py --mode=loss          # the output layer and its cross-entropy alone
    python bench.py --mode=loss --loss_rows=8192 --loss_width=384 --loss_chunks=1024,2048,4096,8192
                                         # ... at the default train.py model's shape

The default, --mode=attention, times the six shapes (D, H) = (64, 12), (128, 8) with w = 128,
512, 2048, at B * T = tokens, in three tables:
- launched from Python: forward ms and forward+backward ms, every kernel launched from Python
  as in a training step without a CUDA graph, so the host's time counts wherever the GPU waits
  for it. Forward+backward is the median of `repeats` do_bench medians, shown with their spread
  (min-max): a wide spread is noise, most often from the host.
- inside a CUDA graph: each method's forward+backward recorded once as a CUDA graph and
  replayed, timed the same way: the GPU's time alone, the host's removed for every method
  alike. A method that cannot be recorded says why in its row.
- host µs per call, at the first shape: the CPU time to queue one forward+backward, eager,
  eager with autograd's backward on the calling thread ('backward here': by default it runs on
  the engine's own thread for the GPU), and as one torch.compile'd function, host_calls calls
  timed while the GPU sleeps (torch.cuda._sleep) so that none waits for it, the median of
  `repeats` times; and under swat's eager call, its forward and backward without autograd,
  then their launches alone.
The ratio columns are each method's forward+backward ms over swat's, from the medians: the flex
rows say how much faster swat is than Flex sigmoid and Flex softmax SWA. Then the length sweep:
swat and SDPA, w = sweep_window, at each T of sweep_lengths.

--mode=tiles times each of swat's three kernels (the forward, the dk/dv pass and the dq pass) at
each of its fast configurations (kernel.py's lists: (BLOCK_M, BLOCK_N, num_warps, num_stages)),
at the six shapes: the GPU ms of one launch from the profiler (the median of tile_calls, the L2
cache emptied before each call as do_bench empties it, after 0.2 s of calls that bring the GPU
to the clock it holds under load) and the TFLOP/s of the tile matmuls the kernel runs (2 per
tile in the forward, 4 in dk/dv, 3 in dq), then per shape the fastest of each kernel as
effective forward and backward TFLOP/s (the backward credited 2.5 x forward, as below). To try
other tiles, edit the lists in kernel.py (every kernel has as many).

--mode=train times whole training steps of a 12-layer, 12-head, 768-wide model (train_shape;
forward, backward, fused AdamW, bfloat16 autocast, each block compiled on its own and the step
recorded as a CUDA graph, as train.py runs them on one GPU; --train_compile=model compiles the
whole model as one graph instead, --train_graph=False launches every kernel from Python) at
train_lengths: SWAT with w = train_window next to the same model with softmax and full causal
attention through SDPA (FlashAttention), both on train_tokens tokens per step. It reports
tokens/s (from the median step time) and MFU, which counts only the attended (query, key)
pairs; then, from the profiler, where the GPU time of a step goes (attention, the other
matmuls, the loss with its output layer, the optimizer, the rest) and how long the GPU idles.
The default train.py's model: --train_shape=6,6,384 --train_lengths=512 --train_window=128
--train_tokens=8192.

Peers, all in bfloat16, in the same run:
- flex sigmoid:  FlexAttention computing SWAT exactly: score_mod = logsigmoid(score + s_h (m-n)),
                 a sliding-window block mask, and out * exp(lse) to undo the softmax normaliser.
- flex softmax:  FlexAttention softmax sliding-window attention with the same ALiBi term.
- sdpa causal:   F.scaled_dot_product_attention, full causal attention (FlashAttention).
Times are medians of triton.testing.do_bench (which empties the L2 cache before each run); a
forward+backward is autograd's gradients of q, k and v for a fixed output gradient. Effective
TFLOP/s count only the (query, key) pairs a method attends to: forward 4 * B * H * D * pairs,
backward 2.5 x forward.
"""

import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import kernel
import swat
from configurator import apply_overrides
from kernel import attended_pairs, swat_attention
from swat import SWAT, CUDAGraphStep, SWATConfig, alibi_slopes
from training import prepare_optimizer

# -----------------------------------------------------------------------------
sigmoid = 'fast'        # 'fast' (tanh.approx) or 'exact' (tl.sigmoid) in the kernel
tokens = 32768          # B * T for the six shapes
seq_len = 16384         # T for the six shapes (B = tokens / T)
sweep_window = 512      # the window of the length sweep ...
sweep_lengths = '1024,2048,4096,8192,16384,32768,65536'  # ... at these T; '' for no sweep
repeats = 3             # forward+backward ms and host µs: the median of this many timings,
                        # shown with their spread (min-max), so that the host's noise shows
host_calls = 20         # forward+backward calls timed for the host's µs per call
backward_thread = 'engine'  # where autograd runs each backward, for every method alike: 'engine',
                            # its own thread for the GPU (PyTorch's default), or 'caller', the
                            # thread that asks (torch.autograd.set_multithreading_enabled(False))
mode = 'attention'      # 'attention': the kernel and its peers; 'tiles': each kernel at each of
                        # its configurations; 'train': whole training steps; 'loss': the output
                        # layer and its cross-entropy
tile_calls = 10         # --mode=tiles: launches of each configuration, their median
train_lengths = '4096,16384'  # --mode=train: the sequence lengths, comma-separated
train_window = 512      # --mode=train: SWAT's window
train_tokens = 32768    # tokens per training step: batch size = train_tokens / length
train_compile = 'blocks'  # 'blocks': each block on its own, as train.py; 'model': one graph
train_shape = '12,12,768'  # --mode=train: n_layer,n_head,n_embd (train.py's defaults: 6,6,384)
train_graph = True      # --mode=train: each step recorded as a CUDA graph, as train.py on one GPU
train_profile = True    # --mode=train: where a step's GPU time goes, from the profiler
fused_loss = True       # swat.FUSED_LOSS in --mode=train: the loss's elementwise work compiled
loss_rows = 32768       # rows of the loss in --mode=loss ...
loss_width = 768        # ... and their width C (train.py's default model: 8192 rows of 384)
loss_chunks = '1024,2048,4096'  # chunk sizes of the chunked loss in --mode=loss
SETTINGS = ['sigmoid', 'tokens', 'seq_len', 'sweep_window', 'sweep_lengths', 'repeats',
            'host_calls', 'backward_thread', 'mode', 'tile_calls',
            'train_lengths', 'train_window', 'train_tokens', 'train_compile', 'train_shape',
            'train_graph', 'train_profile', 'fused_loss',
            'loss_rows', 'loss_width', 'loss_chunks']
# -----------------------------------------------------------------------------

compiled_flex = torch.compile(flex_attention, dynamic=False)    # compiles at its first call


def apply_settings(args):
    """Apply --key=value arguments to the settings above; exit with one line on a bad value or
    on a machine without a GPU. Run as a script only, so that importing bench runs nothing."""
    apply_overrides(globals(), SETTINGS, args)
    if mode not in ('attention', 'tiles', 'train', 'loss'):
        raise SystemExit(f"mode={mode!r}: expected 'attention', 'tiles', 'train' or 'loss'")
    if train_compile not in ('blocks', 'model'):
        raise SystemExit(f"train_compile={train_compile!r}: expected 'blocks' or 'model'")
    if backward_thread not in ('engine', 'caller'):
        raise SystemExit(f"backward_thread={backward_thread!r}: expected 'engine' or 'caller'")
    if sigmoid not in ('fast', 'exact'):
        raise SystemExit(f"sigmoid={sigmoid!r}: expected 'fast' or 'exact'")
    for key in ('sweep_lengths', 'train_lengths'):     # ('' runs no sweep, trains nothing)
        value = globals()[key]
        if value and not all(L.isdigit() and int(L) > 0 for L in value.split(',')):
            raise SystemExit(f"{key}={value!r}: expected comma-separated lengths, e.g. 4096,16384")
    if seq_len < 1 or tokens < seq_len or tokens % seq_len:
        raise SystemExit(f"tokens={tokens}, seq_len={seq_len}: expected tokens (B * T) a "
                         f"multiple of seq_len (T) >= 1")
    for T in map(int, filter(None, train_lengths.split(','))):
        if train_tokens % T:
            raise SystemExit(f"train_tokens={train_tokens} must be a multiple of each length in "
                             f"train_lengths ({T})")
    shape = train_shape.split(',')
    if len(shape) != 3 or not all(n.isdigit() and int(n) > 0 for n in shape):
        raise SystemExit(f"train_shape={train_shape!r}: expected n_layer,n_head,n_embd, e.g. "
                         f"12,12,768")
    for key in ('sweep_window', 'train_window'):
        if globals()[key] < 1:
            raise SystemExit(f"{key}={globals()[key]}: expected a window of 1 or more")
    if repeats < 3:
        raise SystemExit(f"repeats={repeats}: expected 3 or more (a median and a spread)")
    for key in ('host_calls', 'tile_calls'):
        if globals()[key] < 1:
            raise SystemExit(f"{key}={globals()[key]}: expected 1 or more")
    for key in ('loss_rows', 'loss_width'):
        if globals()[key] < 1:
            raise SystemExit(f"{key}={globals()[key]}: expected 1 or more")
    if not all(c.isdigit() and int(c) > 0 for c in loss_chunks.split(',')):
        raise SystemExit(f"loss_chunks={loss_chunks!r}: expected comma-separated chunk sizes, "
                         f"e.g. 1024,2048")
    if not torch.cuda.is_available():
        raise SystemExit("bench.py times GPU kernels and needs a CUDA GPU, but torch sees none "
                         "here; on a CPU, python bench_generate.py --device=cpu times generation")


def flex_peers(slopes, window, T):
    """The two FlexAttention peers for this window, as functions of (q, k, v)."""
    window_t = torch.tensor(window, device='cuda')      # a tensor, so one compile serves every w

    def in_window(b, h, m, n):
        return (n <= m) & (m - n < window_t)

    block_mask = create_block_mask(in_window, None, None, T, T, device='cuda')

    def alibi(score, b, h, m, n):
        return score + slopes[h] * (m - n)

    def sigmoid_score(score, b, h, m, n):
        return F.logsigmoid(alibi(score, b, h, m, n))

    def flex_sigmoid(q, k, v):
        out, lse = compiled_flex(q, k, v, score_mod=sigmoid_score, block_mask=block_mask,
                                 return_lse=True)
        return out * lse.exp().unsqueeze(-1).to(out.dtype)

    def flex_softmax(q, k, v):
        return compiled_flex(q, k, v, score_mod=alibi, block_mask=block_mask)

    return flex_sigmoid, flex_softmax


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def swat_method(slopes, window):
    return lambda q, k, v: swat_attention(q, k, v, slopes, window)


def forward_backward(fn, q, k, v, do):
    """The gradients of fn(q, k, v) in q, k and v for the output's gradient do: returned, not
    added into .grad, so that no call has anything to reset."""
    return torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def repeated_ms(fn):
    """`repeats` times of fn(), in ms, each the median of a do_bench."""
    return [triton.testing.do_bench(fn, return_mode='median') for _ in range(repeats)]


def spread(times):
    """(median, min, max) of the repeats' times."""
    return statistics.median(times), min(times), max(times)


def ms_spread(times):
    """The repeats' times as 'median (min-max)', in ms."""
    median, fastest, slowest = spread(times)
    return f"{median:.3f} ({fastest:.3f}-{slowest:.3f})"


def measure(fn, q, k, v):
    """(forward ms, forward+backward ms of each repeat, peak extra MiB of forward+backward)."""
    do = torch.randn_like(q)
    forward_ms = triton.testing.do_bench(lambda: fn(q, k, v), return_mode='median')
    forward_backward_ms = repeated_ms(lambda: forward_backward(fn, q, k, v, do))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(fn, q, k, v, do)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return forward_ms, forward_backward_ms, peak_mib


def random_qkv(B, H, T, D):
    return [torch.randn(B, H, T, D, device='cuda', dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


HEADS = ((64, 12), (128, 8))     # (D, H): the six shapes are these with each of WINDOWS
WINDOWS = (128, 512, 2048)


def six_shapes():
    """For each of the six shapes: w, (q, k, v) and the methods, {name: (fn(q, k, v), the
    window it attends)}, swat first."""
    B, T = tokens // seq_len, seq_len
    for D, H in HEADS:
        slopes = alibi_slopes(H).cuda()
        for w in WINDOWS:
            flex_sigmoid, flex_softmax = flex_peers(slopes, w, T)
            methods = {'swat': (swat_method(slopes, w), w), 'flex sigmoid': (flex_sigmoid, w),
                       'flex softmax': (flex_softmax, w), 'sdpa causal': (sdpa_causal, T)}
            yield w, random_qkv(B, H, T, D), methods


def forward_flops(q, window):
    """The forward's effective FLOPs: 4 * B * H * D * the (query, key) pairs attended."""
    B, H, T, D = q.shape
    return 4 * B * H * D * attended_pairs(T, window)


def vs_swat(ms, swat_ms):
    """The ratio column: ms over swat's ms; '-' where swat has no time."""
    return '-' if swat_ms is None else f"{ms / swat_ms:.2f}x"


SHAPE_HEADER = f"{'D':>4} {'H':>3} {'w':>5} | {'method':<13} | "
LAUNCHED_HEADER = SHAPE_HEADER + (f"{'fwd ms':>7} {'fwd+bwd ms (min-max)':>22} | "
                                  f"{'fwd TF/s':>8} {'f+b TF/s':>8} | {'peak MiB':>8} | "
                                  f"{'f+b vs swat':>11}")


def shape_cells(q, w, name):
    B, H, T, D = q.shape
    return f"{D:>4} {H:>3} {w:>5} | {name:<13} | "


def launched_row(q, w, name, flops, forward_ms, forward_backward_ms, peak_mib, swat_ms):
    """A row of the table of methods launched from Python; the ratio from the medians."""
    median = spread(forward_backward_ms)[0]
    return shape_cells(q, w, name) + (
        f"{forward_ms:7.3f} {ms_spread(forward_backward_ms):>22} | "
        f"{flops / forward_ms / 1e9:8.1f} {3.5 * flops / median / 1e9:8.1f} | "
        f"{peak_mib:8.0f} | {vs_swat(median, swat_ms):>11}")


def print_header(header):
    print(header)
    print('-' * len(header))


def launched_table():
    print(f"launched from Python, kernel by kernel, as a training step without a CUDA graph "
          f"runs them (the host's time shows where the GPU waits for it): forward ms, a do_bench "
          f"median;\nforward+backward ms, the median of {repeats} do_bench medians and their "
          f"spread (min-max); the ratio column from the medians")
    print_header(LAUNCHED_HEADER)
    for w, (q, k, v), methods in six_shapes():
        error = relative_error(methods['swat'][0](q, k, v), methods['flex sigmoid'][0](q, k, v))
        times = {name: measure(fn, q, k, v) for name, (fn, _) in methods.items()}
        swat_ms = spread(times['swat'][1])[0]
        for name, (_, attended) in methods.items():
            print(launched_row(q, w, name, forward_flops(q, attended), *times[name], swat_ms))
        print(f"{'':>14} | swat vs flex sigmoid output: relative error {error:.1e}")
        if w == WINDOWS[-1]:
            print()                     # a blank line after each head size


def recorded_ms(fn, q, k, v):
    """The forward+backward of fn recorded as a CUDA graph: `repeats` times of its replay, in ms,
    each the median of a do_bench. Warmed up, then recorded, on a side stream, as CUDA graphs
    need; the gradients land in the graph's own memory, the same buffers at every replay."""
    do = torch.randn_like(q)
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # puts the stream back even where a failed recording does not
        for _ in range(3):
            forward_backward(fn, q, k, v, do)
        with torch.cuda.graph(graph, stream=side):
            forward_backward(fn, q, k, v, do)   # recorded, not run
    torch.cuda.current_stream().wait_stream(side)
    return repeated_ms(graph.replay)


def first_line(error):
    """The first line of the message of the error that started it: where one error led to
    another (a recording that failed raises again when the graph is closed), the first one."""
    while True:
        earlier = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if earlier is None:
            return (str(error).strip().splitlines() or [type(error).__name__])[0]
        error = earlier


def or_reason(what, measure, *args):
    """measure(*args), or, where it raises, the one line '<what>: <its error's first line>'."""
    try:
        return measure(*args)
    except Exception as error:          # one method's failure is one cell, not the end of the run
        return f"{what}: {first_line(error)}"


GRAPH_HEADER = SHAPE_HEADER + (f"{'fwd+bwd ms (min-max)':>22} | {'f+b TF/s':>8} | "
                               f"{'f+b vs swat':>11}")


def graph_row(q, w, name, flops, result, swat_ms):
    """A row of the CUDA graph table: result is the replay's times, or why the method cannot
    be recorded."""
    if isinstance(result, str):
        return shape_cells(q, w, name) + result
    median = spread(result)[0]
    return shape_cells(q, w, name) + (f"{ms_spread(result):>22} | "
                                      f"{3.5 * flops / median / 1e9:8.1f} | "
                                      f"{vs_swat(median, swat_ms):>11}")


def graph_table():
    print(f"inside a CUDA graph: each method's forward+backward recorded once and replayed, the "
          f"GPU's time alone (no host time for any method); ms, the median of {repeats} do_bench "
          f"medians of the replay\nand their spread (min-max); the ratio column from the medians")
    print_header(GRAPH_HEADER)
    for w, (q, k, v), methods in six_shapes():
        times = {name: or_reason('cannot be recorded', recorded_ms, fn, q, k, v)
                 for name, (fn, _) in methods.items()}
        swat_ms = None if isinstance(times['swat'], str) else spread(times['swat'])[0]
        for name, (_, attended) in methods.items():
            print(graph_row(q, w, name, forward_flops(q, attended), times[name], swat_ms))
        if w == WINDOWS[-1]:
            print()                     # a blank line after each head size


GPU_HZ_AT_MOST = 3e9    # above any GPU's clock: a sleep of s * this many cycles lasts s or more


def host_us(call, *args):
    """The CPU time to queue one call(*args), in µs, `repeats` times: each time host_calls of
    them timed while the GPU sleeps (torch.cuda._sleep), so that no call waits for the GPU; it
    runs them once awake."""
    def queue_calls():
        start = time.perf_counter()
        for _ in range(host_calls):
            call(*args)
        return time.perf_counter() - start

    call(*args)                         # compile, autotune, fill the allocator's cache
    torch.cuda.synchronize()
    start = time.perf_counter()
    queue_calls()
    torch.cuda.synchronize()
    sleep_s = 2 * (time.perf_counter() - start)     # twice the time to queue and run them
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(int(sleep_s * GPU_HZ_AT_MOST))
        woken = torch.cuda.Event()
        woken.record()
        queue_s = queue_calls()
        slept_through = not woken.query()
        torch.cuda.synchronize()
        if not slept_through:
            raise RuntimeError(f"the GPU woke before the {host_calls} calls were queued (a full "
                               f"launch queue?): try a smaller host_calls")
        times.append(queue_s / host_calls * 1e6)
    return times


def swat_without_autograd(slopes, window):
    """The layers under swat's eager call, each as call(q, k, v, do) for the host table, so
    that one row less the next is what a layer costs: the forward and backward that autograd
    calls, with their outputs' allocation and no checks ('no autograd'), then their three
    Triton launches alone, into outputs allocated once ('launches'). Each returns the output
    and the gradients of q, k and v."""
    outputs = {}

    def operators(q, k, v, do):             # what swat_attention's autograd Function calls
        scale = q.shape[-1] ** -0.5
        out = kernel._forward_op(q, k, v, slopes, window, scale, 0.0)
        return out, *kernel._backward_op(do, q, k, v, slopes, window, scale, 0.0)

    def launches(q, k, v, do):
        scale = q.shape[-1] ** -0.5
        out, dq, dk, dv = outputs.setdefault(q.shape, [torch.empty_like(q) for _ in range(4)])
        kernel.swat_forward(q, k, v, slopes, window, scale, 0.0, out)
        return out, *kernel.swat_backward(do, q, k, v, slopes, window, scale, 0.0, dq, dk, dv)

    return {'swat, no autograd': operators, 'swat, launches': launches}


HOST_HEADER = (f"{'method':<17} | {'eager host µs (min-max)':>24} | "
               f"{'backward here (min-max)':>24} | {'compiled host µs (min-max)':>26}")


def host_cell(times):
    """µs as 'median (min-max)' from the repeats; '-' for None; or the reason there are none."""
    if times is None or isinstance(times, str):
        return times or '-'
    median, fastest, slowest = spread(times)
    return f"{median:.1f} ({fastest:.0f}-{slowest:.0f})"


def host_row(name, eager_us, caller_us, compiled_us):
    """A row of the host table: each cell the µs of the repeats, None for none, or why none."""
    return (f"{name:<17} | {host_cell(eager_us):>24} | {host_cell(caller_us):>24} | "
            f"{host_cell(compiled_us):>26}")


def on_calling_thread(call):
    """call, with autograd's backward run on the thread that asks for it. By default a backward
    of CUDA tensors runs on the engine's own thread for that GPU, and handing it there and back
    costs the host a wake-up each way (RESULTS.md, section 1)."""
    def here(*args):
        with torch.autograd.set_multithreading_enabled(False):
            return call(*args)
    return here


def host_table():
    w, (q, k, v), methods = next(six_shapes())
    B, H, T, D = q.shape
    print(f"host µs per call: the CPU time to queue one forward+backward, {host_calls} calls "
          f"timed while the GPU sleeps, so that none waits for it, the median of {repeats} "
          f"times; D = {D}, H = {H}, w = {w}\n"
          f"eager: each method as in the tables above (FlexAttention's call compiled alone, as it "
          f"must be); backward here: the same with autograd's backward on the calling thread, not "
          f"its engine's GPU thread; compiled: its forward+backward in one torch.compile'd "
          f"function; swat's layers below its eager call: without autograd, then its launches "
          f"alone")
    print_header(HOST_HEADER)
    compiled_forward_backward = torch.compile(forward_backward)
    do = torch.randn_like(q)
    for name, (fn, _) in methods.items():
        eager_us = or_reason('failed', host_us, forward_backward, fn, q, k, v, do)
        caller_us = or_reason('failed', host_us, on_calling_thread(forward_backward), fn, q, k,
                              v, do)
        compiled_us = or_reason('failed', host_us, compiled_forward_backward, fn, q, k, v, do)
        print(host_row(name, eager_us, caller_us, compiled_us))
        if name == 'swat':
            slopes = alibi_slopes(H).cuda()
            for layer, call in swat_without_autograd(slopes, w).items():
                print(host_row(layer, or_reason('failed', host_us, call, q, k, v, do), None,
                               None))
    print()


def length_sweep():
    print(f"length sweep, w = {sweep_window}, B = 1, H = 12, D = 64: forward+backward ms "
          f"(medians of {repeats})")
    print(f"{'T':>6} | {'swat':>8} | {'sdpa causal':>11} | {'sdpa / swat':>11}")
    swat = swat_method(alibi_slopes(12).cuda(), sweep_window)
    for T in map(int, sweep_lengths.split(',')):
        q, k, v = random_qkv(1, 12, T, 64)
        swat_ms, sdpa_ms = (spread(measure(fn, q, k, v)[1])[0] for fn in (swat, sdpa_causal))
        print(f"{T:>6} | {swat_ms:8.3f} | {sdpa_ms:11.3f} | {sdpa_ms / swat_ms:10.2f}x")


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bfloat16, B*T = {tokens}, T = {seq_len}, sigmoid = {sigmoid}, "
          f"backward_thread = {backward_thread}\n")
    launched_table()
    graph_table()
    host_table()
    if sweep_lengths:
        length_sweep()


# (launcher, its name in the tables, the tile matmuls it runs per (query block, key block))
TILED_KERNELS = ((kernel._forward, 'forward', 2), (kernel._dkdv, 'dk, dv', 4),
                 (kernel._dq, 'dq', 3))


def kernel_ms(call, settle_s=0.2):
    """{kernel name: the median GPU ms of its launches} over tile_calls calls of call(), from
    the profiler, the L2 cache emptied before each call as do_bench empties it. Calls for
    settle_s seconds come first: under a sustained load an H200 meets its power cap and lowers
    its clock (RESULTS.md, section 1), and do_bench's timings, which run for a while, see that
    clock, not the one an idle GPU starts at."""
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    for _ in range(math.ceil(settle_s / (time.perf_counter() - start))):
        call()
    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(tile_calls):
            cache.zero_()
            call()
        torch.cuda.synchronize()
    durations = {}
    for event in profile.events():      # the kernels themselves: Triton's launches through the
        if event.device_type == torch.autograd.DeviceType.CUDA:     # driver have no parent op
            durations.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e3)
    return {name: statistics.median(times) for name, times in durations.items()}


def tiles():
    B, T = tokens // seq_len, seq_len
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bfloat16, B*T = {tokens}, T = {seq_len}, sigmoid = {sigmoid}\n"
          f"each kernel at each of its fast configurations, (BLOCK_M, BLOCK_N, num_warps, "
          f"num_stages):")
    for launcher, name, _ in TILED_KERNELS:
        print(f"  {name:<7} " + '  '.join(f"{i}: {config}" for i, config in
                                          enumerate(launcher.fast)))
    print(f"GPU ms of one launch (the profiler, the median of {tile_calls}); TF/s: the tile "
          f"matmuls it runs (forward 2, dk/dv 4, dq 3 a tile) over the pairs in the window; "
          f"then per shape the fastest of each, effective TF/s (backward 2.5 x forward)")
    header = (f"{'D':>4} {'H':>3} {'w':>5} | {'kernel':<7} | " +
              ' '.join(f"{f'ms at {i}':>8}" for i in range(kernel.FAST_CONFIGS)) +
              f" | {'fastest':>7} | {'TF/s':>6}")
    print_header(header)
    for D, H in HEADS:
        slopes = alibi_slopes(H).cuda()
        q, k, v, do = (torch.randn(B, H, T, D, device='cuda', dtype=torch.bfloat16)
                       for _ in range(4))
        out, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
        for w in WINDOWS:
            def launch(config):
                kernel.swat_forward(q, k, v, slopes, w, D ** -0.5, 0.0, out, config)
                kernel.swat_backward(do, q, k, v, slopes, w, D ** -0.5, 0.0, dq, dk, dv, config)
            launch(None)                # the autotuner compiles every configuration at once
            times = [kernel_ms(lambda: launch(i)) for i in range(kernel.FAST_CONFIGS)]
            flops = forward_flops(q, w)
            fastest = {}
            for launcher, name, matmuls in TILED_KERNELS:
                ms = [next(t for launched, t in timing.items()
                           if launcher.kernel.__name__ in launched) for timing in times]
                best = ms.index(min(ms))
                fastest[name] = ms[best]
                print(f"{D:>4} {H:>3} {w:>5} | {name:<7} | " +
                      ' '.join(f"{t:8.3f}" for t in ms) +
                      f" | {best:>7} | {matmuls / 2 * flops / ms[best] / 1e9:6.1f}")
            backward_ms = fastest['dk, dv'] + fastest['dq']
            print(f"{'':>14} | the fastest: forward {flops / fastest['forward'] / 1e9:.1f}, "
                  f"backward {2.5 * flops / backward_ms / 1e9:.1f} ({backward_ms:.3f} ms) "
                  f"effective TF/s")


def training_step(config, batch_size):
    """A fresh model's training step, step() (forward, backward, fused AdamW), as train.py runs
    it, and the model. The loss and the optimizer are marked for the profiler (step_split)."""
    model = SWAT(config).cuda()
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cuda')
    prepare_optimizer(optimizer, train_graph, 'cuda')
    if train_compile == 'blocks':
        for block in model.transformer.h:
            block.compile()             # in place: the model itself now runs compiled blocks
        forward = model
    else:
        forward = torch.compile(model)
    x, y = torch.randint(0, 50257, (2, batch_size, config.block_size), device='cuda')

    def step(x, y):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            _, loss = forward(x, y)
        loss.backward()
        with torch.profiler.record_function('optimizer'):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    recorded = CUDAGraphStep(step) if train_graph else step
    return lambda: recorded(x, y), (lambda: step(x, y)), model


def marked(name, function):
    """function, inside a profiler range called name."""
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return function(*args, **kwargs)
    return run


SPLIT = ('attention', 'matmuls', 'loss', 'optimizer', 'rest')
ATTENTION_KERNELS = ('_forward_kernel', '_dkdv_kernel', '_dq_kernel', 'flash', 'fmha',
                     'attention')
MATMUL_KERNELS = ('gemm', 'nvjet', 'cutlass', 'xmma')


def kernel_kind(event, kernel_name):
    """Which part of SPLIT a kernel launched under the profiler event `event` belongs to: the
    attention's kernels (forward and backward) by name; then everything launched inside the
    loss (its matmuls too: the output layer's forward and backward both run there) and the
    optimizer's ranges; the other matmuls by name; the rest (norms, activations, copies...)."""
    name = kernel_name.lower()
    if any(part in name for part in ATTENTION_KERNELS):
        return 'attention'
    while event is not None:
        if event.name in ('loss', 'optimizer'):
            return event.name
        event = event.cpu_parent
    return 'matmuls' if any(part in name for part in MATMUL_KERNELS) else 'rest'


def step_split(step, steps=5):
    """The GPU time of one eager step(), in ms by part (SPLIT), from the profiler. Eager: inside
    a CUDA graph the profiler cannot tell which operation launched a kernel; the kernels are
    the same."""
    unmarked = swat.chunked_cross_entropy       # what SWAT.forward calls for its loss
    swat.chunked_cross_entropy = marked('loss', unmarked)
    try:
        step()
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    finally:
        swat.chunked_cross_entropy = unmarked
    split = dict.fromkeys(SPLIT, 0.0)
    for event in profile.events():
        for launched in event.kernels:
            split[kernel_kind(event, launched.name)] += launched.duration / steps / 1e3
    return split


def training_throughput():
    n_layer, n_head, n_embd = map(int, train_shape.split(','))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
          f"\ntraining steps of a {n_layer}-layer, {n_head}-head, {n_embd}-wide model, "
          f"{train_tokens} tokens per step, torch.compile ({train_compile}), bfloat16 autocast, "
          f"fused AdamW, loss tail {'compiled' if fused_loss else 'eager'}, "
          f"{'each step one CUDA graph' if train_graph else 'eager steps'}\n")
    header = (f"{'T':>6} {'B':>3} | {'attention':<26} | {'ms/step':>8} | {'tokens/s':>10} | "
              f"{'MFU':>6} | {'peak GiB':>8} | {'tokens/s vs full':>16}")
    rows, splits = [], []
    for T in map(int, filter(None, train_lengths.split(','))):
        B = train_tokens // T
        shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, dropout=0.0)
        peers = [(f"swat, w={train_window}", SWATConfig(window=train_window, **shape)),
                 ("full causal softmax (SDPA)",
                  SWATConfig(attn='softmax', alibi='none', window=T, **shape))]
        for name, config in peers:
            torch._dynamo.reset()           # a fresh compile for each model
            step, eager_step, model = training_step(config, B)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()    # from here: the first (eager) step, and what
            for _ in range(3):                      # a graph takes when it records the step
                step()                      # compile, autotune, record, settle the allocator
            ms = triton.testing.do_bench(step, warmup=200, rep=2000, return_mode='median')
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
            tokens_per_second = train_tokens / ms * 1e3
            mfu = model.estimate_mfu(tokens_per_second, T, 'cuda')
            rows.append((T, B, name, ms, tokens_per_second, mfu, peak_gib))
            if train_profile:
                eager_ms = triton.testing.do_bench(eager_step, warmup=200, rep=2000,
                                                   return_mode='median')
                splits.append((T, name, ms, eager_ms, step_split(eager_step)))
            del step, eager_step, model
            torch.cuda.empty_cache()
    print(header)
    print('-' * len(header))
    for T, B, name, ms, tokens_per_second, mfu, peak_gib in rows:
        full = next(r[4] for r in rows if r[0] == T and r[2].startswith('full'))
        mfu = '-' if mfu is None else f"{100 * mfu:5.1f}%"
        print(f"{T:>6} {B:>3} | {name:<26} | {ms:8.1f} | {tokens_per_second:10,.0f} | "
              f"{mfu:>6} | {peak_gib:8.1f} | {tokens_per_second / full:15.2f}x")
    if splits:
        print("\nwhere a step's GPU time goes (ms, profiler, the eager step's kernels); idle: "
              "the step's time above less its kernels'; eager: the step with every kernel "
              "launched from Python")
        header = (f"{'T':>6} | {'attention':<26} | " + " | ".join(f"{p:>9}" for p in SPLIT) +
                  f" | {'kernels':>8} | {'idle':>6} | {'eager ms':>8}")
        print(header)
        print('-' * len(header))
        for T, name, ms, eager_ms, split in splits:
            busy = sum(split.values())
            print(f"{T:>6} | {name:<26} | " + " | ".join(f"{split[p]:9.2f}" for p in SPLIT) +
                  f" | {busy:8.2f} | {ms - busy:6.2f} | {eager_ms:8.2f}")


def full_logits_loss(x, weight, targets):
    return F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)


def chunked_loss(chunk_size, fused):
    def loss(x, weight, targets):
        swat.FUSED_LOSS = fused
        return swat.chunked_cross_entropy(x, weight, targets, chunk_size)
    return loss


def installed_peers():
    """The fused losses of other projects that are installed here, as (name, loss function)."""
    peers = []
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        peers.append(('Liger-Kernel fused linear CE',
                      lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, ignore_index=-1)))
    except ImportError:
        print("Liger-Kernel is not installed here: its row is left out")
    try:
        from cut_cross_entropy import linear_cross_entropy
        peers.append(('Cut Cross-Entropy',
                      lambda x, w, t: linear_cross_entropy(x, w, t, ignore_index=-1)))
    except ImportError:
        print("Cut Cross-Entropy is not installed here: its row is left out")
    return peers


def loss_alone():
    torch.manual_seed(0)
    N, C, V = loss_rows, loss_width, 50304
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
          f"\nthe output layer and its cross-entropy: N = {N}, C = {C}, V = {V}, bfloat16, "
          f"forward+backward")
    x = torch.randn(N, C, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, C, device='cuda') * C ** -0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50257, (N,), device='cuda')
    reference = full_logits_loss(x.float(), weight.float(), targets)
    ref_grads = torch.autograd.grad(reference, (x, weight))
    chunks = [int(c) for c in loss_chunks.split(',')]
    methods = [('full logits, F.cross_entropy', full_logits_loss),
               ('full logits, torch.compile', torch.compile(full_logits_loss))]
    methods += [(f'chunked {c}, compiled tail', chunked_loss(c, True)) for c in chunks]
    methods += [(f'chunked {chunks[0]}, eager tail', chunked_loss(chunks[0], False))]
    methods += installed_peers()
    header = (f"{'method':<32} | {'ms':>6} | {'extra GiB':>9} | {'loss err':>8} | "
              f"{'dx err':>8} | {'dw err':>8}")
    print(header)
    print('-' * len(header))
    for name, fn in methods:
        loss = fn(x, weight, targets)
        grads = torch.autograd.grad(loss, (x, weight))
        errors = [relative_error(loss, reference)]
        errors += [relative_error(g, r) for g, r in zip(grads, ref_grads)]
        ms = triton.testing.do_bench(lambda: fn(x, weight, targets).backward(),
                                     grad_to_none=[x, weight], return_mode='median')
        x.grad = weight.grad = None
        del loss, grads
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(x, weight, targets).backward()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        x.grad = weight.grad = None
        print(f"{name:<32} | {ms:6.1f} | {extra:9.2f} | " + " | ".join(f"{e:8.1e}" for e in errors))
    swat.FUSED_LOSS = True


if __name__ == '__main__':
    apply_settings(sys.argv[1:])
    swat.FUSED_LOSS = fused_loss
    kernel.FAST_SIGMOID = sigmoid == 'fast'
    with torch.autograd.set_multithreading_enabled(backward_thread == 'engine'):
        modes = {'attention': main, 'tiles': tiles, 'train': training_throughput,
                 'loss': loss_alone}
        modes[mode]()
