"""
Times swat_attention next to the attention a user would otherwise reach for, on one GPU.

    python bench.py                      # the six shapes, then the length sweep
    python bench.py --sigmoid=exact --sweep_lengths=   # exact sigmoid, six shapes only

Peers, all in bfloat16, in the same run:
- flex sigmoid:  FlexAttention computing SWAT exactly: score_mod = logsigmoid(score + s_h (m-n)),
                 a sliding-window block mask, and out * exp(lse) to undo the softmax normaliser.
- flex softmax:  FlexAttention softmax sliding-window attention with the same ALiBi term.
- sdpa causal:   F.scaled_dot_product_attention, full causal attention (FlashAttention).
Times are medians of triton.testing.do_bench. Effective TFLOP/s count only the (query, key)
pairs a method attends to: forward 4 * B * H * D * pairs, backward 2.5 x forward.
"""

import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import kernel
from configurator import apply_overrides
from kernel import swat_attention
from swat import alibi_slopes

# -----------------------------------------------------------------------------
sigmoid = 'fast'        # 'fast' (tanh.approx) or 'exact' (tl.sigmoid) in the kernel
tokens = 32768          # B * T for the six shapes
seq_len = 16384
sweep_window = 512
sweep_lengths = '1024,2048,4096,8192,16384,32768,65536'
apply_overrides(globals(), ['sigmoid', 'tokens', 'seq_len', 'sweep_window', 'sweep_lengths'],
                sys.argv[1:])
# -----------------------------------------------------------------------------

compiled_flex = torch.compile(flex_attention, dynamic=False)


def attended_pairs(T, window):
    """sum over queries m of min(m + 1, window): the (query, key) pairs inside the window."""
    w = min(window, T)
    return w * (w + 1) // 2 + (T - w) * w


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


def measure(fn, q, k, v):
    """(forward ms, forward+backward ms, peak extra MiB of forward+backward)."""
    do = torch.randn_like(q)

    def forward_backward():
        fn(q, k, v).backward(do)

    forward_ms = triton.testing.do_bench(lambda: fn(q, k, v), return_mode='median')
    forward_backward_ms = triton.testing.do_bench(forward_backward, grad_to_none=[q, k, v],
                                                  return_mode='median')
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    q.grad = k.grad = v.grad = None
    return forward_ms, forward_backward_ms, peak_mib


def random_qkv(B, H, T, D):
    return [torch.randn(B, H, T, D, device='cuda', dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    torch.manual_seed(0)
    if sigmoid == 'exact':
        kernel.FAST_SIGMOID = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bfloat16, B*T = {tokens}, T = {seq_len}, sigmoid = {sigmoid}\n")
    header = (f"{'D':>4} {'H':>3} {'w':>5} | {'method':<13} | {'fwd ms':>7} {'fwd+bwd ms':>10} | "
              f"{'fwd TF/s':>8} {'f+b TF/s':>8} | {'peak MiB':>8} | {'f+b vs swat':>11}")
    print(header)
    print('-' * len(header))
    B, T = tokens // seq_len, seq_len
    for D, H in ((64, 12), (128, 8)):
        slopes = alibi_slopes(H).cuda()
        for w in (128, 512, 2048):
            q, k, v = random_qkv(B, H, T, D)
            flex_sigmoid, flex_softmax = flex_peers(slopes, w, T)
            error = relative_error(swat_attention(q, k, v, slopes, w), flex_sigmoid(q, k, v))
            methods = [('swat', lambda q, k, v: swat_attention(q, k, v, slopes, w), w),
                       ('flex sigmoid', flex_sigmoid, w), ('flex softmax', flex_softmax, w),
                       ('sdpa causal', sdpa_causal, T)]
            swat_fb = None
            for name, fn, attended_window in methods:
                fwd, fwd_bwd, peak = measure(fn, q, k, v)
                swat_fb = swat_fb or fwd_bwd
                flops = 4 * B * H * D * attended_pairs(T, attended_window)
                print(f"{D:>4} {H:>3} {w:>5} | {name:<13} | {fwd:7.3f} {fwd_bwd:10.3f} | "
                      f"{flops / fwd / 1e9:8.1f} {3.5 * flops / fwd_bwd / 1e9:8.1f} | "
                      f"{peak:8.0f} | {fwd_bwd / swat_fb:10.2f}x")
            print(f"{'':>14} | swat vs flex sigmoid output: relative error {error:.1e}")
        print()

    if not sweep_lengths:
        return
    print(f"length sweep, w = {sweep_window}, B = 1, H = 12, D = 64: forward+backward ms")
    print(f"{'T':>6} | {'swat':>8} | {'sdpa causal':>11} | {'sdpa / swat':>11}")
    slopes = alibi_slopes(12).cuda()
    for T in map(int, sweep_lengths.split(',')):
        q, k, v = random_qkv(1, 12, T, 64)
        swat_ms = measure(lambda q, k, v: swat_attention(q, k, v, slopes, sweep_window), q, k, v)[1]
        sdpa_ms = measure(sdpa_causal, q, k, v)[1]
        print(f"{T:>6} | {swat_ms:8.3f} | {sdpa_ms:11.3f} | {sdpa_ms / swat_ms:10.2f}x")


if __name__ == '__main__':
    main()
