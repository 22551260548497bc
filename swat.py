"""
SWAT: a GPT whose attention sees only the last `window` tokens, weighs each of them with an
independent sigmoid instead of a softmax, and tells near from far with balanced ALiBi on top of
RoPE ("Sliding Window Attention Training for Efficient Large Language Models", Fu et al. 2025).

Read top to bottom: the config, ALiBi slopes, RoPE, the KV cache, attention (Eq. 5 of the
paper), MLP, block, the loss, checkpoints, the model, and generation.
Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H head size, V vocab size,
S = the KV cache's slots per layer.
"""

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import (attended_pairs, check_head_size, is_int, is_number, query_chunks,
                    swat_attention, swat_decode, token_linear, window_bias)
from runtime import peak_bf16_flops

ATTENTION_KINDS = ('sigmoid', 'softmax')
ALIBI_MODES = ('balanced', 'balanced_paper_code', 'balanced_gentle', 'negative', 'positive',
               'none')


def check_sink_tokens(sink_tokens):
    if not (is_int(sink_tokens) and sink_tokens >= 0):
        raise ValueError(f"sink_tokens={sink_tokens!r} must be an integer >= 0 (the first "
                         f"tokens kept in view; 0 = none)")


@dataclass
class SWATConfig:
    block_size: int = 512       # training sequence length; not a limit on what the model can read
    window: int = 128           # keys each query sees, itself included (w >= T: causal attention)
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64 for fast matmuls
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    attn: str = 'sigmoid'       # 'sigmoid' is SWAT; 'softmax' is the sliding-window baseline
    sigmoid_bias: bool = False  # True: add b = -log(window) inside the sigmoid (Ramapuram et
                                # al. 2024); the paper's Eq. 5 has none. An experiment; b follows
                                # the window, so a model read with another window reads with
                                # that window's b
    alibi: str = 'balanced'     # see alibi_slopes
    rope: bool = True
    rope_base: float = 10000.0

    def __post_init__(self):
        # Every field is checked here, once, so that a bad setting fails when the config is made
        # (in train.py: before any data is read) with a line that names it.
        for name in ('block_size', 'window', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.attn not in ATTENTION_KINDS:
            raise ValueError(f"attn={self.attn!r} is unknown; choose one of {ATTENTION_KINDS}")
        if not isinstance(self.rope, bool):
            raise ValueError(f"rope={self.rope!r} must be True or False")
        if not isinstance(self.sigmoid_bias, bool):
            raise ValueError(f"sigmoid_bias={self.sigmoid_bias!r} must be True or False")
        if self.sigmoid_bias and self.attn != 'sigmoid':
            # A constant added to every logit cancels in a softmax's normalisation: the run
            # would be the plain baseline under another name.
            raise ValueError(f"sigmoid_bias=True needs attn='sigmoid', got attn={self.attn!r} (a "
                             f"constant added to every softmax logit changes nothing)")
        if not (is_number(self.rope_base) and math.isfinite(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"rope_base={self.rope_base!r} must be a finite number > 0 (the "
                             f"paper and GPT-NeoX use 10000.0)")
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} must be a number in [0, 1) (0.0 turns "
                             f"it off)")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        head_size = self.n_embd // self.n_head
        if self.rope and head_size % 2 != 0:
            raise ValueError(f"rope=True needs an even head size, got n_embd/n_head="
                             f"{head_size}; change n_embd or n_head")
        if self.attn == 'sigmoid':
            check_head_size(head_size, hint=f"attn='sigmoid': n_embd={self.n_embd} / n_head="
                                            f"{self.n_head} gives head size {head_size}; change "
                                            f"n_embd or n_head")
        alibi_slopes(self.n_head, self.alibi)   # raises if the mode or n_head cannot work


# -----------------------------------------------------------------------------
# ALiBi slopes. The attention adds s_h * (m - n) to the logit of query m and key n, where m - n
# is the distance back. With a softmax only differences between keys matter, and a negative
# slope (classic ALiBi) just prefers recent tokens. With a sigmoid every key's weight is set on
# its own, and a head whose slope is negative would let old tokens fade out entirely. SWAT keeps
# half the heads negative (they look at what is near) and gives the other half positive slopes
# (they keep older tokens in the window alive), so the model can still see the whole window.
#
# balanced_gentle is an experiment on the positive half, not yet measured. A slope of +1/2 adds
# 63.5 to the logit of a key 127 tokens back: past the first ten or so keys every weight is
# the sigmoid of a large number, about 1 whatever q . k says, so such a head sums its window
# almost unweighted, and the gradient through p (1 - p) vanishes there. The hypothesis: positive
# slopes 2^-5 .. 2^-(4+H/2), at most about +4 over a window of 128, still favour older tokens
# but leave the choice of keys to q . k. The negative half stays as in Eq. 4.

def alibi_slopes(n_head, mode='balanced'):
    """Per-head slopes, shape (n_head,), float32, in the paper's sign (bias = s_h * (m - n))."""
    if mode in ('balanced', 'balanced_paper_code', 'balanced_gentle'):
        if n_head % 2 != 0:
            raise ValueError(f"alibi={mode!r} splits the heads in two halves and needs an even "
                             f"n_head, got n_head={n_head}; use an even n_head or another alibi "
                             f"mode from {ALIBI_MODES}")
        if mode == 'balanced_paper_code':           # the paper's released code: 2^(-8(i+1)/H)
            half = torch.tensor([2.0 ** (-8.0 * (i + 1) / n_head) for i in range(n_head // 2)])
            return torch.cat([-half, half])
        # Eq. 4: 1/2, 1/4, ..., 2^-(H/2) in each half; gentle: 2^-5, ..., 2^-(4+H/2) positive
        half = torch.tensor([2.0 ** -k for k in range(1, n_head // 2 + 1)])
        positive = half / 16 if mode == 'balanced_gentle' else half
        return torch.cat([-half, positive])         # the negative half first, then the positive
    if mode in ('negative', 'positive'):
        # standard ALiBi magnitudes 2^(-8h/H), h = 1..H
        magnitudes = torch.tensor([2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)])
        return -magnitudes if mode == 'negative' else magnitudes
    if mode == 'none':
        return torch.zeros(n_head)
    raise ValueError(f"alibi={mode!r} is unknown; choose one of {ALIBI_MODES}")


# -----------------------------------------------------------------------------
# RoPE rotates each (x_i, x_{i+D/2}) pair of q and k by an angle proportional to the position,
# so that q_m . k_n depends only on m - n. The angles are computed in float64: a float32
# position * frequency stops being exact for long sequences.

def rope_cos_sin(positions, head_size, base, dtype=torch.float32):
    """cos and sin for the given positions (a 1-D integer tensor), each of shape (T, D)."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, dtype=torch.float64,
                                      device=positions.device) / head_size)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]     # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                           # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (..., T, D) in the rotate-half (GPT-NeoX) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# The KV cache for generation. A query sees itself and the w - 1 tokens before it, and no token
# older than that can ever be seen again. So each layer keeps the keys and values of the last w
# tokens in a ring of w slots: the newest token's key and value are written first, over the one
# token that it can no longer see, and the query then reads every slot. The cache never changes
# size: the millionth token costs what the hundredth did, in time and memory, and the decode
# step, always the same shapes on the same buffers, can be recorded once as a CUDA graph and
# replayed (see generate_tokens).
#
#     slot:     0 .. s-1   s                                  s+w-1
#             [ sinks  ] [ t-3 | t-2 | t-1 |  t  | t-6 | t-5 | t-4 ]   w = 7, query: token t
#                                            ^ token t is written here, over t-7: the one
#                                              token it can no longer see
#
# The keys are stored before RoPE, with the position of their token. RoPE and ALiBi only ever
# see distances: at each step the query stays unrotated (distance 0) and each key is rotated
# back by its distance to the query, 0 .. w-1 (sinks: see below). The angles come from one
# small fixed table, exact however long the text: rotating by absolute positions would lose
# precision once a position no longer fits a float32 exactly (past 2^24).
#
# Sinks (StreamingLLM, for the softmax baseline): the first s tokens stay in slots 0 .. s-1
# forever, and count as if they sat just before the window: a query at position p sees sink j
# at the distance min(p, s + w - 1) - j.

class KVCache:
    """Every layer's keys (before RoPE) and values, k[layer] and v[layer], (B, H, S, D) each, in
    S = sink_tokens + window slots; the position of the token in each slot (-1: empty) and of
    the next token to be read. A tensor per layer, not one for all: a compiled decode step
    writes the new token into each in place, where its writes into slices of one large tensor
    were compiled with copies of the whole of it, every step (at batch 64 on an H200, 130 µs
    of a 480 µs step; RESULTS.md, section 5)."""

    def __init__(self, config, batch_size, sink_tokens, device, dtype):
        check_sink_tokens(sink_tokens)
        self.window, self.sinks = config.window, sink_tokens
        H, D = config.n_head, config.n_embd // config.n_head
        shape = (batch_size, H, sink_tokens + config.window, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slot_position = torch.full(shape[2:3], -1, device=device)      # (S,)
        self.position = torch.zeros((), dtype=torch.long, device=device)    # of the next token
        self.next_slot = torch.zeros(1, dtype=torch.long, device=device)    # the slot it goes to
        # RoPE for every distance a key can have: 0 .. s + w - 1
        self.rope = (rope_cos_sin(torch.arange(sink_tokens + config.window, device=device), D,
                                  config.rope_base) if config.rope else None)

    def slot(self, position):
        """The slot of the token at `position` (a tensor): its sink slot, or its ring slot."""
        ring_slot = self.sinks + (position - self.sinks) % self.window
        return torch.where(position < self.sinks, position, ring_slot)

    def fill(self, layer, k, v):
        """Keep of a prompt's k, v (B, H, T, D) what the next token can see: the sinks and the
        last w - 1 tokens. Every layer calls it; the last one sets the positions."""
        T = k.size(2)
        kept = torch.tensor([p for p in range(T) if p < self.sinks or p > T - self.window],
                            dtype=torch.long, device=k.device)
        slots = self.slot(kept)
        self.k[layer][:, :, slots] = k[:, :, kept].to(self.k[layer].dtype)
        self.v[layer][:, :, slots] = v[:, :, kept].to(self.v[layer].dtype)
        if layer == len(self.k) - 1:
            self.slot_position[slots] = kept
            self.position.fill_(T)

    def next_token(self):
        """Make room for the token at self.position: its slot now holds it. Return, for its
        query, the distance back to the token of each slot and which slots it sees (filled
        ones: the ring holds the last w tokens, all inside the window), (S,) each, and the
        rotation that takes each slot's key back by its distance, (cos, -sin), (S, D) each
        (None without RoPE): one table for every layer."""
        p = self.position
        self.next_slot.copy_(self.slot(p).view(1))
        self.slot_position.index_copy_(0, self.next_slot, p.view(1))
        sink_distance = p.clamp(max=self.sinks + self.window - 1) - self.slot_position[:self.sinks]
        distance = torch.cat([sink_distance, p - self.slot_position[self.sinks:]])
        visible = self.slot_position >= 0
        if self.rope is None:
            return distance, visible, None
        at = distance.clamp(max=len(self.rope[0]) - 1)    # (empty slots: any angle, unseen)
        return distance, visible, (self.rope[0][at], -self.rope[1][at])

    def write(self, layer, k, v):
        """Write the newest token's k, v (B, H, 1, D) into its slot (see next_token); for the
        softmax baseline: the sigmoid's decode kernel writes them itself."""
        self.k[layer].index_copy_(2, self.next_slot, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.next_slot, v.to(self.v[layer].dtype))


# -----------------------------------------------------------------------------
# Attention. The sigmoid attention of the training forward is one call to the fused kernel;
# next to it: the softmax baseline, and the sinks the KV cache keeps, for reading a whole text.

def softmax_window_attention(q, k, v, slopes, window, chunk_size=1024):
    """The baseline: softmax sliding-window attention with the same ALiBi term, (B, H, T, D).
    slopes=None means no ALiBi; then with window >= T this is plain causal attention, sent to
    the fast fused path."""
    T = q.shape[2]
    if slopes is None:
        if window >= T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        slopes = torch.zeros(q.shape[1], device=q.device)
    outputs = []
    for m0, m1, n0 in query_chunks(T, window, chunk_size):
        bias = window_bias(m0, m1, n0, slopes, window).to(q.dtype)     # (H, M, N), -inf outside
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, m0:m1], k[:, :, n0:m1], v[:, :, n0:m1], attn_mask=bias))
    return torch.cat(outputs, dim=2)


def attention_with_sinks(q, k, v, cos_sin, slopes, window, sinks, kind, bias=0.0, chunk_size=256):
    """StreamingLLM's attention sinks, for reading a text with the sinks the KV cache keeps:
    each query m sees its window and the first `sinks` tokens, placed just before the window
    (at the distance min(m, sinks + w - 1) - j for sink j). q, k: (B, H, T, D) before RoPE;
    cos_sin: RoPE's (cos, sin) for positions 0 .. T-1, or None; bias: the constant b inside the
    sigmoid (kind='sigmoid'). Written out densely, a chunk of queries at a time: the sinks are
    an evaluation option of the softmax baseline, not a path that needs the fused kernel."""
    T, scale = q.size(2), q.size(-1) ** -0.5
    sinks = min(sinks, T)                           # a text shorter than the sinks: all sinks

    def rotate(x, positions):                       # RoPE at the given positions
        return x if cos_sin is None else apply_rope(x, cos_sin[0][positions], cos_sin[1][positions])

    k_rotated = rotate(k, torch.arange(T, device=q.device))
    outputs = []
    for m0, m1, n0 in query_chunks(T, window, chunk_size):
        n0 = min(max(n0, sinks), m1)                # the sinks' own columns come first, apart
        m = torch.arange(m0, m1, device=q.device)
        at = m.clamp(max=sinks + window - 1)        # where a sink thinks the query is
        sink_distance = (at[:, None] - torch.arange(sinks, device=q.device)).float()   # (M, s)
        sink_bias = (slopes[:, None, None] * sink_distance).masked_fill(sink_distance < 0,
                                                                      float('-inf'))
        sink_logits = rotate(q[:, :, m0:m1], at) @ k_rotated[:, :, :sinks].transpose(-2, -1)
        window_logits = rotate(q[:, :, m0:m1], m) @ k_rotated[:, :, n0:m1].transpose(-2, -1)
        logits = torch.cat([scale * sink_logits + sink_bias, scale * window_logits +
                            window_bias(m0, m1, n0, slopes, window)], dim=-1)
        weights = torch.sigmoid(logits + bias) if kind == 'sigmoid' else F.softmax(logits, dim=-1)
        values = torch.cat([v[:, :, :sinks], v[:, :, n0:m1]], dim=2)
        outputs.append(weights.to(v.dtype) @ values)
    return torch.cat(outputs, dim=2)


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.window = config.window
        self.kind = config.attn                     # 'sigmoid' or 'softmax'
        # b inside the sigmoid. With b = -log(w) a window of w keys whose logits are all 0 sums
        # to w / (w + 1), about one key's worth, as a softmax would: each weight starts near
        # 1 / w instead of 1/2, so the output does not grow with the window (Ramapuram et al.)
        self.logit_bias = -math.log(config.window) if config.sigmoid_bias else 0.0
        self.has_alibi = config.alibi != 'none'
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer('slopes', alibi_slopes(config.n_head, config.alibi), persistent=False)

    def forward(self, x, cos_sin, sink_tokens=0, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). cos_sin: RoPE's (cos, sin) for positions 0 .. T-1, or None
        (rope=False). With a cache (a prompt before generation), its layer takes k and v."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                                                    # (B, H, T, D)
            cache.fill(layer, k, v)
        slopes = self.slopes.float()
        if sink_tokens > 0:
            y = attention_with_sinks(q, k, v, cos_sin, slopes, self.window, sink_tokens, self.kind,
                                     self.logit_bias)
        else:
            if cos_sin is not None:
                q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
            if self.kind == 'sigmoid':
                # Eq. 5, for every query m at once:
                #   o_m = sum over n in [m-w+1, m] of sigmoid(q_m . k_n / sqrt(D) + s_h (m-n)) v_n
                # q_m . k_n of the RoPE'd q and k (rotated just above), scaled by 1 / sqrt(D); s_h
                # the head's slope (self.slopes) times the distance back m - n; with
                # sigmoid_bias, b = -log(w) (self.logit_bias) is added inside the sigmoid too;
                # keys outside the window or in the future weigh exactly 0. Each key gets its
                # own weight in (0, 1): no competition between keys, no normaliser, so a weight
                # does not depend on how many other keys are in view. The fused kernel computes
                # the sum in O(T * w); swat_attention_reference in kernel.py is the same in
                # einsums, and decode() below writes it out for one query.
                y = swat_attention(q, k, v, slopes, self.window, bias=self.logit_bias)
            else:
                y = softmax_window_attention(q, k, v, slopes if self.has_alibi else None,
                                             self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode(self, qkv, cache, layer, distance, visible, back_rotation):
        """The attention of one new token per row to the cache's layer, itself included, written
        out as Eq. 5: qkv (B, 1, 3C), its c_attn output, -> (B, 1, C), before c_proj (Block.decode
        applies both); distance, visible and back_rotation come from cache.next_token()."""
        B, C = qkv.size(0), qkv.size(2) // 3
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, 1, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        keys, values = cache.k[layer], cache.v[layer]                       # (B, H, S, D)
        if self.kind == 'sigmoid':
            # o = sum over the slots n of sigmoid(q . k_n / sqrt(D) + s_h * d_n + b) * v_n, d_n
            # the distance back to slot n's token, k_n rotated back by it: on a GPU one fused
            # kernel per layer, which also writes k and v into their slot (cache.write's work),
            # elsewhere the write and then the reference (kernel.py)
            y = swat_decode(q, k, v, keys, values, cache.next_slot, distance, visible,
                            back_rotation, self.slopes, self.logit_bias)   # (B, H, D)
        else:
            cache.write(layer, k, v)
            if back_rotation is not None:   # rotate each key back by its distance to the query
                keys = apply_rope(keys, *back_rotation)
            # One query against S keys is too small for a matmul to pay: as products and sums
            # in float32 (exact products, as a matmul's), compiled, they fuse with the rotation
            # above and the weights below into a few kernels instead of a matmul launch each.
            logits = q.size(-1) ** -0.5 * (q.float() * keys.float()).sum(-1)   # (B, H, S)
            bias = self.slopes.float()[:, None] * distance                  # s_h * (m - n)
            weights = F.softmax(logits + bias.masked_fill(~visible, float('-inf')), dim=-1)
            y = (weights[..., None] * values.float()).sum(-2)               # (B, H, D)
        return y.reshape(B, 1, C).to(qkv.dtype)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, sink_tokens=0, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos_sin, sink_tokens, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x

    def decode(self, x, cache, layer, distance, visible, back_rotation):
        """forward for one new token per row, x (B, 1, C), against the cache. Each linear layer,
        with the norm before it and the GELU or the residual add after it, is one call of
        token_linear: on a GPU one kernel where the separate operations were two or three
        launches of a few µs each, the time of a decode step (RESULTS.md, section 5)."""
        qkv = token_linear(x, self.attn.c_attn, norm=self.ln_1)                 # (B, 1, 3C)
        y = self.attn.decode(qkv, cache, layer, distance, visible, back_rotation)
        x = token_linear(y, self.attn.c_proj, residual=x)          # x + attn(ln_1(x))
        h = token_linear(x, self.mlp.c_fc, norm=self.ln_2, gelu=True)           # (B, 1, 4C)
        return token_linear(h, self.mlp.c_proj, residual=x)        # x + mlp(ln_2(x))


# -----------------------------------------------------------------------------
# The loss, without the logits. The output layer turns each of N positions into V = 50,304
# logits: for 32,768 training tokens that is 6.6 GB in float32, more than the whole model, and
# the loss needs only one row at a time. So the rows go through in chunks: each chunk's logits
# give its share of the loss and, right away, the gradient of that share with respect to the
# logits, (softmax - one_hot(target)) / n. Two matmuls turn that into the chunk's gradients of
# x and of the output weight, and the logits are dropped. The backward then only scales the
# stored gradients: the same three matmuls as the plain loss, and memory for one chunk.

FUSED_LOSS = True   # on a GPU, each chunk's elementwise work is compiled into a few fused passes
                    # (torch.compile, at the first call); False: eager, as on a CPU
# Rows a chunk. In training each chunk also adds its share into the float32 gradient of the
# output weight, a read and a write of all V x C of it (0.3 GB at 768 wide), so fewer, larger
# chunks are faster (RESULTS.md, section 2); 4,096 rows of 16-bit logits are 0.4 GB. Evaluation
# has no weight gradient, and takes its logits in float32.
TRAINING_CHUNK, EVALUATION_CHUNK = 4096, 1024


def chunk_loss_(logits, targets, weights):
    """The weighted sum of the rows' cross-entropies, for logits (M, V) in float32, targets (M,)
    and weights (M,), 0 for a row not scored; and each row's sum of exp(logit - max), (M,).
    In place: logits is left holding those exps."""
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    top = logits.amax(dim=-1, keepdim=True)                    # (M, 1): for a safe exp
    sum_exp = logits.sub_(top).exp_().sum(dim=-1)              # (M,)
    lse = sum_exp.log() + top[:, 0]                            # log-sum-exp of each row
    return torch.where(weights != 0, (lse - target_logit) * weights, 0.0).sum(), sum_exp


def chunk_loss_and_grad_(logits, targets, weights):
    """chunk_loss_ of logits (M, V), in float32 whatever their dtype, and its gradient with
    respect to them, (softmax - one_hot(target)) * weight, written over the logits, in their
    dtype: a chunk needs one (M, V) buffer, not two."""
    grad = logits.float()                                   # (logits itself, if float32)
    loss, sum_exp = chunk_loss_(grad, targets, weights)
    grad = grad.div_(sum_exp[:, None])                                       # softmax, in place
    if torch.compiler.is_compiling():
        # Compiled, the one-hot is a comparison with each column: the softmax, the one-hot, the
        # weights and the cast become one pass over the chunk (a scatter would end that pass, its
        # float32 result written out and read back). A row without a target (-1) matches none.
        is_target = torch.arange(grad.size(1), device=grad.device) == targets[:, None]
        grad = torch.where(is_target, grad - 1.0, grad)
    else:
        # Eagerly, the comparison would be passes over the whole chunk (several times slower on
        # a CPU); a scatter touches one element per row.
        grad.scatter_add_(1, targets.clamp(min=0)[:, None],
                          torch.full_like(sum_exp[:, None], -1.0))           # - one_hot(target)
    grad = grad.mul_(weights[:, None])
    return loss, grad if logits.dtype == torch.float32 else logits.copy_(grad)


@functools.cache
def compiled(function):
    """torch.compile(function), made once, at the first use: importing torch's compiler costs
    a second or more, which a script on a CPU need not pay."""
    return torch.compile(function)


def add_product_(total, a, b):
    """total += a @ b, for total in float32. On a GPU with 16-bit a, the matmul adds its float32
    sums into total itself: no 16-bit product rounded, written out, read back and converted."""
    if total.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast('cuda', enabled=False):     # autocast would round total to 16 bits
            torch.addmm(total, a, b.to(a.dtype), out_dtype=torch.float32, out=total)
    else:
        total += (a @ b).float()


class ChunkedCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size):
        scored = targets != -1                                   # -1: a position not scored
        weights = scored / scored.sum()                          # each scored row's share: 1/n
        loss_and_grad = compiled(chunk_loss_and_grad_) if FUSED_LOSS and x.is_cuda \
            else chunk_loss_and_grad_
        loss = torch.zeros((), device=x.device)
        grad_x, grad_weight = torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)
        for i in range(0, x.size(0), chunk_size):
            rows = slice(i, i + chunk_size)
            logits = x[rows] @ weight.t()                                    # (chunk, V)
            chunk_loss, grad = loss_and_grad(logits, targets[rows], weights[rows])
            loss += chunk_loss
            grad_x[rows] = grad @ weight.to(x.dtype)
            add_product_(grad_weight, grad.t(), x[rows])     # grad_weight += grad.t() @ x[rows]
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None


def chunked_cross_entropy(x, weight, targets, chunk_size=None, max_targets=None):
    """F.cross_entropy(x @ weight.T, targets, ignore_index=-1), exactly, values and gradients,
    holding the logits of chunk_size rows at a time (None: TRAINING_CHUNK with gradients,
    EVALUATION_CHUNK without). x (N, C), weight (V, C), targets (N,).

    max_targets: a bound the caller knows, that at most this many targets are scored (not -1),
    e.g. from the data's loss mask (train.py). Only that many rows then go through the output
    layer: the scored ones, moved first by a stable sort. A row without a target costs no logits,
    and the shapes stay fixed, as a CUDA graph needs. A bound that does not hold drops targets."""
    if max_targets is not None and max_targets < x.size(0):
        rows = torch.argsort(targets == -1, stable=True)[:max_targets]     # the scored first
        x, targets = x[rows], targets[rows]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(x, weight, targets, chunk_size or TRAINING_CHUNK)
    chunk_size = chunk_size or EVALUATION_CHUNK
    # Evaluation: no gradients to keep, so in float32 one buffer takes every chunk's logits in
    # turn, instead of a fresh 200 MB (and its page faults) per chunk.
    scored = targets != -1
    weights = scored / scored.sum()
    total = torch.zeros((), device=x.device)
    reuse = (x.dtype == weight.dtype == torch.float32
             and not torch.is_autocast_enabled(x.device.type))
    buffer = torch.empty(min(chunk_size, x.size(0)), weight.size(0), device=x.device) if reuse \
        else None
    for i in range(0, x.size(0), chunk_size):
        rows = slice(i, i + chunk_size)
        if reuse:
            logits = torch.mm(x[rows], weight.t(), out=buffer[:len(x[rows])])
        else:
            logits = (x[rows] @ weight.t()).float()
        total += chunk_loss_(logits, targets[rows], weights[rows])[0]
    return total


# -----------------------------------------------------------------------------
# The model's input: token ids, checked before they index the embedding (where a bad id would
# give an opaque error, or on a GPU a device-side assert).

def check_token_ids(name, ids, vocab_size, check_range=True, targets=False):
    """Raise a ValueError, one line naming what was given and the fix, unless ids is a (B, T)
    integer tensor of ids in [0, vocab_size). targets=True also allows -1 (a position the loss
    ignores) and asks for int64, which cross_entropy needs. check_range=False skips the range."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be (B, T) token ids, a tensor; got a {type(ids).__name__}: "
                         f"pass torch.tensor({name})")
    if ids.dim() != 2:
        fix = f"add a batch dimension, {name}[None]" if ids.dim() == 1 else "give a 2-D tensor"
        raise ValueError(f"{name} must be (B, T) token ids; got shape {tuple(ids.shape)}: {fix}")
    if ids.dtype not in ((torch.int64,) if targets else (torch.int64, torch.int32)):
        raise ValueError(f"{name} must hold integer token ids, dtype torch.int64; got {ids.dtype}: "
                         f"convert with {name}.long()")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty, (B, T) = {tuple(ids.shape)}: give at least one token")
    if check_range:
        low, high = (x.item() for x in torch.aminmax(ids))
        if low < (-1 if targets else 0) or high >= vocab_size:
            allowed = f"0 .. {vocab_size - 1}" + (", or -1 to ignore a position" if targets else "")
            raise ValueError(f"{name} holds ids from {low} to {high}; expected {allowed} "
                             f"(vocab_size={vocab_size}): encode with the model's tokenizer")


# -----------------------------------------------------------------------------
# Checkpoints: what train.py saves, read back with one clear line for each way a file can be bad.

class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


def checkpoint_path(path):
    """out_dir -> out_dir/ckpt.pt; a path to a file stays as it is."""
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path


def load_checkpoint(path, device='cpu', required=('model', 'model_args'), option='--out_dir'):
    """The dict train.py saved at path (an out_dir or its ckpt.pt), with its tensors on device.
    Raises CheckpointError, one line that names the file and the fix, for a checkpoint that is
    missing, not a file, empty, truncated, corrupt, or lacks any of the `required` entries.
    `option` is the caller's setting that names the checkpoint, for the messages."""
    ckpt_path = checkpoint_path(path)
    if not os.path.exists(ckpt_path):
        raise CheckpointError(f"no checkpoint at {ckpt_path}: train a model first with "
                              f"`python train.py` (or point {option} at the folder with ckpt.pt)")
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"{ckpt_path} is not a file: move it away, or point {option} at "
                              f"the folder that holds the real ckpt.pt")
    if os.path.getsize(ckpt_path) == 0:
        raise CheckpointError(f"{ckpt_path} is empty (a save that never finished?): restore it "
                              f"from a copy, or train again into a new out_dir")
    try:
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:          # truncated zip, not a torch file, unpickling refused, ...
        raise CheckpointError(f"cannot read the checkpoint {ckpt_path}: it is truncated, corrupt "
                              f"or not a torch file ({type(e).__name__}); restore it from a copy, "
                              f"or train again into a new out_dir") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{ckpt_path} lacks {missing}: it was not written by this project's "
                              f"train.py; train again into a new out_dir")
    return checkpoint


