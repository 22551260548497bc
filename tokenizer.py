"""The GPT-2 tokenizer, built offline from a file shipped in this repo.

tiktoken.get_encoding('gpt2') downloads its BPE table from the internet on
first use. To work without a network we ship that table ourselves as
data/r50k_base.tiktoken ("r50k_base" is tiktoken's name for the GPT-2
vocabulary) and build the very same Encoding from it.

The file is plain text, one BPE token per line: "<base64 bytes> <rank>".
The rank is both the token id and the merge priority (lower merges first).
Its sha256 is checked before use, so a damaged file fails loudly instead of
silently producing a different tokenization.

    >>> enc = gpt2_tokenizer()
    >>> enc.encode_ordinary("Hello world")
    [15496, 995]
"""

import base64
import functools
import hashlib
import os

import tiktoken

RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

EOT = 50256  # <|endoftext|>, the one special token; it separates documents

# GPT-2's pre-tokenizer: the text is first split into chunks (contractions,
# words, numbers, punctuation runs, whitespace) and BPE runs inside each chunk.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path):
    """Read and verify a .tiktoken file; return {token bytes: rank}."""
    fix = "Restore it with `git checkout data/r50k_base.tiktoken`."
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}. {fix}")
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(
            f"GPT-2 tokenizer file {path} is corrupt: sha256 {digest}, "
            f"expected {RANKS_SHA256}. {fix}"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """The GPT-2 tiktoken.Encoding (50,257 tokens), built once and cached."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT,
        mergeable_ranks=load_ranks(RANKS_PATH),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )
