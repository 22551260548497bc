"""Download PG-19 and tokenize it into train.bin and val.bin, next to this script.

    python data/pg19/prepare.py                      # everything: 28,602 + 50 books, ~2 GB download
    python data/pg19/prepare.py --max_docs=500       # the first 500 books of each split
    python data/pg19/prepare.py --sample=data/pg19/sample.jsonl   # a local file, no network

PG-19 (Rae et al. 2019) is 28,752 English books from Project Gutenberg published before 1919,
kept whole: on average 69k words, about 90k GPT-2 tokens a book, which is what long-context
evaluation needs. Books are never cut or mixed: train.bin holds the train split, val.bin the
dataset's own validation split (50 books that appear nowhere in train). The test split (100
books) is left alone.

The format is nanoGPT's, the same as data/shakespeare: raw uint16 GPT-2 token ids, each book
followed by <|endoftext|> (50256). The download streams (Hugging Face `datasets`, imported only
when downloading), so memory stays flat; each bin is written to a .tmp file first and renamed at
the end, so an interrupted run never leaves a half-written bin for train.py to pick up.

--sample=path reads a JSON-lines file instead: one book per line, {"text": ..., "split": ...}
with split "train" (the default) or "validation". --out_dir writes the bins elsewhere.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# tokenizer.py and configurator.py live in the repo root, two levels up: make them importable
# from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from configurator import apply_overrides  # noqa: E402
from tokenizer import progress, sample_documents, write_token_bins  # noqa: E402

# deepmind/pg19 is a loading script that downloads from Google Cloud Storage, and `datasets` >= 4
# no longer runs loading scripts; emozilla/pg19 holds the same books and splits as parquet files.
HF_DATASET = "emozilla/pg19"
SPLITS = {"train": "train", "validation": "val"}        # dataset split -> our bin
BOOKS = {"train": 28602, "validation": 50}              # for the progress bar

# -----------------------------------------------------------------------------
sample = ""             # a JSON-lines file to read instead of downloading ("": download)
max_docs = 0            # at most this many books per split (0: all)
out_dir = HERE          # where to write train.bin and val.bin
# -----------------------------------------------------------------------------


def books_from_sample(path, max_docs=0):
    """Yield (bin, text) for each line of a JSON-lines file, at most max_docs per split."""
    seen = {"train": 0, "val": 0}
    for where, row in sample_documents(path):
        hf_split = row.get("split", "train")
        if hf_split not in SPLITS:
            raise SystemExit(f'{where}: "split": {hf_split!r}; expected "train" or '
                             f'"validation" (no "split" means train)')
        split = SPLITS[hf_split]
        if max_docs and seen[split] >= max_docs:
            continue
        seen[split] += 1
        yield split, row["text"]


def books_from_hub(max_docs=0):
    """Yield (bin, text) for every book of the train and validation splits, streamed."""
    from datasets import load_dataset          # only here: the sample path needs no download

    for hf_split, split in SPLITS.items():
        books = load_dataset(HF_DATASET, split=hf_split, streaming=True)
        total = min(max_docs, BOOKS[hf_split]) if max_docs else BOOKS[hf_split]
        for i, row in enumerate(progress(books, total, f"{hf_split} books")):
            if max_docs and i >= max_docs:
                break
            yield split, row["text"]


def prepare(out_dir=HERE, sample="", max_docs=0):
    """Tokenize the books into out_dir/{train,val}.bin; return {bin: (books, tokens)}."""
    if max_docs < 0:
        raise SystemExit(f"--max_docs={max_docs}: expected 0 (all books) or more")
    books = books_from_sample(sample, max_docs) if sample else books_from_hub(max_docs)
    return write_token_bins(books, out_dir, batch_size=64)   # books are long: small batches


if __name__ == "__main__":
    apply_overrides(globals(), ["sample", "max_docs", "out_dir"])     # --key=value
    prepare(out_dir, sample, max_docs)
