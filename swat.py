"""
SWAT: a GPT whose attention sees only the last `window` tokens, weighs each of them with an
independent sigmoid instead of a softmax, and tells near from far with balanced ALiBi on top of
RoPE ("Sliding Window Attention Training for Efficient Large Language Models", Fu et al. 2025).

Read top to bottom: config, ALiBi slopes, RoPE, attention, MLP, block, the model.
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

def softmax_window_attention(q, k, v, slopes, window, chunk_size=1024):
    """The baseline: softmax sliding-window attention with the same ALiBi term, (B, H, T, D).
    With window >= T and no slopes this is plain causal attention, sent to the fast fused path."""
    T = q.shape[2]
    if window >= T and not slopes.any():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer('slopes', alibi_slopes(config.n_head, config.alibi), persistent=False)

    def forward(self, x, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:                                               # (B, H, T, D)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        slopes = self.slopes.float()
        if self.attn == 'sigmoid':
            # Each key gets its own weight in (0, 1): no competition between keys, no
            # normaliser, so a weight does not depend on how many other keys are in view.
            y = swat_attention(q, k, v, slopes, self.window)
        else:
            y = softmax_window_attention(q, k, v, slopes, self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        x = x + self.mlp(self.ln_2(x))
        return x


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

    def forward(self, idx, targets=None):
        B, T = idx.size()
        x = self.transformer.drop(self.transformer.wte(idx))          # (B, T, C)
        rope = None
        if self.config.rope:
            positions = torch.arange(T, device=idx.device)
            rope = rope_cos_sin(positions, self.config.n_embd // self.config.n_head,
                                self.config.rope_base)
        for block in self.transformer.h:
            x = block(x, rope)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)                                   # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])                       # (B, 1, V): last position only
            loss = None
        return logits, loss

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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens tokens to idx (B, T), sampling each from the model.

        The next token depends only on the last receptive_field tokens, so the context is cropped
        to them: the work per token stays constant however long the text grows."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.receptive_field:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
