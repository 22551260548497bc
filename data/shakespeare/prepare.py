"""Tokenize the shipped Shakespeare plays into train.bin and val.bin.

    python data/shakespeare/prepare.py

Reads plays.tar.xz (next to this script), encodes every text with the GPT-2
tokenizer and writes raw uint16 token ids, the nanoGPT format: load them with
np.memmap(path, dtype=np.uint16, mode='r'). Each play is followed by the
<|endoftext|> token (50256) so that documents stay separable.

Validation holds out four WHOLE plays rather than, say, the last 10% of every
play: a model must then predict text it has never seen any part of, so the
val loss measures generalisation, not memorisation of neighbouring lines.
"""

import os
import sys
import tarfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# tokenizer.py lives in the repo root, two levels up; make it importable from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tokenizer import EOT, gpt2_tokenizer  # noqa: E402

ARCHIVE = os.path.join(HERE, "plays.tar.xz")
VAL_PLAYS = {"hamlet_gut.txt", "lear_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"}


def read_plays(archive=ARCHIVE):
    """Return {file name: text} for every play in the archive."""
    plays = {}
    with tarfile.open(archive, "r:xz") as tar:  # tarfile uses the stdlib lzma module
        for member in tar.getmembers():
            if member.isfile():
                plays[os.path.basename(member.name)] = tar.extractfile(member).read().decode("utf-8")
    return plays


def prepare(out_dir=HERE):
    enc = gpt2_tokenizer()
    splits = {"train": [], "val": []}
    plays = read_plays()
    for name in sorted(plays):  # sorted: the output is the same on every machine
        ids = enc.encode_ordinary(plays[name]) + [EOT]
        split = "val" if name in VAL_PLAYS else "train"
        splits[split].extend(ids)
        print(f"{name:40s} {len(ids):8,d} tokens  {split}")
    for split, ids in splits.items():
        # every GPT-2 id is < 50257 < 2**16, so uint16 holds them at half the size of int32
        np.array(ids, dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}.bin"))
    n_train, n_val = len(splits["train"]), len(splits["val"])
    print(f"train: {n_train:,d} tokens, val: {n_val:,d} tokens "
          f"({100 * n_val / (n_train + n_val):.1f}% val)")
    return n_train, n_val


if __name__ == "__main__":
    prepare()
