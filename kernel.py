"""
SWAT attention: sigmoid sliding-window attention with per-head ALiBi slopes.

For one head with head size D, query position m and window w (the number of keys a query
sees, itself included):

    o_m = sum_{n = max(0, m-w+1)}^{m}  sigmoid(q_m . k_n / sqrt(D) + s_h * (m - n) + b) * v_n

q and k arrive already rotated by RoPE. Slopes use the paper's sign: a negative s_h penalises
distance (recency), a positive s_h rewards it (keeps older tokens in view). b is a constant,
0 in the paper; Ramapuram et al. 2024 ("Theory, Analysis, and Best Practices for Sigmoid
Self-Attention") found sigmoid attention without one unstable; with b = -log(w) the weights of
a window of w keys whose logits are 0 sum to w / (w + 1), about one, as a softmax's do.

This file holds two implementations of that one equation:
- swat_attention_reference: plain PyTorch einsums, the readable definition, any device.
- swat_attention: fused Triton kernels for the forward and backward pass.
and the same two for generation's one new query per row against a KV cache:
swat_decode_reference and swat_decode; and token_linear, the linear layers of that step with
the norm before and the GELU or residual add after each fused into one kernel.
"""

import importlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# -----------------------------------------------------------------------------
# Argument checks, shared by both implementations: a wrong shape, dtype or window gives one line
# that says what was given and what is expected, not an error from deep inside an einsum or a
# Triton launch (or, worse, a plausible-looking result).

HEAD_SIZES = (16, 32, 64, 128)                          # what the fused kernels are compiled for
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # ... and the dtypes they take
REFERENCE_DTYPES = DTYPES + (torch.float64,)


def is_int(x):
    """True for a Python int; False for 2.5, '3' and True (in Python a bool is an int)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x):
    """True for an int or a float (nan and inf included); False for a bool, a str, None."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_head_size(D, hint='D = n_embd / n_head in the model'):
    if D not in HEAD_SIZES:
        raise ValueError(f"head size D={D} is not supported by the fused kernel; use one of "
                         f"{HEAD_SIZES} ({hint})")