class SWAT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # No position embedding: positions enter only through RoPE and ALiBi, both relative,
        # so the model can read sequences of any length. The module names are GPT-2's (wte,
        # c_attn, c_proj, ln_f, ...), as in nanoGPT, so that its readers find their way.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight      # tied input and output embeddings
        self.apply(self._init_weights)
        # scaled init of the projections into the residual stream (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    @property
    def receptive_field(self):
        """How far back the last token can see through all layers: 1 + (w - 1) * n_layer."""
        return 1 + (self.config.window - 1) * self.config.n_layer

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward) per token on sequences of T tokens (default:
        block_size): the numerator of the model FLOPs utilisation (MFU).

        Weights: each takes part in one multiply-add (2 FLOPs) per token forward and two
        backward (the gradients of the input and of the weight): 6 FLOPs per parameter, as in
        nanoGPT. The tied embedding counts once, for the output layer; the lookup is free.
        Attention: per layer, head and visible key, q.k and p.v cost 4 * D FLOPs forward, 12 * D
        with the backward. The query at position m sees min(m + 1, w) keys, so the count grows
        with T * w, not T^2 (and a full causal model is counted as causal: T(T+1)/2 pairs).
        Work an implementation redoes (the sigmoid kernel recomputes q.k in its backward) is not
        counted: MFU measures the model's FLOPs, not the kernel's."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        keys_per_query = attended_pairs(T, cfg.window) / T       # sum over m of min(m + 1, w), / T
        attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * keys_per_query
        return 6 * self.get_num_params() + attention

    def estimate_mfu(self, tokens_per_second, T=None, device=None):
        """Model FLOPs utilisation of one GPU training at tokens_per_second on sequences of T
        tokens: the FLOP/s the model needs over the GPU's peak dense bfloat16 FLOP/s. None for
        a GPU whose peak is not known (runtime.peak_bf16_flops), or no GPU."""
        peak = peak_bf16_flops(device)
        return None if peak is None else self.flops_per_token(T) * tokens_per_second / peak

    def forward(self, idx, targets=None, sink_tokens=0, max_targets=None):
        """For the tokens idx (B, T): (logits (B, 1, V) of the last position, None) without
        targets, as nanoGPT does at inference; (None, the mean loss over all positions) with
        targets (B, T), where a target of -1 is not scored. The loss never holds all the logits:
        see chunked_cross_entropy, and its max_targets, a bound on the scored targets of the
        batch; for the logits of every position, lm_head(hidden_states). sink_tokens=k keeps
        the first k tokens in view too (StreamingLLM, see KVCache)."""
        x = self.hidden_states(idx, sink_tokens)                       # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None           # (B, 1, V): the last position only
        self.check_ids(targets, targets=True, like=idx)
        if max_targets is not None and not (is_int(max_targets) and max_targets >= 1):
            raise ValueError(f"max_targets={max_targets!r} must be an integer >= 1, a bound on "
                             f"the batch's scored targets, or None")
        C = x.size(-1)
        return None, chunked_cross_entropy(x.reshape(-1, C), self.lm_head.weight, targets.view(-1),
                                           max_targets=max_targets)

    def hidden_states(self, idx, sink_tokens=0, cache=None):
        """The last layer's output, normalised, for every position of idx (B, T): (B, T, C).
        With a cache (a prompt before generation), each layer's keys and values fill it."""
        self.check_ids(idx)
        check_sink_tokens(sink_tokens)
        x = self.transformer.drop(self.transformer.wte(idx))          # (B, T, C)
        cos_sin = self.rope_table(idx.size(1), idx.device)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cos_sin, sink_tokens, cache, layer)
        return self.transformer.ln_f(x)

    def check_ids(self, ids, targets=False, like=None):
        """Token ids (or targets, which may be -1) of the right shape, dtype and range, or a
        ValueError that says what is wrong. Shapes and dtypes cost nothing to check. The range
        needs the min and max: on a GPU, reading those waits for the GPU to catch up (a sync) at
        every training step, so it is checked for CPU tensors only (on a GPU, the ids train.py
        and eval.py read come from the tokenizer, in range by construction; generate checks its
        prompt on any device), and not while torch.compile traces (a data-dependent branch)."""
        name = 'targets' if targets else 'idx'
        check_range = (isinstance(ids, torch.Tensor) and ids.is_cpu
                       and not torch.compiler.is_compiling())
        check_token_ids(name, ids, self.config.vocab_size, check_range, targets=targets)
        if like is not None and ids.shape != like.shape:
            raise ValueError(f"targets must have the shape of idx, {tuple(like.shape)}; got "
                             f"{tuple(ids.shape)}")

    def rope_table(self, T, device):
        """RoPE's cos and sin for the positions 0 .. T-1, each (T, D); None without RoPE."""
        if not self.config.rope:
            return None
        return rope_cos_sin(torch.arange(T, device=device),
                            self.config.n_embd // self.config.n_head, self.config.rope_base)

    @classmethod
    def from_checkpoint(cls, path, device='cpu', **overrides):
        """The model saved by train.py at path (an out_dir or its ckpt.pt), on device, in eval
        mode, and the checkpoint it came from. `overrides` change config fields that the weights
        do not depend on (window, dropout, ...): e.g. window=4096 reads with a wider window."""
        checkpoint = load_checkpoint(path, device)
        ckpt_path = checkpoint_path(path)
        try:
            model = cls(SWATConfig(**{**checkpoint['model_args'], **overrides}))
        except (TypeError, ValueError) as e:        # an unknown field, a value SWATConfig refuses
            raise CheckpointError(f"{ckpt_path}: its model_args do not make a model ({e}); it was "
                                  f"written by another version or program: train again into a "
                                  f"new out_dir") from None
        try:
            model.load_state_dict(checkpoint['model'])
        except (RuntimeError, TypeError) as e:      # torch names what is missing or mis-shaped
            details = ' '.join(str(e).split())      # its list spans lines; the message is one
            raise CheckpointError(f"the weights in {ckpt_path} do not fit the model its "
                                  f"model_args describe ({details}); it was written by another "
                                  f"version or program: train again into a new out_dir") from None
        return model.to(device).eval(), checkpoint

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (linear layers, embeddings); not the norms' gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=(device_type == 'cuda'))

    # -------------------------------------------------------------------------
    # Generation: read the prompt once, then one token at a time against the KV cache.

    def new_cache(self, batch_size, sink_tokens=0, device=None):
        """An empty KVCache for batch_size rows, on the model's device, in its dtype."""
        weight = self.lm_head.weight
        return KVCache(self.config, batch_size, sink_tokens, device or weight.device, weight.dtype)

    def prefill(self, idx, cache):
        """Read the prompt idx (B, T) in one ordinary forward (the fused kernel on a GPU), fill
        the cache with what later tokens can see, and return the next token's logits (B, V)."""
        x = self.hidden_states(idx, cache.sinks, cache)
        return self.lm_head(x[:, -1])

    def decode(self, token, cache):
        """Read one token per row, token (B, 1), at the cache's position; return the logits of
        the next one (B, V). The same shapes and buffers every time: see generate_tokens. As
        evaluation reads the model, without dropout, whatever model.training says."""
        distance, visible, back_rotation = cache.next_token()   # one table for every layer
        x = self.transformer.wte(token)                                 # (B, 1, C)
        for layer, block in enumerate(self.transformer.h):
            x = block.decode(x, cache, layer, distance, visible, back_rotation)
        cache.position += 1
        # The output layer stays two launches, the norm and cuBLAS's matmul: its 38.6 MB of
        # weights (at the default size) are read at the memory's speed, 8.7 µs on an H200,
        # where the versions of token_linear's kernel timed took 13.9 µs at best (RESULTS.md,
        # section 5).
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, sink_tokens=0):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model (see
        generate_tokens for the arguments); max_new_tokens=0 returns (a copy of) the prompt."""
        new = self.generate_tokens(idx, max_new_tokens, temperature, top_k, sink_tokens)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, sink_tokens=0,
                        cuda_graph=True, compile=False):
        """Yield max_new_tokens sampled tokens, each (B, 1), one per step, after the prompt idx.

        temperature divides the logits: 1 samples the model's distribution, below 1 sharpens
        it, above 1 flattens it, and 0 always picks the most likely token (greedy). top_k=k
        samples among the k most likely tokens only; None among all. With sink_tokens=k the
        first k tokens stay in view too (StreamingLLM, for softmax models).

        On a GPU the decode step (every layer, and the sampling) is recorded as one CUDA graph
        after its first run and replayed for every later token: one launch instead of hundreds
        of small kernels, each queued by Python. cuda_graph=False runs it eagerly, as a CPU does.
        compile=True first compiles the decode step (torch.compile): its elementwise work (the
        cache's tables, the sampling, and beyond token_linear's 4 rows the norms, GELU and the
        residual adds) fused into fewer kernels (on an H200 1.08x the tokens/s at batch 1, 1.17x
        at 8, 1.14x at 64; RESULTS.md section 5). The compiling takes seconds, once per batch
        size and process, more than a few hundred tokens gain: it pays for long generations."""
        # checked once for the whole generation: the one sync of the range check costs nothing
        check_token_ids('idx', idx, self.config.vocab_size)
        if not (is_int(max_new_tokens) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        if not (is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0: 1 samples "
                             f"the model's distribution, 0 picks the most likely token")
        if top_k is not None and not (is_int(top_k) and top_k >= 1):
            raise ValueError(f"top_k={top_k!r} must be an integer >= 1, the number of most likely "
                             f"tokens to sample from; top_k=None samples from all tokens")
        cache = self.new_cache(idx.size(0), sink_tokens, idx.device)
        if max_new_tokens == 0:
            return
        # one graph of the whole step, no Python between the layers; the cache's attributes
        # never change (only their contents), so one compile serves every cache of a batch size
        decode = torch.compile(self.decode, fullgraph=True, dynamic=False) if compile \
            else self.decode

        def step(token):
            return sample(decode(token, cache), temperature, top_k)

        if cuda_graph and idx.is_cuda:
            step = CUDAGraphStep(step)
        if idx.size(1) <= SHORT_PROMPT:
            # (B, 1) each, laid out as a sampled token is: a compiled step would recompile for a
            # view of another stride; what it samples before the prompt's end is dropped
            for prompt_token in idx.t().contiguous()[..., None]:
                token = step(prompt_token)
        else:
            token = sample(self.prefill(idx, cache), temperature, top_k)
        yield token
        for _ in range(max_new_tokens - 1):
            token = step(token)
            yield token


# A prompt of at most SHORT_PROMPT tokens is read by the decode step itself, a token at a time:
# on a GPU whose Triton cache is empty the fused training kernel's first launch compiles and
# times its candidates, seconds (a first sample.py: its first token after 4.4 s, against 1.7 s
# read by steps; RESULTS.md, section 5). Longer prompts go through prefill, one forward.
SHORT_PROMPT = 64


def sample(logits, temperature, top_k):
    """One token per row of logits (B, V), as (B, 1), drawn on the device without a sync.
    argmax(logits / temperature + Gumbel noise) is a draw from softmax(logits / temperature)
    (the Gumbel-max trick): no normalisation, and no multinomial, which a CUDA graph cannot hold.
    With top_k=k the draw is among the k largest logits alone: they are selected first (no sort
    of all V), in the logits' own dtype (bfloat16 needs half the selection passes of float32),
    and the noise is drawn for those k, not for all V."""
    if temperature == 0:                                # the limit of ever lower temperatures
        return logits.argmax(dim=-1, keepdim=True)
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, sorted=False)      # (B, k) each
    logits = logits.float()
    gumbel = -torch.log(-torch.log(torch.rand_like(logits)))
    # argmax(logits / T + gumbel) is argmax(logits + T * gumbel): scale by whichever of 1 / T and
    # T is at most 1, so that nothing overflows (logits / 1e-45 is inf in float32). A T whose
    # noise vanishes next to the logits then gives the greedy token, the limit as T -> 0.
    if temperature < 1:
        choice = (logits + temperature * gumbel).argmax(dim=-1, keepdim=True)
    else:
        choice = (logits / temperature + gumbel).argmax(dim=-1, keepdim=True)
    return choice if ids is None else ids.gather(-1, choice)   # the column's token id


class CUDAGraphStep:
    """step(*inputs) -> a tensor, run eagerly the first time, then recorded as a CUDA graph and
    replayed: one launch instead of hundreds of small kernels, each queued by Python. step may
    only read and write tensors that stay in place (the KV cache, a model's weights and its
    optimizer's state do); its inputs are copied into the recorded ones at every call. For a
    decode step (generate_tokens) and a whole training step (train.py)."""

    def __init__(self, step):
        self.step, self.graph = step, None

    def __call__(self, *inputs):
        if self.graph is not None:
            for recorded, x in zip(self.inputs, inputs):
                recorded.copy_(x)
            self.graph.replay()
            return self.output.clone()
        # The first step runs for real, on a side stream: a graph must be recorded after one
        # ordinary run (lazy initialisation, compilation, autotuning, cuBLAS workspaces, an
        # optimizer's first state), and off the default stream; autograd's backward runs on the
        # stream of its forward, so the run and the recording share that side stream.
        # Autocast's cache of cast weights would live outside the graph: it is off for the
        # recording, and for the first run too, so that a compiled step sees the same settings
        # both times (torch.compile would compile it again, while recording, if they changed).
        def no_autocast_cache():
            return torch.autocast('cuda', enabled=torch.is_autocast_enabled('cuda'),
                                  dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), no_autocast_cache():
            output = self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        # Recording runs nothing: the kernels of one step, on these buffers, are only noted down.
        self.inputs, self.graph = [x.clone() for x in inputs], torch.cuda.CUDAGraph()
        with no_autocast_cache(), torch.cuda.graph(self.graph, stream=side):
            self.output = self.step(*self.inputs)
        return output
