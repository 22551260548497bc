"""Tokenize the shipped Shakespeare plays into train.bin and val.bin.

    python data/shakespeare/prepare.py
    python data/shakespeare/prepare.py --out_dir=data-copy          # the bins elsewhere

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

HERE = os.path.dirname(os.path.abspath(__file__))
# tokenizer.py and configurator.py live in the repo root, two levels up: make them importable
# from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from configurator import apply_overrides  # noqa: E402
from tokenizer import write_token_bins  # noqa: E402

ARCHIVE = os.path.join(HERE, "plays.tar.xz")
VAL_PLAYS = {"hamlet_gut.txt", "lear_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"}

# -----------------------------------------------------------------------------
out_dir = HERE          # where to write train.bin and val.bin
# -----------------------------------------------------------------------------


def read_plays(archive=ARCHIVE):
    """Return {file name: text} for every play in the archive."""
    if not os.path.isfile(archive):
        raise SystemExit(f"no {archive}: restore it with "
                         f"`git checkout data/shakespeare/plays.tar.xz`")
    plays = {}
    with tarfile.open(archive, "r:xz") as tar:  # tarfile uses the stdlib lzma module
        for member in tar.getmembers():
            if member.isfile():
                plays[os.path.basename(member.name)] = tar.extractfile(member).read().decode("utf-8")
    return plays


def prepare(out_dir=HERE):
    """Tokenize the plays into out_dir/{train,val}.bin; return (train tokens, val tokens)."""
    plays = read_plays()
    documents = [("val" if name in VAL_PLAYS else "train", plays[name])
                 for name in sorted(plays)]     # sorted: the output is the same on every machine
    counts = write_token_bins(documents, out_dir, batch_size=64)
    n_train, n_val = counts["train"][1], counts["val"][1]
    print(f"{100 * n_val / (n_train + n_val):.1f}% of the tokens are validation")
    return n_train, n_val


if __name__ == "__main__":
    apply_overrides(globals(), ["out_dir"])     # --key=value
    prepare(out_dir)