def check_inputs(q, k, v, slopes, window, bias, fused=True):
    """Raise a ValueError that says what is wrong with the arguments, if anything is.
    fused=True adds the limits of the fused kernels: head sizes HEAD_SIZES, dtypes DTYPES."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise ValueError(f"q, k and v must be torch tensors (B, H, T, D); got "
                         f"{type(q).__name__}, {type(k).__name__}, {type(v).__name__}")
    if q.dim() != 4 or not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must share one shape (B, H, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}: "
                         f"convert them with .to(q.dtype)")
    dtypes = DTYPES if fused else REFERENCE_DTYPES
    if q.dtype not in dtypes:
        names = ', '.join(str(dtype).removeprefix('torch.') for dtype in dtypes)
        raise ValueError(f"q, k and v must be float tensors, one of {names}; got {q.dtype}: "
                         f"convert them with .float()")
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point():
        got = slopes.dtype if isinstance(slopes, torch.Tensor) else f"a {type(slopes).__name__}"
        raise ValueError(f"slopes must be a float tensor of shape (H,), one per head; got {got}: "
                         f"pass torch.tensor(slopes, dtype=torch.float32, device=q.device)")
    if not q.device == k.device == v.device == slopes.device:
        raise ValueError(f"q, k, v and slopes must be on one device; got {q.device}, {k.device}, "
                         f"{v.device}, {slopes.device}")
    if q.numel() == 0:
        raise ValueError(f"q, k and v are empty, (B, H, T, D) = {tuple(q.shape)}; give at least "
                         f"one token (T >= 1), one head and one sequence")
    if fused:
        check_head_size(D)
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape (H,) = ({H},), one per head; got {tuple(slopes.shape)}")
    if not (is_int(window) and window >= 1):
        raise ValueError(f"window must be an integer >= 1 (the keys each query sees, itself "
                         f"included); got {window!r}")
    if not (is_number(bias) and math.isfinite(bias)):
        raise ValueError(f"bias must be a finite number, the constant b added to every logit "
                         f"inside the sigmoid (0.0: none, as in the paper); got {bias!r}")


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


def attended_pairs(T, window):
    """The (query, key) pairs inside the window: sum over m of min(m + 1, w). The first w
    queries see 1, 2, ..., w keys, every later one w. Effective FLOP counts use it: they count
    the pairs a query attends to, not the masked-out parts of the tiles a kernel computes."""
    w = min(window, T)
    return w * (w + 1) // 2 + (T - w) * w


def swat_attention_reference(q, k, v, slopes, window, scale=None, bias=0.0, chunk_size=256):
    """Eq. 5 of the paper in einsums. q, k, v: (B, H, T, D); slopes: (H,); bias: the constant b
    inside the sigmoid; returns (B, H, T, D).

    Any head size and any float dtype; computes in float32 (or float64 when given float64) and
    returns the input dtype."""
    check_inputs(q, k, v, slopes, window, bias, fused=False)
    if not (is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1 (queries per chunk)")
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))
    slopes = slopes.to(device=q.device, dtype=compute_dtype)
    outputs = []
    for m0, m1, n0 in query_chunks(T, window, chunk_size):
        logits = scale * torch.einsum('bhmd,bhnd->bhmn', q[:, :, m0:m1], k[:, :, n0:m1])
        weights = torch.sigmoid(logits + window_bias(m0, m1, n0, slopes, window) + bias)
        outputs.append(torch.einsum('bhmn,bhnd->bhmd', weights, v[:, :, n0:m1]))
    return torch.cat(outputs, dim=2).to(out_dtype)


def swat_decode_reference(q, keys, values, distance, visible, back_rotation, slopes, scale, bias):
    """Eq. 5 for one new query per row against a KV cache: (B, H, D), in float32.

    q (B, H, 1, D) at distance 0 from itself, so unrotated; keys, values (B, H, S, D): the
    cache's S slots, the keys before RoPE; distance (S,): from the query back to each slot's
    token; visible (S,): the slots that hold a token; back_rotation: RoPE's (cos, -sin) for
    each slot's distance, (S, D) each, or None (no RoPE). Rotating a key back by its distance
    gives q . k what RoPE gives the pair: it depends on m - n alone."""
    q, keys, values = q[:, :, 0].float(), keys.float(), values.float()
    if back_rotation is not None:
        cos, sin = back_rotation
        k1, k2 = keys.chunk(2, dim=-1)                      # RoPE's rotate-half layout
        keys = keys * cos + torch.cat([-k2, k1], dim=-1) * sin
    logits = scale * torch.einsum('bhd,bhsd->bhs', q, keys) + slopes.float()[:, None] * distance
    weights = torch.sigmoid(logits + bias).masked_fill(~visible, 0.0)      # (B, H, S)
    return torch.einsum('bhs,bhsd->bhd', weights, values)


# -----------------------------------------------------------------------------
# The fused Triton kernels.
#
# Softmax attention needs a running row maximum and a normaliser, and its backward a
# preprocessing pass for rowsum(o * do). A sigmoid needs none of that: every (query, key) weight
# p = sigmoid(s) is final the moment it is computed, so
#   forward:  o  = sum_n p_mn v_n                       (one pass, nothing saved but q, k, v)
#   backward: dv = p^T do,  dp = do v^T,  ds = dp * p * (1 - p),
#             dq = scale * ds k,  dk = scale * ds^T q   (p recomputed from q and k)
# s holds the ALiBi term and the constant b too: the derivative of sigmoid(x + c) in x is
# p (1 - p) whatever c is, so the backward is the same formula of the same recomputed p.
# The backward runs as two kernels without atomics: one program per key block accumulates
# dk and dv over the query blocks that see it, one program per query block accumulates dq.
#
# Work is O(T * w): a tile of queries visits only the key blocks its window reaches. Those
# blocks fall into three runs: blocks cut by the window's far edge (masked), blocks that every
# query of the tile sees whole (no mask at all), and blocks cut by the causal diagonal (masked);
# the picture above _key_block_runs shows them.

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'


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
def _weights(a, b, distance, slope, bias, scale, WINDOW, MASKED: tl.constexpr,
             FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """sigmoid(scale * a @ b + slope * distance + bias) for one tile, where a @ b holds q . k
    products and distance the matching m - n. Masked tiles zero what the window hides."""
    # the ALiBi term and the constant b shift the scaled dot products alike: one shift per element
    shift = slope * distance.to(tl.float32) + bias
    s = tl.dot(a, b, input_precision=DOT_PRECISION) * scale + shift
    p = _sigmoid(s, FAST_SIGMOID)
    if MASKED:
        p = tl.where((distance >= 0) & (distance < WINDOW), p, 0.0)
    return p


# Which tiles a program visits, drawn for BLOCK_M = BLOCK_N = 4 and w = 12 ('#': the query sees
# the key, '.': it does not). The forward and the dq pass run one program per block of queries,
# here m = 16..19, and walk along its row of key blocks:
#
#     keys n:  0..3   4..7   8..11  12..15  16..19
#     m = 16   ....   .###   ####   ####    #...
#     m = 17   ....   ..##   ####   ####    ##..
#     m = 18   ....   ...#   ####   ####    ###.
#     m = 19   ....   ....   ####   ####    ####
#              never  edge   interior       diagonal
#              loaded masked no mask        masked
#
# Keys 0..3 are more than w-1 back from every query of the block: never loaded. The window's
# far edge cuts the first visited block (query 16 sees three of keys 4..7, query 19 none) and
# the causal diagonal cuts the last (no query sees a key after itself); every block between
# them is seen whole by every query, so it runs without a mask. With unequal BLOCK_M and
# BLOCK_N, or a window that ends inside a block, the edge or the diagonal can span more than
# one block: each run is a range of blocks, computed by the two functions below.
#
# The dk/dv pass runs one program per block of keys, here n = 4..7, and walks down its column
# of query blocks: the same band, met in the opposite order.
#
#                 keys 4..7
#     m =  4..7   #...   diagonal (masked)
#                 ##..
#                 ###.
#                 ####
#     m =  8..15  ####   interior (no mask): every row as this one
#     m = 16..19  .###   edge (masked)
#                 ..##
#                 ...#
#                 ....
#     m >= 20     not visited


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
def _at_head(X, stride_b, stride_h, H):
    """X moved to the (batch, head) of this program: program_id(1) counts batch * H + head.
    The offset is int64, since a (B, H, T, D) tensor can hold more than 2^31 elements."""
    bh = tl.program_id(1)
    return X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, n_lo, n_hi, T,
                   WINDOW, BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
                   FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k_t = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        distance = offs_m[:, None] - offs_n[None, :]
        p = _weights(q, k_t, distance, slope, bias, scale, WINDOW, MASKED, FAST_SIGMOID, DOT_PRECISION)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _forward_kernel(Q, K, V, O, Slopes, bias, scale, T, H, WINDOW,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    Q = _at_head(Q, stride_qb, stride_qh, H)
    K = _at_head(K, stride_kb, stride_kh, H)
    V = _at_head(V, stride_vb, stride_vh, H)
    O = _at_head(O, stride_ob, stride_oh, H)
    slope = tl.load(Slopes + tl.program_id(1) % H)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)

    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_block_runs(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, lo,
                         mid_lo, T, WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, mid_lo,
                         mid_hi, T, WINDOW, BLOCK_N, D, False, FAST_SIGMOID, DOT_PRECISION)
    acc = _forward_tiles(acc, q, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, mid_hi,
                         hi, T, WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, bias, scale, offs_n, m_lo,
                m_hi, T, WINDOW, BLOCK_M: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
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
        p_t = _weights(k, q_t, distance_t, slope, bias, scale, WINDOW, MASKED, FAST_SIGMOID,
                       DOT_PRECISION)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = dp_t * p_t * (1.0 - p_t)
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _dkdv_kernel(Q, K, V, DO, DK, DV, Slopes, bias, scale, T, H, WINDOW,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_gb, stride_gh, stride_gt,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    Q = _at_head(Q, stride_qb, stride_qh, H)
    K = _at_head(K, stride_kb, stride_kh, H)
    V = _at_head(V, stride_vb, stride_vh, H)
    DO = _at_head(DO, stride_dob, stride_doh, H)
    DK = _at_head(DK, stride_gb, stride_gh, H)          # dk and dv: one layout
    DV = _at_head(DV, stride_gb, stride_gh, H)
    slope = tl.load(Slopes + tl.program_id(1) % H)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_seq = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)

    dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _query_block_runs(n0, T, WINDOW, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, bias, scale, offs_n,
                         lo, mid_lo, T, WINDOW, BLOCK_M, D, True, FAST_SIGMOID, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, bias, scale, offs_n,
                         mid_lo, mid_hi, T, WINDOW, BLOCK_M, D, False, FAST_SIGMOID, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, stride_qt, stride_dot, slope, bias, scale, offs_n,
                         mid_hi, hi, T, WINDOW, BLOCK_M, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(DK + offs_n[:, None] * stride_gt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_seq)
    tl.store(DV + offs_n[:, None] * stride_gt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=in_seq)


@triton.jit
def _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, n_lo, n_hi, T,
              WINDOW, BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
              FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, D)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_seq = offs_n < T
        k_t = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        v_t = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        distance = offs_m[:, None] - offs_n[None, :]
        p = _weights(q, k_t, distance, slope, bias, scale, WINDOW, MASKED, FAST_SIGMOID, DOT_PRECISION)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = dp * p * (1.0 - p)
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=['T', 'WINDOW'])  # one compile for every length and window
def _dq_kernel(Q, K, V, DO, DQ, Slopes, bias, scale, T, H, WINDOW,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
               stride_gb, stride_gh, stride_gt,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               FAST_SIGMOID: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    Q = _at_head(Q, stride_qb, stride_qh, H)
    K = _at_head(K, stride_kb, stride_kh, H)
    V = _at_head(V, stride_vb, stride_vh, H)
    DO = _at_head(DO, stride_dob, stride_doh, H)
    DQ = _at_head(DQ, stride_gb, stride_gh, H)
    slope = tl.load(Slopes + tl.program_id(1) % H)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    in_seq = offs_m[:, None] < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=in_seq, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=in_seq, other=0.0)

    dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_block_runs(m0, T, WINDOW, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, lo, mid_lo,
                   T, WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, mid_lo,
                   mid_hi, T, WINDOW, BLOCK_N, D, False, FAST_SIGMOID, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, K, V, stride_kt, stride_vt, slope, bias, scale, offs_m, mid_hi, hi,
                   T, WINDOW, BLOCK_N, D, True, FAST_SIGMOID, DOT_PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_gt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_seq)


# The decode kernel: generation's one query per row against the KV cache's S slots. A program
# per (row, head) walks the slots in blocks: it rotates each key back by its distance (RoPE),
# takes q . k, adds the ALiBi term, and sums sigmoid(.) v. One launch per layer, where the same
# in PyTorch is a rotation, two products and a sigmoid over (B, H, S, D) (RESULTS.md, section 5).
# A row is too small for the tensor cores: plain float32 products and sums.

@triton.jit
def _decode_kernel(Q, Knew, Vnew, K, V, O, Slot, Distance, Visible, Cos, Sin, Slopes, bias, scale,
                   S, H, stride_qb, stride_qh, stride_nb, stride_nh, stride_kb, stride_kh,
                   stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_rope,
                   D: tl.constexpr, BLOCK_S: tl.constexpr, ROPE: tl.constexpr,
                   FAST_SIGMOID: tl.constexpr):
    Q = _at_head(Q, stride_qb, stride_qh, H)
    Knew = _at_head(Knew, stride_nb, stride_nh, H)
    Vnew = _at_head(Vnew, stride_nb, stride_nh, H)
    K = _at_head(K, stride_kb, stride_kh, H)
    V = _at_head(V, stride_vb, stride_vh, H)
    O = _at_head(O, stride_ob, stride_oh, H)
    slope = tl.load(Slopes + tl.program_id(1) % H).to(tl.float32)     # (the model's dtype)
    HALF: tl.constexpr = D // 2
    offs_h = tl.arange(0, HALF)             # RoPE pairs x_i with x_{i + D/2}: the two halves
    offs_d = tl.arange(0, D)
    q1 = tl.load(Q + offs_h).to(tl.float32)
    q2 = tl.load(Q + HALF + offs_h).to(tl.float32)
    # The new token's key and value go into their slot of the ring here, in the cache's dtype,
    # instead of in two copies before the launch. This program is the only one that reads this
    # row and head of the cache, and it takes that slot's key and value from these registers
    # below, not from memory: its threads store and load different elements, with no barrier
    # between them, so a load could still see the old token.
    slot = tl.load(Slot)
    new_k1 = tl.load(Knew + offs_h).to(K.dtype.element_ty)
    new_k2 = tl.load(Knew + HALF + offs_h).to(K.dtype.element_ty)
    new_v = tl.load(Vnew + offs_d).to(V.dtype.element_ty)
    tl.store(K + slot * stride_ks + offs_h, new_k1)
    tl.store(K + slot * stride_ks + HALF + offs_h, new_k2)
    tl.store(V + slot * stride_vs + offs_d, new_v)
    acc = tl.zeros((D,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_cache = offs_s < S
        is_new = (offs_s == slot)[:, None]
        k_rows = K + offs_s[:, None] * stride_ks
        k1 = tl.load(k_rows + offs_h[None, :], mask=in_cache[:, None], other=0.0)
        k2 = tl.load(k_rows + HALF + offs_h[None, :], mask=in_cache[:, None], other=0.0)
        k1 = tl.where(is_new, new_k1[None, :], k1).to(tl.float32)
        k2 = tl.where(is_new, new_k2[None, :], k2).to(tl.float32)
        if ROPE:                            # back by the distance: Sin holds -sin
            rope_rows = offs_s[:, None] * stride_rope + offs_h[None, :]
            cos = tl.load(Cos + rope_rows, mask=in_cache[:, None], other=0.0)
            sin = tl.load(Sin + rope_rows, mask=in_cache[:, None], other=0.0)
            k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
        s = (tl.sum(k1 * q1[None, :], 1) + tl.sum(k2 * q2[None, :], 1)) * scale
        distance = tl.load(Distance + offs_s, mask=in_cache, other=0)
        p = _sigmoid(s + slope * distance.to(tl.float32) + bias, FAST_SIGMOID)
        seen = tl.load(Visible + offs_s, mask=in_cache, other=0) != 0
        p = tl.where(seen & in_cache, p, 0.0)
        v = tl.load(V + offs_s[:, None] * stride_vs + offs_d[None, :], mask=in_cache[:, None],
                    other=0.0)
        v = tl.where(is_new, new_v[None, :], v).to(tl.float32)
        acc += tl.sum(p[:, None] * v, 0)
    tl.store(O + offs_d, acc.to(O.dtype.element_ty))


# The linear layers of a decode step with a few rows. Each one is a matrix of weights against a
# handful of rows, and in PyTorch it is two or three launches: the RMSNorm before it, the matmul,
# the GELU or the residual add after it, each ~2 µs of launch and one pass over the GPU for a few
# kilobytes of work. Here one program takes BLOCK_N outputs (1-4) of up to 4 rows over the whole
# depth, at most 2048 at a time, and does all of it: a layer of a few hundred outputs is about a
# hundred programs or more, each one load of its weights. The rows are too few for the tensor
# cores (tl.dot takes 16 at least): the products are plain float32 ones. The norm needs no pass of
# its own: RMSNorm scales each row by one number, r = 1 / sqrt(mean(x^2) + eps), so norm(x) @ W^T
# = r * ((x * g) @ W^T), and the program sums the squares of x in the same loop that multiplies
# it.

@triton.jit
def _token_linear_kernel(X, W, Gain, Residual, Y, R, N, K, eps, stride_xr, stride_wn, stride_rr,
                         stride_yr, NORM: tl.constexpr, GELU: tl.constexpr,
                         RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < K
        x = tl.load(X + offs_r[:, None] * stride_xr + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & in_k[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & in_k[None, :], other=0.0).to(tl.float32)
        if NORM:
            squares += tl.sum(x * x, 1)
            x = x * tl.load(Gain + offs_k, mask=in_k, other=0.0).to(tl.float32)[None, :]
        acc += tl.sum(x[:, None, :] * w[None, :, :], 2)     # (BLOCK_R, BLOCK_N)
    if NORM:
        acc = acc * tl.rsqrt(squares / K + eps)[:, None]
    if GELU:                                # the exact GELU, F.gelu's default
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    in_out = (offs_r[:, None] < R) & (offs_n[None, :] < N)
    if RESIDUAL:
        acc += tl.load(Residual + offs_r[:, None] * stride_rr + offs_n[None, :], mask=in_out,
                       other=0.0).to(tl.float32)
    tl.store(Y + offs_r[:, None] * stride_yr + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=in_out)


# -----------------------------------------------------------------------------
# Launchers. Each kernel has one small configuration and a list of fast ones, each written
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The small one runs under the interpreter (its
# unequal blocks exercise every boundary case of the runs above) and for float32 inputs, the
# correctness path, whose exact dots are slow to compile. 16-bit inputs on the GPU time the fast
# ones on first use and keep the fastest for each head size and window, unless one is pinned;
# the choice is also written to Triton's cache on disk, so that a later process (the next
# train.py or sample.py) takes it without timing the candidates again. Before the first timing
# the candidates are compiled all at once, a thread each: Triton's compiler releases the GIL for
# most of its work, so together they take a fraction of their sum (RESULTS.md, section 3). Once
# the autotuner has chosen, later calls launch its choice themselves: the autotuner's own
# bookkeeping at every call (a dict of the ~30 arguments, a key with every tensor's dtype) cost
# ~27 µs a launch on the H200 machine, half the host's time of a forward+backward's three
# launches (RESULTS.md, section 1).

PINNED = None   # None: autotune, as above. An index i: run the i-th fast configuration of each
                # kernel untimed, so one compile per head size and dtype and no timing runs (the
                # tests pin 0; one of them runs every i against the float64 ground truth).


class _Launcher:
    """A kernel with its configurations: launcher[grid](dtype, config, *args, **kwargs)."""

    def __init__(self, kernel, small, fast):
        self.kernel, self.small, self.fast = kernel, small, fast
        configs = [triton.Config({'BLOCK_M': block_m, 'BLOCK_N': block_n}, num_warps=num_warps,
                                 num_stages=num_stages)
                   for block_m, block_n, num_warps, num_stages in fast]
        self.autotuned = triton.autotune(configs=configs, key=['D', 'WINDOW'],
                                         cache_results=True)(kernel)
        self.window_at = kernel.arg_names.index('WINDOW')
        self.chosen = {}                    # (dtype, D, WINDOW) -> the chosen config's kwargs

    def compile_candidates(self, grid, args, kwargs):
        """Compile every candidate configuration for these arguments, all at once."""
        with ThreadPoolExecutor(len(self.autotuned.configs)) as pool:
            jobs = [pool.submit(self.kernel.warmup, *args, grid=grid, **kwargs,
                                **config.all_kwargs()) for config in self.autotuned.configs]
            for job in jobs:
                job.result()                # re-raises a compile error

    def __getitem__(self, grid):
        def launch(dtype, config, *args, **kwargs):
            """config: an index into `fast`, or None for PINNED's choice."""
            config = PINNED if config is None else config
            if INTERPRET or dtype == torch.float32:
                shape = self.small
            elif config is None:
                key = (dtype, kwargs['D'], args[self.window_at])
                if key in self.chosen:
                    return self.kernel[grid](*args, **kwargs, **self.chosen[key])
                self.compile_candidates(grid, args, kwargs)
                result = self.autotuned[grid](*args, **kwargs)     # times them, or reads the disk
                self.chosen[key] = self.autotuned.best_config.all_kwargs()
                return result
            else:
                shape = self.fast[config]
            block_m, block_n, num_warps, num_stages = shape
            return self.kernel[grid](*args, **kwargs, BLOCK_M=block_m, BLOCK_N=block_n,
                                     num_warps=num_warps, num_stages=num_stages)
        return launch


