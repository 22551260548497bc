"""
SWAT attention: sigmoid sliding-window attention with per-head ALiBi slopes.

For one head with head size D, query position m and window w (the number of keys a query
sees, itself included):

    o_m = sum_{n = max(0, m-w+1)}^{m}  sigmoid(q_m . k_n / sqrt(D) + s_h * (m - n)) * v_n

q and k arrive already rotated by RoPE. Slopes use the paper's sign: a negative s_h penalises
distance (recency), a positive s_h rewards it (keeps older tokens in view).

This file holds two implementations of that one equation:
- swat_attention_reference: plain PyTorch einsums, the readable definition, any device.
- swat_attention: fused Triton kernels for the forward and backward pass.
"""

import os

import torch
import triton
import triton.language as tl


def query_chunks(T, window, chunk_size):
    """Yield (m0, m1, n0): queries m0..m1-1 only ever look at keys n0..m1-1.

    Processing queries in chunks against just the keys their window can reach keeps memory
    at O(chunk * (chunk + w)) instead of O(T^2), so even a CPU can evaluate 16k tokens."""
    for m0 in range(0, T, chunk_size):
        m1 = min(m0 + chunk_size, T)
        yield m0, m1, max(0, m0 - window + 1)


def window_bias(m0, m1, n0, slopes, window):
    """The additive term of the logits for queries m0..m1-1 and keys n0..m1-1, shape (H, M, N):
    s_h * (m - n) inside the window, -inf outside it (the future, or more than w-1 back).
    -inf turns into an exact 0 after a sigmoid or a softmax."""
    m = torch.arange(m0, m1, device=slopes.device)[:, None]
    n = torch.arange(n0, m1, device=slopes.device)[None, :]
    distance = (m - n).to(slopes.dtype)                                 # (M, N)
    in_window = (distance >= 0) & (distance < window)
    bias = slopes[:, None, None] * distance                             # (H, M, N)
    return bias.masked_fill(~in_window, float('-inf'))


def swat_attention_reference(q, k, v, slopes, window, scale=None, chunk_size=256):
    """Eq. 5 of the paper in einsums. q, k, v: (B, H, T, D); slopes: (H,); returns (B, H, T, D).

    Computes in float32 (or float64 when given float64) and returns the input dtype."""
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))
    slopes = slopes.to(device=q.device, dtype=compute_dtype)
    outputs = []
    for m0, m1, n0 in query_chunks(T, window, chunk_size):
        logits = scale * torch.einsum('bhmd,bhnd->bhmn', q[:, :, m0:m1], k[:, :, n0:m1])
        weights = torch.sigmoid(logits + window_bias(m0, m1, n0, slopes, window))
        outputs.append(torch.einsum('bhmn,bhnd->bhmd', weights, v[:, :, n0:m1]))
    return torch.cat(outputs, dim=2).to(out_dtype)


