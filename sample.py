"""
Sample text from a trained SWAT model (the checkpoint that train.py wrote to out_dir).

    python sample.py
    python sample.py --start="ROMEO:" --num_samples=5 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt

Each layer keeps a cache of only the last window - 1 keys and values, so long samples cost the
same per token, and the same memory, as short ones. With one sample the text streams to the
terminal as it is generated; several samples are generated together, as one batch.
--sink_tokens=4 keeps the first 4 tokens in view too (StreamingLLM, for softmax models).
"""

import codecs
import os
import time
from contextlib import nullcontext

import torch

from configurator import apply_overrides
from swat import SWAT, SWATConfig
from tokenizer import gpt2_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'             # where train.py saved ckpt.pt
start = "\n"                # the prompt; or "FILE:path" to read it from a file
num_samples = 3             # how many samples to draw
max_new_tokens = 500        # tokens generated per sample
temperature = 0.8           # < 1.0 sharpens the distribution, > 1.0 flattens it
top_k = 200                 # sample among the top_k most likely tokens only; 0 = all tokens
sink_tokens = 0             # keep the first sink_tokens tokens in every layer's view too
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False             # torch.compile the per-token forward (faster once compiled)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
apply_overrides(globals(), config_keys)     # --key=value from the command line
# -----------------------------------------------------------------------------

if dtype not in ('float32', 'bfloat16', 'float16'):
    raise SystemExit(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
if sink_tokens < 0:
    raise SystemExit(f"sink_tokens={sink_tokens}: expected 0 or more")
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type,
                                                                  dtype=ptdtype)

# the prompt
if start.startswith('FILE:'):
    with open(start[len('FILE:'):], 'r', encoding='utf-8') as f:
        start = f.read()
if not start:
    raise SystemExit("the prompt is empty: give some text with --start=TEXT or --start=FILE:path")
enc = gpt2_tokenizer()
start_ids = enc.encode(start, allowed_special={"<|endoftext|>"})


def decode(ids):
    # The vocabulary is padded from 50257 to 50304 ids for faster matmuls. The padding ids never
    # occur in the training data, so a trained model all but never picks them; drop any that come.
    return enc.decode([i for i in ids if i < enc.n_vocab])


# the model, rebuilt from the checkpoint
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
if not os.path.exists(ckpt_path):
    raise SystemExit(f"no checkpoint at {ckpt_path}: train a model first with `python train.py` "
                     f"(or point --out_dir at the folder that holds ckpt.pt)")
checkpoint = torch.load(ckpt_path, map_location=device)
model = SWAT(SWATConfig(**checkpoint['model_args']))
model.load_state_dict(checkpoint['model'])
model.eval()                                # no dropout
model.to(device)
if compile:
    # Generation calls forward_cached once per token, so that is what to compile. The caches
    # grow while they fill: compile for dynamic shapes, not once for every cache length.
    model.forward_cached = torch.compile(model.forward_cached, dynamic=True)

# generate
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]   # (1, T)
x = x.expand(num_samples, -1)                                             # (num_samples, T)
settings = dict(temperature=temperature, top_k=top_k if top_k > 0 else None,
                sink_tokens=sink_tokens)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


with torch.no_grad():
    with ctx:
        sync()
        t0 = time.perf_counter()
        if num_samples == 1:
            # Stream: print each token as it comes. A token may end in the middle of a multi-byte
            # UTF-8 character; the incremental decoder holds such bytes back until the character
            # is complete.
            utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
            print(decode(start_ids), end='', flush=True)
            for token in model.generate_tokens(x, max_new_tokens, **settings):
                i = token.item()
                if i < enc.n_vocab:                 # see decode()
                    print(utf8.decode(enc.decode_single_token_bytes(i)), end='', flush=True)
            print(utf8.decode(b'', final=True))
            print('---------------')
        else:
            y = model.generate(x, max_new_tokens, **settings)
            for k in range(num_samples):
                print(decode(y[k].tolist()))
                print('---------------')
        sync()
        dt = time.perf_counter() - t0
print(f"{num_samples * max_new_tokens} tokens in {dt:.2f} s: "
      f"{num_samples * max_new_tokens / dt:.1f} tokens/s")