# The fast lists: for each kernel the fastest of 15-17 candidates timed one by one at the six
# shapes of `bench.py --mode=tiles` on an H200 (RESULTS.md, section 1). Small tiles win at
# small windows: at w = 128 nearly every tile a program visits is cut by the window's edge or
# the diagonal, and a smaller tile computes fewer of the masked pairs; there the dk/dv pass
# takes 64 keys a program, and at w = 2048 128.
_forward = _Launcher(_forward_kernel, small=(32, 16, 4, 1),
                     fast=[(128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 4), (64, 32, 4, 4),
                           (64, 64, 4, 3)])
_dkdv = _Launcher(_dkdv_kernel, small=(16, 32, 4, 1),
                  fast=[(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 4), (32, 64, 4, 4),
                        (64, 128, 8, 4)])
_dq = _Launcher(_dq_kernel, small=(32, 16, 4, 1),
                fast=[(128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 3),
                      (64, 32, 4, 2)])
FAST_CONFIGS = len(_forward.fast)       # every kernel has this many


FAST_SIGMOID = True     # 16-bit inputs on the GPU: tanh.approx (bench.py measures both)
EXACT_FLOAT32 = True    # float32 inputs: exact float32 dots; False: tf32 on the tensor cores


def _dot_precision(dtype):
    """The input_precision of every tl.dot. It matters for float32 operands alone: 'ieee'
    multiplies them exactly, 'tf32' rounds them to a 10-bit mantissa first (a relative
    error of about 3e-4 instead of 1e-5). 16-bit operands go to the tensor cores as they are,
    and Triton ignores the setting for them; they are passed its default, 'tf32'. (Under the
    interpreter every dot is an exact numpy matmul, whatever the setting.)"""
    return 'ieee' if dtype == torch.float32 and EXACT_FLOAT32 else 'tf32'


