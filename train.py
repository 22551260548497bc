"""
Train a SWAT language model.

The defaults train a small SWAT (6 layers, 6 heads, 384 wide, window 128, sequences of 512)
on the Shakespeare corpus shipped in data/shakespeare, on a GPU if there is one:

    python train.py

Any setting below can be changed from the command line, for example on a laptop CPU:

    python train.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=256 --window=64

Continue from the last checkpoint in out_dir with --init_from=resume.
"""

import math
import os
import runpy
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

from configurator import apply_overrides
from swat import SWAT, SWATConfig

# -----------------------------------------------------------------------------
# default settings: a small SWAT on Shakespeare
# I/O
out_dir = 'out'
eval_interval = 250         # evaluate (and maybe save a checkpoint) every this many iterations
log_interval = 10
eval_iters = 50             # batches averaged per loss estimate
always_save_checkpoint = False  # if False, save only when the val loss improves
init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
# data
dataset = 'shakespeare'     # reads data/<dataset>/train.bin and val.bin
gradient_accumulation_steps = 1  # micro-batches per optimizer step
batch_size = 16             # sequences per micro-batch
block_size = 512            # training sequence length: 4 x window, the paper's best ratio
# model
window = 128                # keys each query sees, itself included
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2               # a small corpus overfits quickly; 0.0 for pretraining on large data
attn = 'sigmoid'            # 'sigmoid' (SWAT) or 'softmax' (the sliding-window baseline)
alibi = 'balanced'          # 'balanced', 'negative', 'positive' or 'none'
rope = True
# AdamW optimizer
learning_rate = 1e-3        # peak learning rate
max_iters = 2000            # total optimizer steps
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0             # clip the gradient norm at this value; 0.0 disables clipping
# learning rate schedule: linear warmup, then cosine decay down to min_lr
warmup_iters = 100
lr_decay_iters = 2000       # usually = max_iters
min_lr = 1e-4               # usually ~ learning_rate / 10
# distributed training (not yet: kept so the option names stay stable)
backend = 'nccl'
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps', ...
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False             # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
apply_overrides(globals(), config_keys)     # --key=value from the command line
config = {k: globals()[k] for k in config_keys}  # saved in the checkpoint, for the record
# -----------------------------------------------------------------------------

if init_from not in ('scratch', 'resume'):
    raise SystemExit(f"init_from={init_from!r}: expected 'scratch' or 'resume'")
if dtype not in ('float32', 'bfloat16', 'float16'):
    raise SystemExit(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")

os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True    # TF32 matmuls on Ampere and later: much faster
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if 'cuda' in device else 'cpu'  # autocast and fused AdamW need the kind only
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
# Mixed precision: the matmuls run in bfloat16/float16 while the weights stay float32.
ctx = nullcontext() if dtype == 'float32' else torch.amp.autocast(device_type=device_type,
                                                                  dtype=ptdtype)

# -----------------------------------------------------------------------------
# data: the token ids of the corpus, one uint16 per token, in data/<dataset>/{train,val}.bin
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
bin_paths = [os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')]
if not all(os.path.exists(p) for p in bin_paths):
    prepare_script = os.path.join(data_dir, 'prepare.py')
    if not os.path.exists(prepare_script):
        raise SystemExit(f"dataset {dataset!r}: {bin_paths[0]} and {bin_paths[1]} are missing and "
                         f"there is no {prepare_script} to make them")
    print(f"dataset {dataset!r} is not tokenized yet: running {prepare_script}")
    saved_argv = sys.argv
    sys.argv = [prepare_script]         # the script must not see our --key=value arguments
    try:
        runpy.run_path(prepare_script, run_name='__main__')
    finally:
        sys.argv = saved_argv

n_val = len(np.memmap(bin_paths[1], dtype=np.uint16, mode='r'))
if block_size >= n_val:
    raise SystemExit(f"block_size={block_size} is too large: the validation split of {dataset!r} "
                     f"has only {n_val} tokens (a batch needs block_size + 1)")


def get_batch(split):
    # Re-open the memmap for every batch: a memmap kept open grows in memory as pages are read.
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - block_size, (batch_size,))   # random windows of the corpus
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if device_type == 'cuda':
        # pinned memory lets the copy to the GPU run asynchronously, overlapped with compute
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


# -----------------------------------------------------------------------------
# model
iter_num = 0
best_val_loss = float('inf')
model_args = dict(block_size=block_size, window=window, n_layer=n_layer, n_head=n_head,
                  n_embd=n_embd, dropout=dropout, attn=attn, alibi=alibi, rope=rope)
checkpoint = None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"init_from='resume' but there is no checkpoint at {ckpt_path}; "
                         f"train from scratch first (the default --init_from=scratch)")
    print(f"resuming training from {ckpt_path}")
    checkpoint = torch.load(ckpt_path, map_location=device)
    # The weights fix the model's shape and kind, so those come from the checkpoint, whatever
    # the command line says. Only dropout may change between runs.
    for k, v in checkpoint['model_args'].items():
        if k == 'dropout':
            continue
        if k in model_args and model_args[k] != v:
            print(f"  {k}={v} from the checkpoint (ignoring {k}={model_args[k]})")
        model_args[k] = v
        if k in config:
            globals()[k] = config[k] = v    # e.g. block_size: get_batch uses the checkpoint's
