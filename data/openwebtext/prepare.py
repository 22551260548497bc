"""Download OpenWebText and tokenize it into train.bin and val.bin, next to this script.

    python data/openwebtext/prepare.py                   # everything: 8M documents, ~9B tokens, ~18 GB of bins
    python data/openwebtext/prepare.py --max_docs=100000 # the first 100k documents
    python data/openwebtext/prepare.py --sample=data/openwebtext/sample.jsonl   # local, no network

OpenWebText (Gokaslan and Cohen, 2019) is an open re-creation of GPT-2's WebText: the text of
web pages linked from Reddit posts with at least 3 karma, 8,013,769 documents. Documents are
short (about 1,100 GPT-2 tokens on average), so it is a corpus for training, not for reading
one long text; PG-19 (data/pg19) is the one with long documents.

It has only a train split. Like nanoGPT we hold out about 0.05% for validation, as whole
documents: every 2000th document (the 1st, the 2001st, ...) goes to val.bin, the rest to
train.bin. The format is nanoGPT's, the same as data/shakespeare: raw uint16 GPT-2 token ids,
each document followed by <|endoftext|> (50256). The download streams (Hugging Face `datasets`,
imported only when downloading), so memory stays flat; each bin is written to a .tmp file first
and renamed at the end, so an interrupted run never leaves a half-written bin behind.

--sample=path reads a JSON-lines file instead: one document per line, {"text": ...}.
--out_dir writes the bins elsewhere.
"""

import itertools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# tokenizer.py and configurator.py live in the repo root, two levels up: make them importable
# from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from configurator import apply_overrides  # noqa: E402
from tokenizer import progress, sample_documents, write_token_bins  # noqa: E402

HF_DATASET = "Skylion007/openwebtext"
DOCUMENTS = 8013769                         # for the progress bar
VAL_EVERY = 2000                            # every 2000th document is validation: ~0.05%

# -----------------------------------------------------------------------------
sample = ""             # a JSON-lines file to read instead of downloading ("": download)
max_docs = 0            # at most this many documents (0: all)
out_dir = HERE          # where to write train.bin and val.bin
# -----------------------------------------------------------------------------


def texts_from_sample(path):
    """Yield the "text" of each line of a JSON-lines file."""
    for _, row in sample_documents(path):
        yield row["text"]


def texts_from_hub(max_docs=0):
    """Yield the text of every document, streamed."""
    from datasets import load_dataset      # only here: the sample path needs no download

    documents = load_dataset(HF_DATASET, split="train", streaming=True)
    total = min(max_docs, DOCUMENTS) if max_docs else DOCUMENTS
    for row in progress(documents, total, "documents"):
        yield row["text"]


def prepare(out_dir=HERE, sample="", max_docs=0):
    """Tokenize the documents into out_dir/{train,val}.bin; return {bin: (documents, tokens)}."""
    if max_docs < 0:
        raise SystemExit(f"--max_docs={max_docs}: expected 0 (all documents) or more")
    texts = texts_from_sample(sample) if sample else texts_from_hub(max_docs)
    documents = (("val" if i % VAL_EVERY == 0 else "train", text)
                 for i, text in enumerate(itertools.islice(texts, max_docs or None)))
    return write_token_bins(documents, out_dir, batch_size=1024)


if __name__ == "__main__":
    apply_overrides(globals(), ["sample", "max_docs", "out_dir"])     # --key=value
    prepare(out_dir, sample, max_docs)