def _kernel_flags(dtype):
    # The fast sigmoid is a PTX instruction, so the interpreter cannot run it; float32 inputs,
    # the correctness path, keep the exact tl.sigmoid too.
    fast = FAST_SIGMOID and dtype != torch.float32 and not INTERPRET
    return dict(FAST_SIGMOID=fast, DOT_PRECISION=_dot_precision(dtype))


def _strides(*tensors):
    return [s for x in tensors for s in x.stride()[:3]]


def swat_forward(q, k, v, slopes, window, scale, bias, out, config=None):
    """Write the attention output for q, k, v (B, H, T, D) into out; launches the Triton kernel.
    config: an index into the fast configurations, to run that one untimed; None: as PINNED."""
    B, H, T, D = q.shape
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_M']), B * H)
    _forward[grid](q.dtype, config, q, k, v, out, slopes, bias, scale, T, H, min(window, T),
                   *_strides(q, k, v, out), D=D, **_kernel_flags(q.dtype))
    return out


def swat_backward(do, q, k, v, slopes, window, scale, bias, dq, dk, dv, config=None):
    """Write the gradients of q, k, v into dq, dk, dv (dk and dv must share their strides).
    config: as for swat_forward."""
    B, H, T, D = q.shape
    window = min(window, T)
    flags = _kernel_flags(q.dtype)
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_N']), B * H)
    _dkdv[grid](q.dtype, config, q, k, v, do, dk, dv, slopes, bias, scale, T, H, window,
                *_strides(q, k, v, do, dk), D=D, **flags)
    grid = lambda meta: (triton.cdiv(T, meta['BLOCK_M']), B * H)
    _dq[grid](q.dtype, config, q, k, v, do, dq, slopes, bias, scale, T, H, window,
              *_strides(q, k, v, do, dq), D=D, **flags)
    return dq, dk, dv


def swat_decode_forward(q, k, v, keys, values, slot, distance, visible, cos, sin, slopes, scale,
                        bias, out):
    """Write the new token's k, v into slot `slot` of keys, values and swat_decode_reference's
    result for the cache so written into out (B, H, D); k and v must share their strides; cos,
    sin: the back-rotation, or None for none. Launches the decode kernel."""
    B, H, S, D = keys.shape
    rope = cos is not None
    cos, sin = (cos, sin) if rope else (slopes, slopes)     # (unread without RoPE)
    _decode_kernel[(1, B * H)](q, k, v, keys, values, out, slot, distance, visible, cos, sin,
                               slopes, bias, scale, S, H, q.stride(0), q.stride(1), k.stride(0),
                               k.stride(1), *keys.stride()[:3], *values.stride()[:3],
                               out.stride(0), out.stride(1), cos.stride(0) if rope else 0, D=D,
                               BLOCK_S=min(64, triton.next_power_of_2(S)), ROPE=rope,
                               FAST_SIGMOID=_kernel_flags(q.dtype)['FAST_SIGMOID'])
    return out


def token_linear_forward(x, weight, gain, eps, gelu, residual, out):
    """Write residual + gelu(rms_norm(x) @ weight^T) into out (R, N) for x (R, K) and weight
    (N, K) of one dtype; gain: RMSNorm's weight (K,), or None for no norm; residual (R, N) or
    None. Launches the kernel: a column of programs per 4 rows (any number of rows works, made
    for a few), BLOCK_N outputs each: the fastest of the blocks timed for the default model's
    layers at one row on an H200, 4 outputs for a depth of 384 and 2 for 1,536 (RESULTS.md,
    section 5), kept to ~4,096 products a program for more rows or a greater depth."""
    R, K = x.shape
    N = weight.shape[0]
    block_r, block_k = min(4, triton.next_power_of_2(R)), min(2048, triton.next_power_of_2(K))
    block_n = min(4, max(1, 4096 // (block_r * block_k)))
    norm, add = gain is not None, residual is not None
    _token_linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(R, block_r))](
        x, weight, gain if norm else weight, residual if add else out, out, R, N, K, eps,
        x.stride(0), weight.stride(0), residual.stride(0) if add else 0, out.stride(0),
        NORM=norm, GELU=gelu, RESIDUAL=add, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=1)
    return out


