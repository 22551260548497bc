"""
The plumbing of train.py, as plain functions of their arguments: the checks, the data, the
checkpoint files, the random state, the stop signals and the learning-rate schedule. train.py
keeps the training itself; everything here can be tested in process, without launching it.

train.py runs the checks before it builds anything, so that a mistake costs a second and one
line, not a traceback after minutes of training (or, worse, a run that trains the wrong thing
without a word). Each stops with SystemExit(message), the message saying what was given, what
is expected and what to do.
"""

import contextlib
import errno
import hashlib
import math
import os
import runpy
import signal
import sys
import tempfile
import threading
import warnings

import numpy as np
import torch

from swat import CheckpointError, load_checkpoint


def check_settings(settings):
    """Stop on a setting of train.py that would crash training later or silently spoil it."""
    def stop(key, expected):
        raise SystemExit(f"--{key}={settings[key]}: expected {expected}")

    if settings['init_from'] not in ('scratch', 'resume'):
        stop('init_from', "'scratch' or 'resume'")
    for key in ('batch_size', 'gradient_accumulation_steps', 'eval_iters', 'eval_interval',
                'log_interval'):
        if settings[key] < 1:               # counts of things that each step needs at least one of
            stop(key, "1 or more")
    # a negative count of steps means nothing; a negative rate (or decay) climbs the loss
    for key in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr',
                'weight_decay'):
        if settings[key] < 0:
            stop(key, "0 or more")
    if settings['grad_clip'] < 0:           # clip_grad_norm_ would flip the gradient's sign
        stop('grad_clip', "0 (no clipping) or the norm to clip the gradient at, e.g. 1.0")
    for key in ('beta1', 'beta2'):
        if not 0 <= settings[key] < 1:      # AdamW's decay rates: 1 divides by zero
            stop(key, "a value in [0, 1), e.g. 0.9 or 0.95")
    if not 0 <= settings['seed'] < 2 ** 63:     # torch.manual_seed(seed + rank) takes < 2**64
        stop('seed', "an integer from 0 to 2**63 - 1")
    # (lr_decay_iters < warmup_iters is fine: get_lr goes from the warmup straight to min_lr)


def micro_batches_per_process(total, world_size):
    """(total, per_process) for gradient_accumulation_steps=total over world_size processes.

    Every process must take the same number of micro-batches per optimizer step (DDP averages
    the gradients once per step, over all of them), so a total that is not a multiple of
    world_size is rounded up to the next one: 1 on 8 GPUs becomes 8, one micro-batch each."""
    per_process = -(-total // world_size)  # ceil(total / world_size), in integers
    return per_process * world_size, per_process


def check_folder(folder, setting):
    """Make folder if need be, and make sure that files can be written in it: before any work,
    not when the results are ready. Else stop with one line naming --setting, the option that
    gave the folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"{folder!r} is a file, not a folder: pass another --{setting}")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):   # a file made and removed: we can write
            pass
    except OSError as e:                    # a file on the way, no permission, read-only disk
        raise SystemExit(f"cannot write to {folder!r} ({e.strerror or e}): pass a --{setting} "
                         f"you can write to") from None


def check_out_dir(out_dir, init_from):
    """Make out_dir if needed and make sure that a checkpoint can be written there, before any
    training; refuse to train from scratch over a checkpoint that is already there."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if os.path.exists(ckpt_path) and not os.path.isfile(ckpt_path):
        raise SystemExit(f"{ckpt_path} is not a file, so no checkpoint can be saved there: "
                         f"move it away, or pass another --out_dir")
    if init_from == 'scratch' and os.path.exists(ckpt_path):
        raise SystemExit(f"{ckpt_path} exists and training from scratch would overwrite it: "
                         f"continue it with --init_from=resume, or pass another --out_dir")
    check_folder(out_dir, 'out_dir')


def write_failure(error):
    """Why a write failed, in a few words, for an OSError: 'disk full', or the system's words."""
    return 'disk full' if error.errno == errno.ENOSPC else (error.strerror or str(error))


def save_checkpoint_file(checkpoint, path):
    """torch.save(checkpoint, path) without ever leaving a broken file at path.

    Write a temporary file next to it, force it onto the disk, then rename it over path: the
    rename is atomic, so a crash mid-save leaves the previous checkpoint intact, never half a
    file. If the save fails (a full disk), remove the half-written file and stop."""
    tmp_path = path + '.tmp'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)             # of no use, and it takes the space that is missing
        # torch.save reports a failed write as a RuntimeError, raised while handling the OSError
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise                           # not the disk: a bug, with its traceback
        raise SystemExit(f"cannot save the checkpoint {path} ({write_failure(error)}); the "
                         f"previous one there, if any, is intact: make room (or pick another "
                         f"--out_dir, with ckpt.pt copied over) and continue with "
                         f"--init_from=resume") from None


