"""
SWAT: a GPT whose attention sees only the last `window` tokens, weighs each of them with an
independent sigmoid instead of a softmax, and tells near from far with balanced ALiBi on top of
RoPE ("Sliding Window Attention Training for Efficient Large Language Models", Fu et al. 2025).

Read top to bottom: config, ALiBi slopes, RoPE, the KV cache, attention, MLP, block, the model,
and generation.
Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H head size, V vocab size.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel import HEAD_SIZES, query_chunks, swat_attention, window_bias

ATTENTION_KINDS = ('sigmoid', 'softmax')
ALIBI_MODES = ('balanced', 'negative', 'positive', 'none')


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
    alibi: str = 'balanced'     # see alibi_slopes
    rope: bool = True
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.attn not in ATTENTION_KINDS:
            raise ValueError(f"attn={self.attn!r} is unknown; choose one of {ATTENTION_KINDS}")
        if self.alibi not in ALIBI_MODES:
            raise ValueError(f"alibi={self.alibi!r} is unknown; choose one of {ALIBI_MODES}")
        for name in ('block_size', 'window', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.rope and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"rope=True needs an even head size, got n_embd/n_head="
                             f"{self.n_embd // self.n_head}; change n_embd or n_head")
        if self.attn == 'sigmoid' and self.n_embd // self.n_head not in HEAD_SIZES:
            raise ValueError(f"attn='sigmoid' supports head sizes {HEAD_SIZES}, got head size "
                             f"{self.n_embd // self.n_head} (n_embd/n_head); change n_embd or n_head")
        if self.alibi == 'balanced' and self.n_head % 2 != 0:
            raise ValueError(f"alibi='balanced' splits the heads in two halves and needs an even "
                             f"n_head, got n_head={self.n_head}; use an even n_head or another "
                             f"alibi mode from {ALIBI_MODES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


# -----------------------------------------------------------------------------
# ALiBi slopes. The attention adds s_h * (m - n) to the logit of query m and key n, where m - n
# is the distance back. With a softmax only differences between keys matter, and a negative
# slope (classic ALiBi) just prefers recent tokens. With a sigmoid every key's weight is set on
# its own, and a head whose slope is negative would let old tokens fade out entirely. SWAT keeps
# half the heads negative (they look at what is near) and gives the other half positive slopes
# (they keep older tokens in the window alive), so the model can still see the whole window.

def alibi_slopes(n_head, mode='balanced'):
    """Per-head slopes, shape (n_head,), float32, in the paper's sign (bias = s_h * (m - n))."""
    if mode == 'balanced':
        if n_head % 2 != 0:
            raise ValueError(f"alibi='balanced' needs an even n_head, got {n_head}")
        half = torch.tensor([2.0 ** -k for k in range(1, n_head // 2 + 1)])
        return torch.cat([-half, half])                 # -1/2, -1/4, ..., then +1/2, +1/4, ...
    if mode in ('negative', 'positive'):
        # standard ALiBi magnitudes 2^(-8h/H), h = 1..H
        magnitudes = torch.tensor([2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)])
        return -magnitudes if mode == 'negative' else magnitudes
    if mode == 'none':
        return torch.zeros(n_head)
    raise ValueError(f"alibi mode {mode!r} is unknown; choose one of {ALIBI_MODES}")


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
# The KV cache for generation. The next query will see itself and the w - 1 tokens before it,
# and no token older than that can ever be seen again: each layer keeps the last w - 1 keys and
# values and drops the rest, so generating the millionth token costs what the hundredth did,
# in time and in memory.
#
# The keys are stored before RoPE. Cached tokens are placed at their index in the cache,
# 0 .. L-1, not at their position in the text: the recent tokens are consecutive, so index
# differences are the true distances, and RoPE and ALiBi see nothing but differences. The
# keys are rotated afresh at every step (the indices shift as old tokens leave), and no angle
# or distance ever exceeds the cache size, so precision does not drift however long the text.

class KVCache:
    """One layer's keys (before RoPE) and values, each (B, H, L, D).

    Keeps the first `sink_tokens` tokens of the text (StreamingLLM's attention sinks, for the
    softmax baseline) and the last window - 1: L <= sink_tokens + window - 1. With
    bounded=False it keeps every token (the attention still applies the window, so the results
    are the same); that only serves to measure what the bound saves."""

    def __init__(self, window, sink_tokens=0, bounded=True):
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens={sink_tokens} must be >= 0")
        self.window = window
        self.sink_tokens = sink_tokens
        self.bounded = bounded
        self.k = self.v = None

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def update(self, k, v):
        """Append the new tokens' k, v (B, H, T, D) and return the whole cache, (B, H, L, D), for
        this step's attention; keep only what later steps can still see."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = (self.trim(k), self.trim(v)) if self.bounded else (k, v)
        return k, v

    def trim(self, x):
        """The sinks (the first entries) and the last window - 1 entries of x, (B, H, L, D)."""
        L = x.size(2)
        s = min(self.sink_tokens, L)
        recent = min(self.window - 1, L - s)
        return torch.cat([x[:, :, :s], x[:, :, L - recent:]], dim=2)


# -----------------------------------------------------------------------------

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


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.window = config.window
        self.attn = config.attn
        self.has_alibi = config.alibi != 'none'    # known here: no need to look at the slopes
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer('slopes', alibi_slopes(config.n_head, config.alibi), persistent=False)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:                                              # (B, H, T, D)
            y = self.cached_attention(q, k, v, rope, cache)
        else:
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            slopes = self.slopes.float()
            if self.attn == 'sigmoid':
                # Each key gets its own weight in (0, 1): no competition between keys, no
                # normaliser, so a weight does not depend on how many other keys are in view.
                y = swat_attention(q, k, v, slopes, self.window)
            else:
                y = softmax_window_attention(q, k, v, slopes if self.has_alibi else None,
                                             self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def cached_attention(self, q, k, v, rope, cache):
        """Attention of T new tokens (q, k, v: (B, H, T, D), before RoPE) to the cache and to
        themselves; rope holds cos and sin for the cache indices 0 .. L-1. Returns (B, H, T, D).

        The same equation as the full forward, written out densely: a chunk of T <= w queries
        against at most sinks + 2w - 1 keys is small, and no T x T matrix ever exists."""
        k, v = cache.update(k, v)                          # (B, H, L, D): the cache, then the T new
        T, L = q.size(2), k.size(2)
        index = torch.arange(L, device=q.device)           # cache indices of the keys
        m = index[L - T:]                                  # ... and of the queries

        def rotate(x, at):                                 # RoPE at the cache indices `at`
            return x if rope is None else apply_rope(x, rope[0][at], rope[1][at])

        scale = 1.0 / math.sqrt(q.size(-1))
        slopes = self.slopes.float()
        k = rotate(k, index)
        logits = scale * (rotate(q, m) @ k.transpose(-2, -1))                 # (B, H, T, L)
        logits = logits + window_bias(L - T, L, 0, slopes, self.window)    # -inf outside the window
        s = min(cache.sink_tokens, L)
        if s > 0:
            # The sinks stay in view after the window has moved past them. StreamingLLM places
            # them just before the window, so a query at index i sees sink j at the distance
            # min(i, s + w - 1) - j. Decoding needs no correction (its one query sits at index
            # s + w - 1 once the cache is full), but a chunk of the prompt does: each of its
            # queries meets the sinks as if the tokens between them had been dropped already.
            at = m.clamp(max=s + self.window - 1)
            distance = (at[:, None] - index[None, :s]).float()                 # (T, s)
            sink_bias = slopes[:, None, None] * distance                        # (H, T, s)
            sink_logits = scale * (rotate(q, at) @ k[:, :, :s].transpose(-2, -1))
            sink_logits = sink_logits + sink_bias.masked_fill(distance < 0, float('-inf'))
            logits = torch.cat([sink_logits, logits[..., s:]], dim=-1)
        weights = torch.sigmoid(logits) if self.attn == 'sigmoid' else F.softmax(logits, dim=-1)
        return weights.to(v.dtype) @ v


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

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


# Peak dense bfloat16 tensor-core FLOP/s of one GPU, from NVIDIA's data sheets (the first name
# found in the device's name counts, so 'H100 PCIe' comes before 'H100'): the denominator of MFU.
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


class SWAT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # No position embedding: positions enter only through RoPE and ALiBi, both relative,
        # so the model can read sequences of any length.
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
        w = min(cfg.window, T)
        keys_per_query = (w * (w + 1) // 2 + (T - w) * w) / T    # sum over m of min(m + 1, w), / T
        attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * keys_per_query
        return 6 * self.get_num_params() + attention

    def estimate_mfu(self, tokens_per_second, T=None, device=None):
        """Model FLOPs utilisation of one GPU training at tokens_per_second on sequences of T
        tokens: the FLOP/s the model needs over the GPU's peak dense bfloat16 FLOP/s. None for
        a GPU whose peak is not in PEAK_BF16_FLOPS (or no GPU)."""
        if device is None or torch.device(device).type != 'cuda':
            return None
        name = torch.cuda.get_device_name(device)
        peak = next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)
        return None if peak is None else self.flops_per_token(T) * tokens_per_second / peak

    def forward(self, idx, targets=None, caches=None):
        """Logits (and the loss, given targets) for the tokens idx (B, T).

        With caches (one KVCache per layer), idx continues the text the caches have seen. The
        tokens are read w at a time, each chunk against the caches, so that no attention matrix
        is larger than w x (sinks + 2w - 1), however long idx is."""
        B, T = idx.size()
        if caches is None:
            x = self.transformer.drop(self.transformer.wte(idx))      # (B, T, C)
            rope = self.rope_table(T, idx.device)
            for block in self.transformer.h:
                x = block(x, rope)
        else:
            x = torch.cat([self.forward_cached(chunk, caches)
                           for chunk in idx.split(self.config.window, dim=1)], dim=1)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)                                   # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])                       # (B, 1, V): last position only
            loss = None
        return logits, loss

    def forward_cached(self, idx, caches):
        """Hidden states (B, T, C) of the tokens idx (B, T), T <= window, that follow the text
        the caches have seen; each layer's cache takes in their keys and values."""
        x = self.transformer.drop(self.transformer.wte(idx))          # (B, T, C)
        # every layer's cache holds the same tokens, so one table of cache indices serves all
        rope = self.rope_table(len(caches[0]) + idx.size(1), idx.device)
        for block, cache in zip(self.transformer.h, caches):
            x = block(x, rope, cache)
        return x

    def rope_table(self, T, device):
        """RoPE's cos and sin for the positions 0 .. T-1, each (T, D); None without RoPE."""
        if not self.config.rope:
            return None
        return rope_cos_sin(torch.arange(T, device=device),
                            self.config.n_embd // self.config.n_head, self.config.rope_base)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (linear layers, embeddings); not the norms' gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=(device_type == 'cuda'))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, sink_tokens=0):
        """Append max_new_tokens tokens to idx (B, T), each sampled from the model. With
        sink_tokens=k the first k tokens stay in view too (StreamingLLM, for softmax models)."""
        new = self.generate_tokens(idx, max_new_tokens, temperature, top_k, sink_tokens)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, sink_tokens=0,
                        bounded=True):
        """Yield max_new_tokens sampled tokens, each (B, 1), one per step, after the prompt idx.

        The prompt is read once, then each step reads only the token just sampled, against a
        cache per layer of at most sink_tokens + window - 1 entries (bounded=False: all)."""
        caches = [KVCache(self.config.window, sink_tokens, bounded) for _ in self.transformer.h]
        for _ in range(max_new_tokens):
            logits, _ = self(idx, caches=caches)        # the prompt, then the newest token
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            probs = F.softmax(logits, dim=-1)
            idx = torch.multinomial(probs, num_samples=1)
            yield idx