# Registered as PyTorch operators so that torch.compile sees one opaque, differentiable call
# instead of breaking its graph at the Triton launch. They are defined through
# torch.library.Library: torch.library.custom_op builds the same operator with about 0.3 ms more
# host time per forward + backward, which is most of the cost of a call at small sizes.

_library = torch.library.Library('nanoswat', 'DEF')
_library.define('swat_attention(Tensor q, Tensor k, Tensor v, Tensor slopes, int window, '
                'float scale, float bias) -> Tensor')
_library.define('swat_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor slopes, '
                'int window, float scale, float bias) -> (Tensor, Tensor, Tensor)')
_library.define('swat_decode(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, '
                'Tensor slot, Tensor distance, Tensor visible, Tensor? cos, Tensor? sin, '
                'Tensor slopes, float scale, float bias) -> Tensor')
_library.define('token_linear(Tensor x, Tensor weight, Tensor? gain, float eps, bool gelu, '
                'Tensor? residual) -> Tensor')


def _empty_like(x):
    # Contiguous, whatever x's strides. The real operators and the fake ones below both take
    # their outputs from here: torch.compile plans with the fake outputs' strides, so the real
    # outputs must have the same.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _forward_op(q, k, v, slopes, window, scale, bias):
    """nanoswat::swat_attention itself: allocate the output and launch the forward kernel."""
    return swat_forward(q, k, v, slopes, window, scale, bias, _empty_like(q))


