"""Write the recall benchmark's training data: train.bin, val.bin and their loss masks.

    python data/recall/prepare.py                   # the default preset of recall.py
    python data/recall/prepare.py --preset=tiny     # the toy one
    python data/recall/prepare.py --out_dir=data-copy/recall
    python data/recall/prepare.py --changes='n_pairs=4'   # a variant, as recall.py --changes

The examples are recall.py's (see its docstring), a random mix of its three tasks: passkeys in
text (the filler from data/shakespeare/train.bin here, and from the held-out plays of val.bin
for val.bin) or in random tokens, and multi-query associative recall; and, in the share the
preset's induction_share gives (half, in the default preset), its training-only induction task. Every example
is exactly example_length = block_size + 1 tokens, and the examples are laid end to end.

The files, in the format train.py reads:
- {split}.bin: the token ids, uint16, as every dataset here.
- {split}_mask.bin: one uint8 per token, 1 exactly on the answers, the only tokens the loss
  scores; everything else (the facts, the filler, the questions) is context.
- meta.json: the preset's settings these files were made with (recall.py checks them).

Why whole examples. An answer can only be learnt from a sequence that also holds its fact. If
train.py read sequences at random offsets, a sequence would start inside an example, and every
answer whose fact lies before that start would train the model to guess: an answer d tokens
after its fact loses it in a fraction d / example_length of the sequences that hold it, about
a fifth of all answers here and most of the farthest ones (d = 400: 78%), the very ones the
benchmark is about. So train.py reads these files in whole examples
(--example_length=block_size+1): the inputs are an example's first block_size tokens, the
targets its last block_size, and every fact is in view of its answer.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# recall.py and configurator.py live in the repo root, two levels up: make them importable
# from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from configurator import apply_overrides  # noqa: E402
from recall import (DATA_FIELDS, changed_preset, check_task, make_examples,  # noqa: E402
                    shakespeare_tokens)
from tokenizer import replacing  # noqa: E402
from training import check_folder  # noqa: E402

# -----------------------------------------------------------------------------
preset = 'default'      # a preset of recall.py: the example length, the vocabulary, the counts
changes = ''            # fields of the preset to change, as recall.py --changes takes them
out_dir = HERE          # where to write the files
seed = 0                # the examples' random seed
# -----------------------------------------------------------------------------


def prepare(p, out_dir=HERE, seed=0):
    """Write out_dir/{train,val}.bin, {train,val}_mask.bin and meta.json for the recall.Preset
    p; return {split: (examples, answers)}. The settings and out_dir are checked first; the
    files go to .tmp files and replace the old ones together when all are complete, so an
    interrupted run or a full disk leaves the files that were there (see tokenizer.replacing)."""
    check_task(p)
    if seed < 0:
        raise SystemExit(f"--seed={seed}: expected 0 or more")
    check_folder(out_dir, 'out_dir')
    names = ('train.bin', 'train_mask.bin', 'val.bin', 'val_mask.bin', 'meta.json')
    counts = {}
    with replacing({name: os.path.join(out_dir, name) for name in names}) as write:
        for i, (split, n) in enumerate((('train', p.train_examples), ('val', p.val_examples))):
            rng = np.random.default_rng([seed, i])
            tokens, answers = make_examples(None, rng, n, p, shakespeare_tokens(split))
            write(f'{split}.bin', tokens.astype(np.uint16).tobytes())   # the examples end to end
            write(f'{split}_mask.bin', answers.astype(np.uint8).tobytes())
            counts[split] = (n, int(answers.sum()))
            print(f"{split}: {n:,} examples of {p.example_length} tokens, {counts[split][1]:,} "
                  f"answers -> {split}.bin, {split}_mask.bin")
        write('meta.json', json.dumps({k: getattr(p, k) for k in DATA_FIELDS}).encode())
        # the old record goes before the files are replaced: half-way, it would describe a mix
        meta = os.path.join(out_dir, 'meta.json')
        if os.path.exists(meta):
            os.remove(meta)
    return counts


if __name__ == '__main__':
    apply_overrides(globals(), ['preset', 'changes', 'out_dir', 'seed'])     # --key=value
    prepare(changed_preset(preset, changes), out_dir, seed)