# -----------------------------------------------------------------------------
# The fused Triton kernels.
#
# Softmax attention needs a running row maximum and a normaliser, and its backward a
# preprocessing pass for rowsum(o * do). A sigmoid needs none of that: every (query, key) weight
# p = sigmoid(s) is final the moment it is computed, so
#   forward:  o  = sum_n p_mn v_n                       (one pass, nothing saved but q, k, v)
#   backward: dv = p^T do,  dp = do v^T,  ds = dp * p * (1 - p),
#             dq = scale * ds k,  dk = scale * ds^T q   (p recomputed from q and k)
# The backward runs as two kernels without atomics: one program per key block accumulates
# dk and dv over the query blocks that see it, one program per query block accumulates dq.
#
# Work is O(T * w): a tile of queries visits only the key blocks its window reaches. Those
# blocks fall into three runs: blocks cut by the window's far edge (masked), blocks that every
# query of the tile sees whole (no mask at all), and blocks cut by the causal diagonal (masked).

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
HEAD_SIZES = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    if FAST:
        # sigmoid(x) = 0.5 * tanh(x / 2) + 0.5: one tanh.approx instruction on the special
        # function unit instead of an exp and a reciprocal (max. relative error about 2^-11,
        # below the resolution of the 16-bit p that multiplies v).
        t = tl.inline_asm_elementwise('tanh.approx.f32 $0, $1;', '=f,f', [0.5 * x],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return 0.5 * t + 0.5
    else:
        return tl.sigmoid(x)


@triton.jit
def _weights(a, b, distance, slope, scale, WINDOW, MASKED: tl.constexpr,
             FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """sigmoid(scale * a @ b + slope * distance) for one tile, where a @ b holds q . k products
    and distance the matching m - n. Masked tiles zero what the window hides."""
    s = tl.dot(a, b, input_precision=DOT_PRECISION) * scale + slope * distance.to(tl.float32)
    p = _sigmoid(s, FAST_SIGMOID)
    if MASKED:
        p = tl.where((distance >= 0) & (distance < WINDOW), p, 0.0)
    return p


@triton.jit
def _key_block_runs(m0, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the queries m0 .. m0+BLOCK_M-1, key-block starts split as
    [lo, mid_lo) masked, [mid_lo, mid_hi) unmasked, [mid_hi, hi) masked."""
    lo = tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    # unmasked: the last query is at most WINDOW-1 past the block's first key ...
    mid_lo = tl.minimum(tl.cdiv(tl.maximum(m0 + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N, hi)
    # ... and the block's last key is not after the first query
    mid_hi = tl.maximum((m0 + 1) // BLOCK_N * BLOCK_N, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_block_runs(n0, T, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys n0 .. n0+BLOCK_N-1, query-block starts split as
    [lo, mid_lo) masked, [mid_lo, mid_hi) unmasked, [mid_hi, hi) masked."""
    lo = n0 // BLOCK_M * BLOCK_M
    hi = tl.minimum(n0 + BLOCK_N - 1 + WINDOW, T)
    # unmasked: the block's first query is not before the last key ...
    mid_lo = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi)
    # ... and the block's last query is at most WINDOW-1 past the first key
    mid_hi = tl.maximum(tl.minimum((n0 + WINDOW) // BLOCK_M * BLOCK_M, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, scale, offs_m, n_lo, n_hi, T,
                   WINDOW, BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                   FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k_t = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        distance = offs_m[:, None] - offs_n[None, :]
        p = _weights(q, k_t, distance, slope, scale, WINDOW, MASKED, FAST_SIGMOID, DOT_PRECISION)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _forward_kernel(Q, K, V, O, Slopes, scale, T, H, WINDOW,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    slope = tl.load(Slopes + h)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)

    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_block_runs(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, scale, offs_m, lo, mid_lo, T,
                         WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, scale, offs_m, mid_lo, mid_hi, T,
                         WINDOW, BLOCK_N, D, False, FAST_SIGMOID, DOT_PRECISION)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, scale, offs_m, mid_hi, hi, T,
                         WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, scale, offs_n, m_lo, m_hi, T,
                WINDOW, BLOCK_M: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Works on transposed tiles, p^T[n, m], computed as k @ q^T: moving a finished fp32 tile
    # from one register layout to the other would cost a round trip through shared memory.
    offs_d = tl.arange(0, D)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_seq = offs_m < T
        q_t = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        distance_t = offs_m[None, :] - offs_n[:, None]
        p_t = _weights(k, q_t, distance_t, slope, scale, WINDOW, MASKED, FAST_SIGMOID, DOT_PRECISION)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = dp_t * p_t * (1.0 - p_t)
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _dkdv_kernel(Q, K, V, DO, DK, DV, Slopes, scale, T, H, WINDOW,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_gb, stride_gh, stride_gt,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DK += b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh       # dk and dv: same layout
    DV += b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    slope = tl.load(Slopes + h)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_seq = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)

    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_block_runs(n0, T, WINDOW, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, scale, offs_n, lo,
                         mid_lo, T, WINDOW, BLOCK_M, D, True, FAST_SIGMOID, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, scale, offs_n, mid_lo,
                         mid_hi, T, WINDOW, BLOCK_M, D, False, FAST_SIGMOID, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, scale, offs_n, mid_hi,
                         hi, T, WINDOW, BLOCK_M, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(DK + offs_n[:, None] * stride_gt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_seq)
    tl.store(DV + offs_n[:, None] * stride_gt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=in_seq)


@triton.jit
def _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, scale, offs_m, n_lo, n_hi, T,
              WINDOW, BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
              FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k_t = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        v_t = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        distance = offs_m[:, None] - offs_n[None, :]
        p = _weights(q, k_t, distance, slope, scale, WINDOW, MASKED, FAST_SIGMOID, DOT_PRECISION)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = dp * p * (1.0 - p)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _dq_kernel(Q, K, V, DO, DQ, Slopes, scale, T, H, WINDOW,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
               stride_gb, stride_gh, stride_gt,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DQ += b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    slope = tl.load(Slopes + h)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_seq = offs_m[:, None] < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=in_seq, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=in_seq, other=0.0)

    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_block_runs(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, scale, offs_m, lo, mid_lo, T,
                   WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, scale, offs_m, mid_lo, mid_hi, T,
                   WINDOW, BLOCK_N, D, False, FAST_SIGMOID, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, scale, offs_m, mid_hi, hi, T,
                   WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_gt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_seq)


# -----------------------------------------------------------------------------
# Launchers. Each kernel has a list of (BLOCK_M, BLOCK_N, num_warps, num_stages). The first,
# small entry serves the interpreter (its unequal blocks exercise every boundary case) and
# float32 inputs, whose exact matmuls are the slow-to-compile correctness path. 16-bit inputs
# on the GPU try the others and keep the fastest for each head size and window.

def _tuned(shapes):
    def prune(configs, named_args, **kwargs):
        small = INTERPRET or named_args['Q'].dtype == torch.float32
        return configs[:1] if small else configs[1:]

    configs = [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=s)
               for m, n, w, s in shapes]
    return triton.autotune(configs=configs, key=['D', 'WINDOW'],
                           prune_configs_by={'early_config_prune': prune})


_forward = _tuned([(32, 16, 4, 1), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                   (64, 64, 4, 3), (128, 32, 4, 4)])(_forward_kernel)
_dkdv = _tuned([(16, 32, 4, 1), (32, 128, 4, 3), (32, 128, 8, 4), (64, 128, 8, 3),
                (64, 64, 4, 3), (128, 128, 8, 2)])(_dkdv_kernel)
_dq = _tuned([(32, 16, 4, 1), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3),
              (128, 32, 8, 4), (64, 32, 4, 4)])(_dq_kernel)


FAST_SIGMOID = True     # use tanh.approx for 16-bit inputs on the GPU (bench.py measures both)


def _kernel_flags(dtype):
    # float32 inputs get exact float32 matmuls and the exact sigmoid; 16-bit inputs get the
    # tensor cores' native path and, unless switched off, the fast sigmoid.
    fast = FAST_SIGMOID and dtype != torch.float32 and not INTERPRET
    return dict(FAST_SIGMOID=fast, DOT_PRECISION='ieee' if dtype == torch.float32 else 'tf32')


def _strides(*tensors):
    return [s for x in tensors for s in x.stride()[:3]]


def swat_forward(q, k, v, slopes, window, scale, out):
    """Write the attention output for q, k, v (B, H, T, D) into out; launches the Triton kernel."""
    B, H, T, D = q.shape
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_M']), B * H)
    _forward[grid](q, k, v, out, slopes, scale, T, H, min(window, T), *_strides(q, k, v, out),
                   D=D, **_kernel_flags(q.dtype))
    return out


def swat_backward(do, q, k, v, slopes, window, scale, dq, dk, dv):
    """Write the gradients of q, k, v into dq, dk, dv (dk and dv must share their strides)."""
    B, H, T, D = q.shape
    window = min(window, T)
    flags = _kernel_flags(q.dtype)
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_N']), B * H)
    _dkdv[grid](q, k, v, do, dk, dv, slopes, scale, T, H, window, *_strides(q, k, v, do, dk),
                D=D, **flags)
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_M']), B * H)
    _dq[grid](q, k, v, do, dq, slopes, scale, T, H, window, *_strides(q, k, v, do, dq),
              D=D, **flags)
    return dq, dk, dv


# Registered as PyTorch operators so that torch.compile sees one opaque, differentiable call
# instead of breaking its graph at the Triton launch. They are defined through
# torch.library.Library: torch.library.custom_op builds the same operator with about 0.3 ms more
# host time per forward + backward, which is most of the cost of a call at small sizes.

_library = torch.library.Library('nanoswat', 'DEF')
_library.define('swat_attention(Tensor q, Tensor k, Tensor v, Tensor slopes, int window, '
                'float scale) -> Tensor')
_library.define('swat_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor slopes, '
                'int window, float scale) -> (Tensor, Tensor, Tensor)')


def _empty_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _forward_op(q, k, v, slopes, window, scale):
    return swat_forward(q, k, v, slopes, window, scale, _empty_like(q))


def _backward_op(do, q, k, v, slopes, window, scale):
    return swat_backward(do, q, k, v, slopes, window, scale, *(_empty_like(q) for _ in range(3)))


def _forward_shape(q, k, v, slopes, window, scale):
    return _empty_like(q)


def _backward_shapes(do, q, k, v, slopes, window, scale):
    return tuple(_empty_like(q) for _ in range(3))


def _save_for_backward(ctx, inputs, output):
    q, k, v, slopes, ctx.window, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, slopes)


def _backward(ctx, do):
    q, k, v, slopes = ctx.saved_tensors
    dq, dk, dv = torch.ops.nanoswat.swat_attention_backward(do, q, k, v, slopes, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


_library.impl('swat_attention', _forward_op, 'CompositeExplicitAutograd')
_library.impl('swat_attention_backward', _backward_op, 'CompositeExplicitAutograd')
torch.library.register_fake('nanoswat::swat_attention', _forward_shape)
torch.library.register_fake('nanoswat::swat_attention_backward', _backward_shapes)
torch.library.register_autograd('nanoswat::swat_attention', _backward, setup_context=_save_for_backward)


def check_inputs(q, k, v, slopes, window):
    """Raise a ValueError that says what is wrong with the arguments, if anything is."""
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must share one shape (B, H, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q, k and v must share one dtype out of float32, float16, bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device == slopes.device:
        raise ValueError(f"q, k, v and slopes must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {slopes.device}")
    if D not in HEAD_SIZES:
        raise ValueError(f"head size D={D} is not supported; use one of {HEAD_SIZES} "
                         f"(n_embd / n_head in the model)")
    if T < 1:
        raise ValueError(f"the sequence is empty (T={T}); give at least one token")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape (H,) = ({H},), one per head; got {tuple(slopes.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the keys each query sees, itself "
                         f"included); got {window!r}")


def swat_attention(q, k, v, slopes, window, scale=None):
    """SWAT attention, (B, H, T, D) -> (B, H, T, D), differentiable in q, k and v.

    Runs the fused Triton kernels on CUDA tensors (and on any tensors under TRITON_INTERPRET=1),
    the einsum reference elsewhere."""
    check_inputs(q, k, v, slopes, window)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (q.is_cuda or INTERPRET):
        return swat_attention_reference(q, k, v, slopes, window, scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return torch.ops.nanoswat.swat_attention(q, k, v, slopes.to(torch.float32).contiguous(), window, scale)