try:
    model_config = SWATConfig(**model_args)
except ValueError as e:                     # a bad model setting: say what, without a traceback
    raise SystemExit(f"bad model settings: {e}")
model = SWAT(model_config)
if checkpoint is not None:
    model.load_state_dict(checkpoint['model'])
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    print(f"  continuing from iter {iter_num} (best val loss so far {best_val_loss:.4f})")
    # a resumed run should draw new batches, not replay the ones from the start of training
    torch.manual_seed(seed + iter_num)
model.to(device)
model_args = asdict(model_config)
print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {n_layer} layers, window {window}, "
      f"block_size {block_size}, receptive field {model.receptive_field} tokens")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per iteration: {tokens_per_iter:,}")

# A GradScaler guards float16 gradients against underflow; for other dtypes it does nothing.
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint['optimizer'])
checkpoint = None                           # free the memory

raw_model = model                           # the plain module: its state_dict has clean key names
if compile:
    print("compiling the model... (takes a minute)")
    model = torch.compile(model)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters random batches of each split."""
    out = {}
    model.eval()                            # no dropout while measuring
    for split in ('train', 'val'):
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Learning rate at iteration it: linear warmup, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)   # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))                # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def save_checkpoint():
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
    }
    print(f"saving checkpoint to {ckpt_path}")
    # Write a temporary file next to the real one, then rename it over: the rename is atomic,
    # so a crash mid-save leaves the previous checkpoint intact, never half a file.
    tmp_path = ckpt_path + '.tmp'
    with open(tmp_path, 'wb') as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, ckpt_path)


# -----------------------------------------------------------------------------
# training loop. iter_num counts the optimizer steps taken so far.
if iter_num >= max_iters:
    print(f"iter {iter_num} >= max_iters={max_iters}: nothing to train, evaluating only")
X, Y = get_batch('train')                   # the first batch
t_start = time.time()
losses = None
while True:

    # evaluate at every eval_interval and at the end; save when val improves
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if iter_num >= max_iters:
        break

    # set the learning rate of this step
    t0 = time.time()
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # forward and backward over gradient_accumulation_steps micro-batches: the gradients add up,
    # so the step sees a batch of gradient_accumulation_steps * batch_size sequences
    for micro_step in range(gradient_accumulation_steps):
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps   # the mean over all micro-batches
        X, Y = get_batch('train')           # fetch the next batch while the GPU works
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)          # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)   # free the gradients' memory right away
    iter_num += 1

    # log
    if iter_num % log_interval == 0:
        lossf = loss.item() * gradient_accumulation_steps  # .item() waits for the GPU: log rarely
        dt = time.time() - t0               # the time of this one step
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
              f"{tokens_per_iter / dt:,.0f} tok/s")

print(f"done: final train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
      f"(best {best_val_loss:.4f}) at iter {iter_num}, wall time {time.time() - t_start:.1f}s")