def on_the_cpu(state):
    """A copy of state (tensors in dicts, lists and tuples) with every tensor copied to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to('cpu', copy=True)
    if isinstance(state, dict):
        return type(state)((key, on_the_cpu(value)) for key, value in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(on_the_cpu(value) for value in state)
    return state


class CheckpointWriter:
    """Checkpoints written while training goes on. write(checkpoint, path) copies the state to
    the CPU, and a thread writes the file with save_checkpoint_file, the slow part (the default
    model and its optimizer state, ~360 MB forced onto the disk: 0.5-0.9 s on an H200 machine)
    while the next steps run. Only one write is ever in flight: the next
    write() and finish() wait for it first, and re-raise its failure (a full disk: SystemExit
    with its one line). The thread is not a daemon, so even a run that stops on an error ends
    only after the file it was writing is complete."""

    def __init__(self):
        self.thread, self.error = None, None

    def write(self, checkpoint, path):
        self.finish()
        checkpoint = on_the_cpu(checkpoint)
        self.thread = threading.Thread(target=self._write, args=(checkpoint, path))
        self.thread.start()

    def _write(self, checkpoint, path):
        try:
            save_checkpoint_file(checkpoint, path)
        except BaseException as e:          # SystemExit included: raised in the main thread
            self.error = e

    def finish(self):
        """Wait for the write in flight, if any; raise what made it fail."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error


def non_finite(state, name=''):
    """The name of the first floating-point tensor of state (a state_dict: tensors in dicts and
    lists) that holds a NaN or an infinity, e.g. 'model.lm_head.weight'; None if there is none."""
    if isinstance(state, torch.Tensor):
        return name if state.is_floating_point() and not torch.isfinite(state).all() else None
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        for key, value in items:
            found = non_finite(value, f"{name}.{key}" if name else str(key))
            if found:
                return found
    return None


def check_token_file(path, block_size, vocab_size, example_length=0):
    """Stop unless path is a file of uint16 token ids (2 bytes each), at least block_size + 1
    of them (a sequence and its targets, shifted by one; block_size=0: at least one), all below
    vocab_size; with example_length > 0 (see get_batch), a whole number of examples of that many
    tokens, each long enough for a sequence and its targets. Every script that reads a .bin
    checks it so, before any work. One pass over the file; returns the number of tokens."""
    if example_length and example_length < block_size + 1:    # (a negative one too)
        raise SystemExit(f"--example_length={example_length}: expected 0 (sequences at any "
                         f"offset) or the length of the corpus's examples, at least block_size "
                         f"+ 1 = {block_size + 1} (data/recall: --example_length="
                         f"{block_size + 1})")
    prepare_script = os.path.join(os.path.dirname(path), 'prepare.py')
    remake = (f"make it again with python {prepare_script}" if os.path.isfile(prepare_script)
              else "make it again")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is not a file: {remake}")
    size = os.path.getsize(path)
    if size == 0 or size % 2:
        raise SystemExit(f"{path} has {size} bytes: expected a file of uint16 token ids, a "
                         f"positive, even number of bytes; {remake}")
    data = np.memmap(path, dtype=np.uint16, mode='r')
    if len(data) < block_size + 1:
        raise SystemExit(f"block_size={block_size} is too large for {path}, which holds "
                         f"{len(data)} tokens (a batch needs block_size + 1): pass a smaller "
                         f"--block_size")
    if example_length and len(data) % example_length:
        raise SystemExit(f"{path} holds {len(data)} tokens, not a whole number of examples of "
                         f"--example_length={example_length} ({len(data) % example_length} "
                         f"left over): pass the example length the data was made with, or "
                         f"--example_length=0")
    largest = int(data.max())
    if largest >= vocab_size:               # the embedding lookup would fail mid-training
        raise SystemExit(f"{path} holds the token id {largest}, but the model has "
                         f"vocab_size={vocab_size}: it was made by another tokenizer, or the "
                         f"model's vocab_size is too small; {remake}")
    return len(data)


