"""
Sample text from a trained SWAT model (the checkpoint that train.py wrote to out_dir).

    python sample.py
    python sample.py --start="ROMEO:" --num_samples=5 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt
    python sample.py --temperature=0           # greedy: always the most likely token

Each layer keeps a cache of only the last window - 1 keys and values, so long samples cost the
same per token, and the same memory, as short ones; on a GPU each token's step is one replayed
CUDA graph. With one sample the text streams to the
terminal as it is generated; several samples are generated together, as one batch.
--sink_tokens=4 keeps the first 4 tokens in view too (StreamingLLM, for softmax models).
"""

import codecs
import math
import time

import torch

from configurator import apply_overrides
from kernel import warm_up_triton_in_background
from runtime import DTYPES, setup_device_and_precision, synchronize
from swat import SWAT, CheckpointError, checkpoint_path
from tokenizer import gpt2_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'             # where train.py saved ckpt.pt
start = "\n"                # the prompt; or "FILE:path" to read it from a file
num_samples = 3             # how many samples to draw
max_new_tokens = 500        # tokens generated per sample
temperature = 0.8           # < 1.0 sharpens the distribution, > 1.0 flattens it; 0 = greedy
top_k = 200                 # sample among the top_k most likely tokens only; 0 = all tokens
sink_tokens = 0             # keep the first sink_tokens tokens in every layer's view too
seed = 1337                 # of the sampling
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps', ...
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
                            # of the weights and the cache: 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
SEPARATOR = '---------------'   # printed after each sample


def check_settings():
    """Stop with one line for a setting that cannot work, before anything is loaded."""
    if num_samples < 1:
        raise SystemExit(f"num_samples={num_samples}: expected 1 or more samples, e.g. "
                         f"--num_samples=1")
    if max_new_tokens < 0:
        raise SystemExit(f"max_new_tokens={max_new_tokens}: expected 0 or more tokens per sample")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SystemExit(f"temperature={temperature}: expected a finite number >= 0: 1.0 samples "
                         f"the model's own distribution, 0 always picks the most likely token")
    if top_k < 0:
        raise SystemExit(f"top_k={top_k}: expected a number of tokens >= 1, or 0 for all tokens")
    if sink_tokens < 0:
        raise SystemExit(f"sink_tokens={sink_tokens}: expected 0 or more")
    if not 0 <= seed < 2 ** 63:             # what torch.manual_seed takes
        raise SystemExit(f"seed={seed}: expected an integer from 0 to 2**63 - 1")


def read_prompt(start):
    """The prompt: the text of --start, or the contents of the UTF-8 file of --start=FILE:path."""
    if start.startswith('FILE:'):
        path = start[len('FILE:'):]
        try:
            with open(path, encoding='utf-8') as f:
                start = f.read()
        except FileNotFoundError:
            raise SystemExit(f"--start=FILE:{path}: no such file; give the path of a text "
                             f"file, or the prompt itself with --start=TEXT") from None
        except IsADirectoryError:
            raise SystemExit(f"--start=FILE:{path} is a directory; give the path of a text "
                             f"file in it") from None
        except UnicodeDecodeError:
            raise SystemExit(f"--start=FILE:{path} is not UTF-8 text: save the prompt as "
                             f"UTF-8") from None
        except OSError as e:                # no permission, ...
            raise SystemExit(f"--start=FILE:{path}: cannot read it ({e.strerror})") from None
    if not start:
        raise SystemExit("the prompt is empty: give some text with --start=TEXT or "
                         "--start=FILE:path")
    return start


def decode(enc, ids):
    """The text of the token ids. The vocabulary is padded from 50257 to 50304 ids for faster
    matmuls; the padding ids never occur in the training data, so a trained model all but never
    picks them: drop any that come."""
    return enc.decode([i for i in ids if i < enc.n_vocab])


def decode_stream(enc, ids):
    """Yield the text of the token ids piece by piece, as the ids arrive (ids: any iterable of
    ints, e.g. one the model is still generating). The pieces join to decode(enc, ids).

    A token is a sequence of bytes, and it may end in the middle of a multi-byte UTF-8 character:
    GPT-2 splits ' 😀' into the tokens b' \\xf0\\x9f\\x98' and b'\\x80'. Decoding each
    token on its own would print two replacement characters; the incremental decoder instead
    holds the incomplete bytes back until the rest of the character arrives."""
    utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')
    for i in ids:
        if i < enc.n_vocab:                         # padding ids: see decode()
            text = utf8.decode(enc.decode_single_token_bytes(i))
            if text:
                yield text
    text = utf8.decode(b'', final=True)             # bytes of a character that never finished
    if text:
        yield text


def main(args=None):
    """Sample as the settings say; args: the --key=value overrides (default: sys.argv[1:])."""
    apply_overrides(globals(), config_keys, args)
    check_settings()
    # the device before the checkpoint: --device=cuda on a machine without one fails here, clearly
    device_type, _ = setup_device_and_precision(device, dtype)
    # what Triton's first launch (the first token's) would wait for, done while the model loads;
    # nothing else imports meanwhile, so its imports can go in the thread too
    warming = warm_up_triton_in_background(imports=True) if device_type == 'cuda' else None
    enc = gpt2_tokenizer()
    start_ids = enc.encode(read_prompt(start), allowed_special={"<|endoftext|>"})

    torch.manual_seed(seed)
    try:
        model, _ = SWAT.from_checkpoint(out_dir, device)    # in eval mode: no dropout
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    if max(start_ids) >= model.config.vocab_size:
        raise SystemExit(f"the prompt encodes to GPT-2 token ids up to {max(start_ids)}, beyond "
                         f"the vocabulary of the model in {checkpoint_path(out_dir)} (vocab_size="
                         f"{model.config.vocab_size}): sample.py writes and reads GPT-2 tokens, "
                         f"so it needs a model trained on them (vocab_size 50257 or more)")
    # Generation runs in dtype itself (weights and cache), not under autocast: at one token a
    # step the time goes to reading the weights, and bfloat16 weights are half as many bytes.
    model.to(DTYPES[dtype])

    if warming is not None:
        warming.join()
    x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]   # (1, T)
    x = x.expand(num_samples, -1)                                             # (num_samples, T)
    settings = dict(temperature=temperature, top_k=top_k if top_k > 0 else None,
                    sink_tokens=sink_tokens)
    first = []                  # when the first tokens were ready: after the prompt's reading

    def noting_the_first(tokens):
        for i, token in enumerate(tokens):
            if i == 0:
                synchronize(device)
                first.append(time.perf_counter() - t0)
            yield token

    with torch.no_grad():
        synchronize(device)
        t0 = time.perf_counter()
        tokens = noting_the_first(model.generate_tokens(x, max_new_tokens, **settings))
        if num_samples == 1:
            # stream: print each piece of text as soon as its token is sampled
            print(decode(enc, start_ids), end='', flush=True)
            for text in decode_stream(enc, (token.item() for token in tokens)):   # each (1, 1)
                print(text, end='', flush=True)
            print()
            print(SEPARATOR)
        else:
            y = torch.cat([x, *tokens], dim=1)                  # (num_samples, T + max_new_tokens)
            for k in range(num_samples):
                print(decode(enc, y[k].tolist()))
                print(SEPARATOR)
        synchronize(device)
        dt = time.perf_counter() - t0
    # the first tokens wait for the prompt's reading and, on a GPU, for every first use in the
    # process (a prompt of over 64 tokens: the kernels' tuning too); the next step records the
    # step's CUDA graph, and each later one replays it
    after = f" (the first after {first[0]:.2f} s)" if first else ''
    print(f"{num_samples * max_new_tokens} tokens in {dt:.2f} s: "
          f"{num_samples * max_new_tokens / dt:.1f} tokens/s{after}")


if __name__ == '__main__':
    main()
