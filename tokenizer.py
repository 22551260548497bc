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
import contextlib
import errno
import functools
import hashlib
import json
import os

import tiktoken

RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "r50k_base.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

EOT = 50256  # <|endoftext|>, the one special token; it separates documents

# GPT-2's pre-tokenizer: the text is first split into chunks (contractions,
# words, numbers, punctuation runs, whitespace) and BPE runs inside each chunk.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path):
    """Read and verify a .tiktoken file; return {token bytes: rank}. A file that is missing or
    damaged stops the script with one line (SystemExit) saying how to restore it."""
    fix = "Restore it with `git checkout data/r50k_base.tiktoken`."
    if not os.path.isfile(path):
        raise SystemExit(f"GPT-2 tokenizer file not found: {path}. {fix}")
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise SystemExit(
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


# -----------------------------------------------------------------------------
# Reading and writing corpora, for the prepare.py scripts. Their mistakes stop the script with
# one line (SystemExit) that names the file, and the line where there is one.

def progress(items, total, desc):
    """tqdm's progress bar if tqdm is installed, else a line every 1% or so."""
    try:
        from tqdm import tqdm
        return tqdm(items, total=total, desc=desc)
    except ImportError:
        def counted():
            every = max(1, total // 100)
            for i, item in enumerate(items, 1):
                yield item
                if i % every == 0 or i == total:
                    print(f"{desc}: {i:,} / {total:,}", flush=True)
        return counted()


def sample_documents(path):
    """Yield (where, row) for each non-blank line of the JSON-lines file at path: row is the
    line's JSON object, which has a string "text"; where is "path, line N", for messages."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise SystemExit(f"--sample={path} {what}: give a JSON-lines file, one "
                         f'{{"text": ...}} per line')
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f'{where}: not JSON ({e.msg}); expected one JSON object per '
                                     f'line, like {{"text": "..."}}') from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise SystemExit(f'{where}: expected a JSON object with a string "text", '
                                     f'like {{"text": "..."}}')
                yield where, row
        except UnicodeDecodeError:
            raise SystemExit(f"{path} is not UTF-8 text: save it as UTF-8") from None


@contextlib.contextmanager
def replacing(paths):
    """Yield write(key, data), which appends the bytes data to the file paths[key] + '.tmp' (all
    of them opened first). When the block ends, every .tmp file is renamed over its path. On any
    error (a bad input, Ctrl-C, a disk that is full or read-only) the .tmp files are removed
    instead and the files at paths stay as they were; a failed write stops with one line."""
    folder = os.path.dirname(next(iter(paths.values()))) or "."
    files = {}

    @contextlib.contextmanager
    def disk():                 # the OSErrors of our files alone (not, say, of a download)
        try:
            yield
        except OSError as e:
            reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SystemExit(f"cannot write to {folder} ({reason}): the files there are as "
                             f"they were; make room, or pass another --out_dir") from None

    def write(key, data):
        with disk():
            files[key].write(data)

    try:
        with disk():
            for key, path in paths.items():
                files[key] = open(path + ".tmp", "wb")
        yield write
        with disk():
            for f in files.values():
                f.close()       # the last bytes go out now: a full disk may show only here
    except BaseException:
        for key, f in files.items():
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.remove(paths[key] + ".tmp")
        raise
    for key, path in paths.items():
        os.replace(path + ".tmp", path)


def write_token_bins(documents, out_dir, batch_size=256):
    """Tokenize ('train' or 'val', text) pairs into out_dir/train.bin and val.bin; return
    {split: (documents, tokens)}.

    The format is nanoGPT's: raw uint16 GPT-2 token ids (every id is < 50257 < 2**16, half the
    size of int32), each document followed by <|endoftext|>. Documents are encoded batch_size at
    a time on all cores. The bins are replaced only when both are complete and neither is empty
    (see replacing): an interrupted run, a bad input, an empty split or a full disk leaves the
    bins that were there as they were, and no .tmp file behind. The .tmp files are opened
    first, so that a folder that takes no files fails at once, before any download."""
    import numpy as np

    if not os.path.isdir(out_dir):
        raise SystemExit(f"--out_dir={out_dir} is not a directory: create it first "
                         f"(mkdir -p {out_dir}) or give another --out_dir")
    enc = gpt2_tokenizer()
    splits = ("train", "val")
    counts = {split: [0, 0] for split in splits}
    threads = os.cpu_count() or 1

    def encode(batch, write):
        for (split, _), ids in zip(batch, enc.encode_ordinary_batch([t for _, t in batch],
                                                                    num_threads=threads)):
            # bytes, not numpy's tofile, which loses the errno of a full disk
            write(split, np.array(ids + [EOT], dtype=np.uint16).tobytes())
            counts[split][0] += 1
            counts[split][1] += len(ids) + 1

    with replacing({split: os.path.join(out_dir, f"{split}.bin") for split in splits}) as write:
        batch = []
        for document in documents:
            batch.append(document)
            if len(batch) == batch_size:
                encode(batch, write)
                batch = []
        if batch:
            encode(batch, write)
        empty = [f"{split}.bin" for split in splits if counts[split][0] == 0]
        if empty:
            read = sum(n for n, _ in counts.values())
            raise SystemExit(f"no documents for {' or '.join(empty)} (of the {read} read): "
                             f"train.bin and val.bin need at least one each; nothing was written")
    for split, (n_documents, n_tokens) in counts.items():
        print(f"{split}: {n_documents:,} documents, {n_tokens:,} tokens -> {split}.bin")
    return {split: tuple(c) for split, c in counts.items()}