def mask_path(token_path):
    """data/<dataset>/train.bin -> data/<dataset>/train_mask.bin: the file of its loss mask."""
    return token_path[:-len('.bin')] + '_mask.bin'


def check_mask_file(token_path, n_tokens, block_size, example_length=0, chunk=1 << 24):
    """If token_path has a loss mask (see get_batch), stop unless it holds one byte, 0 or 1, per
    token, and every sequence get_batch may read scores at least one of its block_size targets
    (a batch that scores none would have a NaN loss, and stop training as diverged): with
    example_length=0 every run of block_size targets, else every example's targets, its
    positions 1 .. block_size (n_tokens a multiple of example_length: check_token_file checks);
    between examples, the unscored gaps may be longer than block_size. One pass, in chunks."""
    path = mask_path(token_path)
    if not os.path.exists(path):
        return
    if not os.path.isfile(path) or os.path.getsize(path) != n_tokens:
        size = f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "not a file"
        raise SystemExit(f"{path} is {size}, but {token_path} holds {n_tokens} tokens: expected "
                         f"a loss mask of one byte (0 or 1) per token; make both files again")
    mask = np.memmap(path, dtype=np.uint8, mode='r')
    largest_gap, last_one = 0, 0            # between scored targets; mask[0] is never a target
    step = max(1, chunk // example_length) * example_length if example_length else chunk
    for start in range(0 if example_length else 1, n_tokens, step):
        part = mask[start:start + step]
        if part.max() > 1:
            raise SystemExit(f"{path} holds the byte {int(part.max())}: a loss mask holds 0 (not "
                             f"scored) or 1 (scored) per token; make it again")
        if example_length:                  # whole examples: every one must score a target
            empty = np.flatnonzero(~part.reshape(-1, example_length)[:, 1:block_size + 1]
                                   .any(axis=1))
            if len(empty):
                k = start // example_length + int(empty[0])
                raise SystemExit(f"{path} scores no target of example {k} (tokens "
                                 f"{k * example_length + 1}..{k * example_length + block_size} "
                                 f"with --example_length={example_length}), so its sequence "
                                 f"would score none (a NaN loss): make the files again with an "
                                 f"answer in every example, or pass the data's --example_length")
            continue
        ones = np.flatnonzero(part) + start
        if len(ones):
            gaps = np.diff(ones, prepend=last_one)     # from the last scored target before
            largest_gap = max(largest_gap, int(gaps.max()))
            last_one = ones[-1]
    if example_length:
        return
    largest_gap = max(largest_gap, n_tokens - last_one)
    if largest_gap > block_size:            # a run of block_size unscored targets somewhere
        raise SystemExit(f"{path} scores no target in {largest_gap - 1} tokens in a row, so a "
                         f"sequence of block_size={block_size} may score none (a NaN loss): "
                         f"score more tokens, pass a larger --block_size, or read a corpus "
                         f"of examples whole (--example_length)")


def most_scored_targets(token_path, block_size, example_length=0, chunk=1 << 24):
    """The most targets that one sequence get_batch may read from token_path scores, by its loss
    mask (see get_batch); None without a mask, when every target is. A bound, for the loss to
    build the logits of scored rows only (SWAT.forward's max_targets). One pass, in chunks."""
    path = mask_path(token_path)
    if not os.path.exists(path):
        return None
    mask = np.memmap(path, dtype=np.uint8, mode='r')
    if example_length:                      # a sequence: positions 1 .. block_size of an example
        step = max(1, chunk // example_length) * example_length
        return max(int(mask[start:start + step].reshape(-1, example_length)[:, 1:block_size + 1]
                       .sum(axis=1, dtype=np.int64).max()) for start in range(0, len(mask), step))
    # at any offset: the targets of a sequence are any block_size bytes in a row of mask[1:];
    # each chunk carries the last block_size - 1 bytes before it, for the runs across its start
    most, carry = 0, mask[:0]
    for start in range(1, len(mask), chunk):
        part = np.concatenate([carry, mask[start:start + chunk]])
        if len(part) >= block_size:
            sums = np.concatenate([[0], np.cumsum(part, dtype=np.int64)])
            most = max(most, int((sums[block_size:] - sums[:-block_size]).max()))
        carry = part[max(0, len(part) - block_size + 1):]
    return most


def prepare_optimizer(optimizer, cuda_graph, device):
    """Ready optimizer for a CUDA graph that records its step (cuda_graph=True), or for eager
    steps. A recorded step reads the learning rate from a tensor on the GPU, which
    set_learning_rate overwrites before each replay; and the recording checks the flag
    `capturable`, which changes nothing of what fused AdamW computes (so its warning about steps
    run outside a graph does not apply). A checkpoint's optimizer state may hold either form."""
    for group in optimizer.param_groups:
        lr = float(group['lr'])
        group['lr'] = torch.tensor(lr, device=device) if cuda_graph else lr
        group['capturable'] = cuda_graph
    if cuda_graph:
        warnings.filterwarnings('ignore', message='This instance was constructed with capturable')


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        if isinstance(group['lr'], torch.Tensor):
            group['lr'].fill_(lr)           # in place: where a recorded step reads it
        else:
            group['lr'] = lr


def get_batch(data_dir, split, key, seed, block_size, batch_size, micro_step=0, micro_batches=1,
              device='cpu', example_length=0):
    """Micro-batch micro_step (batch_size sequences x, targets y) of the batch called `key` of
    data_dir/{split}.bin.

    The whole batch, micro_batches * batch_size random windows of the corpus, comes from a
    generator seeded by (seed, split, key) alone: the same arguments give the same tokens in
    every run and every process. So a resumed run reads exactly the batches the uninterrupted
    run would have read, and the DDP ranks can share out one batch without talking.

    example_length > 0: the corpus is a sequence of examples of that many tokens (at least
    block_size + 1), and every window starts at one, so that no sequence cuts an example
    (data/recall: a fact and the answer that needs it stay together).

    With a loss mask data_dir/{split}_mask.bin (one uint8 per token), token i is scored as a
    target only where mask[i] == 1: y[b, j] = data[i] for i = start_b + 1 + j, or -1 (which the
    model's loss ignores) where mask[i] == 0."""
    # Re-open the memmap for every batch: a memmap kept open grows in memory as pages are read.
    path = os.path.join(data_dir, f'{split}.bin')
    data = np.memmap(path, dtype=np.uint16, mode='r')
    # a hash, so that neighbouring seeds or steps give unrelated generators
    digest = hashlib.sha256(repr((seed, split, key)).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little'))
    if example_length > 0:                  # the start of a random example
        ix = torch.randint(len(data) // example_length, (micro_batches * batch_size,),
                           generator=generator) * example_length
    else:
        ix = torch.randint(len(data) - block_size, (micro_batches * batch_size,),
                           generator=generator)
    ix = ix[micro_step * batch_size:(micro_step + 1) * batch_size]
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if os.path.exists(mask_path(path)):
        mask = np.memmap(mask_path(path), dtype=np.uint8, mode='r')
        scored = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + block_size] == 1) for i in ix])
        y[~scored] = -1
    if torch.device(device).type == 'cuda':
        # pinned memory lets the copy to the GPU run asynchronously, overlapped with compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def prepare_dataset(data_dir, ddp):
    """Make data_dir/{train,val}.bin with data_dir/prepare.py if either is missing."""
    bin_paths = [os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')]
    missing = [p for p in bin_paths if not os.path.exists(p)]
    if not missing:
        return
    dataset, prepare_script = os.path.basename(data_dir), os.path.join(data_dir, 'prepare.py')
    if not os.path.exists(prepare_script):
        raise SystemExit(f"dataset {dataset!r} lacks {' and '.join(missing)}, and there is no "
                         f"{prepare_script} to make it")
    if ddp:                                 # not N processes writing the same files at once
        raise SystemExit(f"dataset {dataset!r} is not tokenized yet: run python {prepare_script} "
                         f"first")
    print(f"dataset {dataset!r} is not tokenized yet: running {prepare_script}")
    saved_argv = sys.argv
    sys.argv = [prepare_script]             # the script must not see our --key=value arguments
    try:
        runpy.run_path(prepare_script, run_name='__main__')
    finally:
        sys.argv = saved_argv


# -----------------------------------------------------------------------------
# resuming

def load_for_resume(ckpt_path, device):
    """The checkpoint train.py saved at ckpt_path, or SystemExit(one line naming the file) if it
    is missing, empty, truncated, corrupt, or not one of train.py's."""
    try:
        return load_checkpoint(ckpt_path, device, required=(
            'best_val_loss', 'iter_num', 'model', 'model_args', 'optimizer'))
    except CheckpointError as e:
        raise SystemExit(str(e)) from None


def merge_model_args(saved, given, changeable=('dropout',)):
    """(args, messages): the model settings of a resumed run. The weights fix the model's shape
    and kind, so the checkpoint's `saved` settings win over the `given` ones of the command line,
    except those in `changeable`; messages say which given values were overruled. A setting the
    checkpoint lacks (one added since it was written) keeps its given value."""
    args, messages = dict(given), []
    for k, v in saved.items():
        if k in changeable:
            continue
        if k in given and given[k] != v:
            messages.append(f"{k}={v!r} from the checkpoint (ignoring {k}={given[k]!r})")
        args[k] = v                         # (an unknown key stays, for SWATConfig to refuse)
    return args, messages


def changed_settings(saved_config, config, ignore=('init_from',)):
    """'key old -> new' for each setting of config that differs from the checkpoint's."""
    return [f"{k} {v!r} -> {config[k]!r}" for k, v in saved_config.items()
            if k in config and k not in ignore and config[k] != v]


def rng_state(device_type, device):
    """This process's random state, which decides the dropout masks to come."""
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda' else None}


def restore_rng_state(states, rank, world_size, device_type, device):
    """Continue rank's random state from states (one rng_state per rank, as saved). False, and
    nothing changed, when there is none to continue: an older checkpoint, or one saved by
    another number of processes."""
    if states is None or len(states) != world_size:
        return False
    torch.set_rng_state(states[rank]['torch'].cpu())
    if device_type == 'cuda' and states[rank]['cuda'] is not None:
        torch.cuda.set_rng_state(states[rank]['cuda'].cpu(), device)
    return True


# -----------------------------------------------------------------------------
# the run

class StopFlag:
    """Ctrl-C (SIGINT) and SIGTERM only raise a flag: .signum, 0 until a signal comes. Training
    runs on to its next log step, where it saves a checkpoint and exits. The first signal puts
    the default handler back, so a second Ctrl-C stops at once, without saving."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self.handle)

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)

    def restore(self):
        """Put back the handlers there were before."""
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def out_of_memory_advice(batch_size, block_size, gradient_accumulation_steps):
    """What to change when a training step does not fit in the GPU's memory."""
    if batch_size == 1:
        return (f"one sequence of block_size={block_size} tokens does not fit; try a smaller "
                f"block_size or model")
    return (f"with batch_size={batch_size}, try --batch_size={batch_size // 2} "
            f"--gradient_accumulation_steps={gradient_accumulation_steps * 2} (half the sequences "
            f"per micro-batch, twice the micro-batches)")


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """Learning rate at iteration it: linear warmup, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)   # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))                # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)