def _backward_op(do, q, k, v, slopes, window, scale, bias):
    """nanoswat::swat_attention_backward itself: allocate dq, dk, dv, launch the two kernels."""
    return swat_backward(do, q, k, v, slopes, window, scale, bias,
                         *(_empty_like(q) for _ in range(3)))


def _decode_output(q):
    # (B, H, D) for q (B, H, 1, D), contiguous: the real operator and its fake, as _empty_like
    return torch.empty(q.shape[:2] + q.shape[3:], dtype=q.dtype, device=q.device)


def _decode_op(q, k, v, keys, values, slot, distance, visible, cos, sin, slopes, scale, bias):
    """nanoswat::swat_decode itself: allocate the output (B, H, D), launch the decode kernel,
    which also writes k and v into the cache (the schema says so: keys and values are
    mutated, and torch.compile keeps the write in place)."""
    return swat_decode_forward(q, k, v, keys, values, slot, distance, visible, cos, sin, slopes,
                               scale, bias, _decode_output(q))


def _fake_decode(q, k, v, keys, values, slot, distance, visible, cos, sin, slopes, scale, bias):
    """What torch.compile traces the decode step with: an output (B, H, D), no kernel."""
    return _decode_output(q)


def _token_linear_output(x, weight):
    # x (..., K) -> (..., N), contiguous: the real operator and its fake, as _empty_like
    return torch.empty(x.shape[:-1] + weight.shape[:1], dtype=x.dtype, device=x.device)


def _token_linear_op(x, weight, gain, eps, gelu, residual):
    """nanoswat::token_linear itself: the rows of x (..., K) through the kernel, (..., N)."""
    out = _token_linear_output(x, weight)
    rows = lambda t: t.reshape(-1, t.size(-1))              # views: the inputs are contiguous
    token_linear_forward(rows(x), weight, gain, eps, gelu,
                         None if residual is None else rows(residual), rows(out))
    return out


def _fake_token_linear(x, weight, gain, eps, gelu, residual):
    """What torch.compile traces a decode step's linear layer with: its output, no kernel."""
    return _token_linear_output(x, weight)


def _fake_forward(q, k, v, slopes, window, scale, bias):
    """What torch.compile traces the forward with: an output of the right shape, no kernel."""
    return _empty_like(q)


def _fake_backward(do, q, k, v, slopes, window, scale, bias):
    """The same for the backward: dq, dk, dv of the right shape."""
    return tuple(_empty_like(q) for _ in range(3))


def _setup_backward(ctx, inputs, output):
    """Autograd, after the forward: keep what the backward needs, the inputs alone."""
    q, k, v, slopes, ctx.window, ctx.scale, ctx.bias = inputs
    ctx.save_for_backward(q, k, v, slopes)


def _gradients(ctx, do, backward):
    """dq, dk, dv from backward(do, q, k, v, slopes, window, scale, bias); slopes, window, scale
    and bias get no gradient."""
    q, k, v, slopes = ctx.saved_tensors
    dq, dk, dv = backward(do, q, k, v, slopes, ctx.window, ctx.scale, ctx.bias)
    return dq, dk, dv, None, None, None, None


def _autograd_backward(ctx, do):
    """The operator's autograd formula: through the backward operator, which torch.compile
    traces as one opaque call."""
    return _gradients(ctx, do, torch.ops.nanoswat.swat_attention_backward)


_library.impl('swat_attention', _forward_op, 'CompositeExplicitAutograd')
_library.impl('swat_attention_backward', _backward_op, 'CompositeExplicitAutograd')
torch.library.register_fake('nanoswat::swat_attention', _fake_forward)
torch.library.register_fake('nanoswat::swat_attention_backward', _fake_backward)
_library.impl('swat_decode', _decode_op, 'CompositeExplicitAutograd')
torch.library.register_fake('nanoswat::swat_decode', _fake_decode)
_library.impl('token_linear', _token_linear_op, 'CompositeExplicitAutograd')
torch.library.register_fake('nanoswat::token_linear', _fake_token_linear)
torch.library.register_autograd('nanoswat::swat_attention', _autograd_backward,
                                setup_context=_setup_backward)


class _EagerAttention(torch.autograd.Function):
    """The operator's forward and backward called directly, for eager code: the dispatcher's
    path through a Python operator and its registered autograd cost more host time than the
    three launches themselves (RESULTS.md, section 1). torch.compile needs the operator."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, window, scale, bias):
        _setup_backward(ctx, (q, k, v, slopes, window, scale, bias), None)
        return _forward_op(q, k, v, slopes, window, scale, bias)

    @staticmethod
    def backward(ctx, do):
        return _gradients(ctx, do, _backward_op)


def swat_attention(q, k, v, slopes, window, scale=None, bias=0.0):
    """SWAT attention, (B, H, T, D) -> (B, H, T, D), differentiable in q, k and v. bias: the
    constant b inside the sigmoid (0.0, the paper's Eq. 5, has none).

    Runs the fused Triton kernels on CUDA tensors (and on any tensors under TRITON_INTERPRET=1),
    the einsum reference elsewhere. The inputs are held to the fused kernels' limits on every
    device, so what runs on a laptop's CPU also runs on the GPU."""
    check_inputs(q, k, v, slopes, window, bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not (q.is_cuda or INTERPRET):
        return swat_attention_reference(q, k, v, slopes, window, scale, bias)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    attention = (torch.ops.nanoswat.swat_attention if torch.compiler.is_compiling()
                 else _EagerAttention.apply)
    return attention(q, k, v, slopes.to(torch.float32).contiguous(), window, scale, float(bias))


def swat_decode(q, k, v, keys, values, slot, distance, visible, back_rotation, slopes, bias=0.0):
    """Write the new token's key and value k, v (B, H, 1, D) into slot `slot` ((1,) long) of the
    cache's keys and values (B, H, S, D), in place, then Eq. 5 for its query q (B, H, 1, D)
    against the cache so written: (B, H, D) in q's dtype; the other arguments as
    swat_decode_reference's. The decode kernel on CUDA tensors (and on any under
    TRITON_INTERPRET=1), which does the write too; elsewhere the write, then the reference."""
    scale = q.shape[-1] ** -0.5
    if not (q.is_cuda or INTERPRET):
        keys.index_copy_(2, slot, k.to(keys.dtype))
        values.index_copy_(2, slot, v.to(values.dtype))
        return swat_decode_reference(q, keys, values, distance, visible, back_rotation, slopes,
                                     scale, bias).to(q.dtype)
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"keys and values must have stride 1 in their last dimension (got "
                         f"{keys.stride(-1)} and {values.stride(-1)}): the kernel writes the new "
                         f"token into them in place, so pass the cache's own tensors, not copies")
    cos, sin = (None, None) if back_rotation is None else (x.contiguous() for x in back_rotation)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return torch.ops.nanoswat.swat_decode(q, k, v, keys, values, slot, distance, visible, cos,
                                          sin, slopes, scale, float(bias))


TOKEN_LINEAR_ROWS = 4  # at most this many rows go through the kernel; more, through the modules


def token_linear(x, linear, norm=None, gelu=False, residual=None):
    """residual + gelu(linear(norm(x))), each part optional: one linear layer of a decode step,
    x (B, 1, K) -> (B, 1, N), linear an nn.Linear without a bias, norm an nn.RMSNorm with a
    weight. For CUDA tensors of at most TOKEN_LINEAR_ROWS rows one kernel does it all (above);
    otherwise, and for weights of another dtype than x, the modules themselves: at 8 and 64
    rows on an H200 the decode step was faster with cuBLAS's matmuls (and, compiled, the norms
    fused with the adds) than with a tensor-core version of the kernel (RESULTS.md, section 5)."""
    rows = x.numel() // x.size(-1)
    if not (x.is_cuda and x.dtype == linear.weight.dtype and rows <= TOKEN_LINEAR_ROWS):
        y = linear(x if norm is None else norm(x))
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y
    gain, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps          # as nn.RMSNorm's default
    return torch.ops.nanoswat.token_linear(x.contiguous(), linear.weight, gain, eps, gelu,
                                           None if residual is None else residual.contiguous())


def triton_key_function():
    """Triton's function that hashes its own compiler and library into part of the key of every
    kernel in its cache; it computes the hash once per process and keeps it (functools'
    lru_cache). Where Triton keeps the function has moved between versions."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        from triton.compiler.compiler import triton_key
    return triton_key


def warm_up_triton_in_background(imports=False):
    """Start, in a thread, what the first kernel launch of a process waits for, and return the
    thread: join it before the first launch. At that launch Triton hashes itself (triton_key,
    half a gigabyte of files: 0.36 s of the 0.74 s that sample.py's first decode step took on
    an H200 machine, against 3-4 ms of the step's own work; RESULTS.md, section 5), and its
    argument specialisation imports its Gluon language, 0.14 s more. Hashing and reading files
    release the GIL, so the thread runs beside the caller's start-up (reading a checkpoint).
    imports=True imports Gluon in the thread too: only for a caller that imports nothing
    meanwhile, since two threads importing one package's modules at once can each be handed a
    module the other has not finished."""
    def warm_up():
        triton_key_function()()
        if imports:
            try:
                importlib.import_module('triton.experimental.gluon')
            except ImportError:         # a Triton without it: nothing to import ahead
                pass

    thread = threading.Thread(target=warm_up, name='warm-up-triton', daemon=True)
    thread.start()
    return thread
