"""
Train a SWAT language model.

The defaults train a small SWAT (6 layers, 6 heads, 384 wide, window 128, sequences of 512)
on the Shakespeare corpus shipped in data/shakespeare, on a GPU if there is one:

    python train.py

Any setting below can be changed from the command line, for example on a laptop CPU:

    python train.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=256 --window=64

or by config files of settings before the options, such as the recipes in config/ (see
python train.py --help). On several GPUs of one machine, with distributed data parallel (DDP),
start it through torchrun:

    torchrun --standalone --nproc_per_node=8 train.py config/train_owt_124m.py

gradient_accumulation_steps counts the micro-batches of one optimizer step over all GPUs
together, each GPU taking an equal share (that recipe's 16: two each); a total that is not a
multiple of the number of GPUs is rounded up, and the log says so: on 8 GPUs the default 1
becomes 8 (one each), 12 would be 16.

Continue from the last checkpoint in out_dir with --init_from=resume; from scratch, train.py
refuses an out_dir that holds a checkpoint already. Ctrl-C (or SIGTERM, as a cluster sends
before it preempts a job) saves a checkpoint after the current step, then exits.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_overrides
from kernel import warm_up_triton_in_background
from runtime import setup_device_and_precision
from swat import SWAT, CUDAGraphStep, SWATConfig
from training import (CheckpointWriter, StopFlag, changed_settings, check_mask_file, check_out_dir,
                      check_settings, check_token_file, get_batch, get_lr, load_for_resume,
                      merge_model_args, micro_batches_per_process, most_scored_targets, non_finite,
                      out_of_memory_advice, prepare_dataset, prepare_optimizer, restore_rng_state,
                      rng_state, set_learning_rate)

# -----------------------------------------------------------------------------
# default settings: a small SWAT on Shakespeare
# I/O
out_dir = 'out'             # where checkpoints go: out_dir/ckpt.pt
eval_interval = 250         # evaluate (and maybe save a checkpoint) every this many iterations
log_interval = 10           # log (and check for NaN and stop signals) every this many steps
eval_iters = 50             # batches averaged per loss estimate
always_save_checkpoint = False  # if False, save only when the val loss improves
init_from = 'scratch'       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
# data
dataset = 'shakespeare'     # reads data/<dataset>/train.bin and val.bin (see the data section)
gradient_accumulation_steps = 1  # micro-batches per optimizer step, in total over all DDP ranks
batch_size = 16             # sequences per micro-batch
block_size = 512            # training sequence length: 4 x window, the paper's best ratio
example_length = 0          # > 0: the corpus is a sequence of examples this long; every
                            # sequence starts at one (data/recall: block_size + 1)
# model: every setting named like a field of swat.SWATConfig
window = 128                # keys each query sees, itself included
n_layer = 6                 # transformer blocks
n_head = 6                  # attention heads per block
n_embd = 384                # the width; the head size n_embd / n_head must be 16, 32, 64 or 128
dropout = 0.2               # a small corpus overfits quickly; 0.0 for pretraining on large data
attn = 'sigmoid'            # 'sigmoid' (SWAT) or 'softmax' (the sliding-window baseline)
sigmoid_bias = False        # True: b = -log(window) inside the sigmoid (an experiment; not Eq. 5)
alibi = 'balanced'          # 'balanced', 'balanced_paper_code', 'balanced_gentle' (an
                            # experiment: positive slopes 2^-5 ..), 'negative', 'positive', 'none'
rope = True                 # rotate queries and keys by position (RoPE)
rope_base = 10000.0         # RoPE's base period
vocab_size = 50304          # GPT-2's 50257 tokens padded up to a multiple of 64
# AdamW optimizer
learning_rate = 1e-3        # peak learning rate
max_iters = 2000            # total optimizer steps
weight_decay = 0.1          # of the weight matrices and embeddings, not the norms' gains
beta1 = 0.9                 # AdamW's decay rate of the gradient's running mean ...
beta2 = 0.95                # ... and of its square's
grad_clip = 1.0             # clip the gradient norm at this value; 0.0 disables clipping
# learning rate schedule: linear warmup, then cosine decay down to min_lr
warmup_iters = 100          # steps of linear warmup up to learning_rate
lr_decay_iters = 2000       # usually = max_iters
min_lr = 1e-4               # usually ~ learning_rate / 10
# distributed training (under torchrun)
backend = 'nccl' if torch.cuda.is_available() else 'gloo'  # 'gloo' too with --device=cpu
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps', ...
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
                            # of the matmuls: 'float32', 'bfloat16', 'float16' (loss-scaled)
compile = torch.cuda.is_available()  # torch.compile each block; on a CPU only when asked
cuda_graph = torch.cuda.is_available()  # record the training step as a CUDA graph and replay it
                            # (one GPU, gradient_accumulation_steps=1, not float16)
seed = 1337                 # of the weights' initialisation, the batches and dropout
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
overrides = apply_overrides(globals(), config_keys)   # --key=value from the command line
# -----------------------------------------------------------------------------

# Distributed data parallel: torchrun starts one process per GPU and tells each its place
# through environment variables. Every process holds the whole model, trains on its own
# micro-batches, and the gradients are averaged across processes in the backward pass.
ddp = 'RANK' in os.environ
rank = int(os.environ.get('RANK', 0))                # this process among all of them
local_rank = int(os.environ.get('LOCAL_RANK', 0))    # ... among those of this machine: its GPU
world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = rank == 0                  # the one that logs and writes checkpoints
log = print if master_process else (lambda *args, **kwargs: None)
if hasattr(sys.stdout, 'reconfigure'):      # (a notebook's stdout has no such method)
    sys.stdout.reconfigure(line_buffering=True)  # log lines show at once, even in a file


def fail(message):
    """Stop with a clear message (printed once, by the master) and exit status 1."""
    raise SystemExit(message if master_process else 1)


# Check the settings, the device and out_dir before any work: a mistake costs one line now,
# not a traceback (or a lost checkpoint) later. The checks stop with SystemExit(message).
try:
    check_settings({k: globals()[k] for k in config_keys})
    device_type, ctx = setup_device_and_precision(device, dtype)  # ctx: autocast to dtype
    if master_process:                      # the one that will write the checkpoints
        check_out_dir(out_dir, init_from)
except SystemExit as e:
    fail(e.code)                            # printed once, not once per process
# --device=cpu on a GPU machine: the defaults above were those for the GPU
if device_type != 'cuda' and 'backend' not in overrides:
    backend = 'gloo'                        # NCCL only moves GPU tensors
if device_type != 'cuda' and 'compile' not in overrides:
    compile = False                         # for a CPU it is slow to start and needs a C compiler
if device_type != 'cuda' and 'cuda_graph' not in overrides:
    cuda_graph = False
config = {k: globals()[k] for k in config_keys}  # saved in the checkpoint, for the record
model_args = {f.name: config[f.name] for f in fields(SWATConfig) if f.name in config}
# Each process takes the same share of a step's micro-batches: round the total up to allow that
# (config keeps the value as given, so that resuming with the same command changes nothing).
gradient_accumulation_steps, micro_steps = micro_batches_per_process(gradient_accumulation_steps,
                                                                     world_size)
if ddp:
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)       # the default GPU of this process
    dist.init_process_group(backend=backend)

# what Triton's first launch (the first evaluation's) would wait for, hashed beside the start-up
# (not its imports: the compiler's own are imported meanwhile, see warm_up_triton_in_background)
warming = warm_up_triton_in_background() if device_type == 'cuda' else None

ckpt_path = os.path.join(out_dir, 'ckpt.pt')
torch.manual_seed(seed + rank)              # the ranks draw different dropout masks

# -----------------------------------------------------------------------------
# data: the token ids of the corpus, one uint16 per token, in data/<dataset>/{train,val}.bin.
# An optional {split}_mask.bin, one uint8 per token, scores as a target only the tokens marked 1.
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset)
bin_paths = [os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')]
try:
    prepare_dataset(data_dir, ddp)          # tokenize the corpus first if that was not done yet
except SystemExit as e:
    fail(e.code)


def train_batch(step, micro_step):
    """This process's micro_step-th micro-batch of step `step`: rank r takes r, r + world_size..."""
    return get_batch(data_dir, 'train', step, seed, block_size, batch_size,
                     micro_step * world_size + rank, gradient_accumulation_steps, device,
                     example_length)


# -----------------------------------------------------------------------------
# model
iter_num = 0
best_val_loss = float('inf')
try:                                        # missing, empty, truncated, corrupt, foreign: one line
    checkpoint = load_for_resume(ckpt_path, device) if init_from == 'resume' else None
except SystemExit as e:
    fail(e.code)
if checkpoint is not None:
    log(f"resuming training from {ckpt_path}")
    # The weights fix the model's shape and kind: the checkpoint's win; dropout may change.
    model_args, overruled = merge_model_args(checkpoint['model_args'], model_args)
    for message in overruled:
        log(f"  {message}")
    config.update((k, v) for k, v in model_args.items() if k in config)   # for the record
    changed = changed_settings(checkpoint.get('config', {}), config)
    if changed:                             # a resume that must match needs the same settings
        log(f"  settings changed since the checkpoint: {', '.join(changed)}")
try:
    model_config = SWATConfig(**model_args)
except (ValueError, TypeError) as e:        # a bad model setting: say what, without a traceback
    where = f" (model_args of {ckpt_path})" if checkpoint is not None else ""
    fail(f"bad model settings{where}: {e}")
block_size = model_config.block_size        # the checkpoint's, when resuming: what get_batch reads
try:
    for path in bin_paths:
        n_tokens = check_token_file(path, block_size, model_config.vocab_size, example_length)
        check_mask_file(path, n_tokens, block_size, example_length)
except SystemExit as e:
    fail(e.code)
# With loss masks (data/recall scores the answers alone), a sequence scores at most `most` of its
# block_size targets: the loss then builds the logits of that many rows a sequence, not all.
most = [most_scored_targets(path, block_size, example_length) for path in bin_paths]
max_targets = batch_size * max(most) if None not in most and max(most) < block_size else None
model = SWAT(model_config)
if checkpoint is not None:
    try:
        model.load_state_dict(checkpoint['model'])
    except RuntimeError as e:               # torch lists the missing, unexpected, mis-shaped
        fail(f"the weights in {ckpt_path} do not fit the model its model_args describe "
             f"({model_args}):\n{e}")
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
    log(f"  continuing from iter {iter_num} (best val loss so far {best_val_loss:.4f})")
model.to(device)
model_args = asdict(model_config)
log(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {model_config.n_layer} layers, "
    f"window {model_config.window}, block_size {block_size}, receptive field "
    f"{model.receptive_field} tokens")
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if gradient_accumulation_steps != config['gradient_accumulation_steps']:
    log(f"gradient_accumulation_steps={config['gradient_accumulation_steps']} rounded up to "
        f"{gradient_accumulation_steps}, a multiple of the {world_size} processes, so "
        f"{tokens_per_iter:,} tokens per iteration")
log(f"tokens per iteration: {tokens_per_iter:,} ({world_size} process(es) x {micro_steps} "
    f"micro-batch(es) x {batch_size} sequences x {block_size} tokens)")
if max_targets is not None:
    log(f"the loss masks score at most {max(most)} of a sequence's {block_size} targets: the loss "
        f"reads {max_targets} of a micro-batch's {batch_size * block_size} positions")

# A GradScaler guards float16 gradients against underflow; for other dtypes it does nothing.
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as e:
        fail(f"the optimizer state in {ckpt_path} does not fit the model: {e}")
    if 'scaler' in checkpoint:
        scaler.load_state_dict(checkpoint['scaler'])
    # The random state decides the dropout masks. Each rank continues its own; from an older
    # checkpoint, or with another number of processes, there is none to continue: reseed.
    if not restore_rng_state(checkpoint.get('rng_states'), rank, world_size, device_type, device):
        log(f"  no random state for {world_size} process(es) in the checkpoint: dropout masks "
            f"will differ from an uninterrupted run")
        torch.manual_seed(seed + rank + iter_num)
checkpoint = None                           # free the memory

# The training step as one CUDA graph. A step of a small model (the default one) is hundreds of
# small kernels, each queued by Python, and the GPU waits for the queue more than it computes:
# recorded once and replayed, the whole step (forward, backward, clipping, the optimizer) is one
# launch. A graph holds a fixed set of kernels on fixed buffers, without the host deciding
# anything in between: so one process (DDP talks to the others), one micro-batch, and no float16
# (its GradScaler decides on the host whether to skip a step).
graph_needs = {"a GPU": device_type == 'cuda', "one process (no DDP)": not ddp,
               "gradient_accumulation_steps=1": micro_steps == 1,
               "a dtype other than float16": dtype != 'float16'}
unmet = [need for need, met in graph_needs.items() if not met]
if cuda_graph and unmet:
    log(f"cuda_graph: off, the step runs eagerly (a graph of it needs {', '.join(unmet)})")
    cuda_graph = False
prepare_optimizer(optimizer, cuda_graph, device)

raw_model = model                           # the plain module, without the DDP wrapper
if compile:
    # Per block, not one whole-model graph: 1.25x faster on an H100, for more memory (bench.py
    # --mode=train, --train_compile=blocks vs =model); in place, so the parameter names stay.
    log("compiling the blocks... (takes a minute, at the first steps)")
    for block in model.transformer.h:
        block.compile()
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


def forward_backward(X, Y, sync=True):
    """The loss of the micro-batch X, Y over micro_steps (a tensor: reading it would wait for
    the GPU), with its gradients added to the parameters'. DDP averages the gradients across
    ranks during backward; once per step is enough, so sync=False skips it (no_sync)."""
    with model.no_sync() if ddp and not sync else nullcontext():
        with ctx:
            _, loss = model(X, Y, max_targets=max_targets)
            loss = loss / micro_steps       # the mean over this process's micro-batches
        scaler.scale(loss).backward()
    return loss.detach().float()


def update():
    """Clip the step's gradient, take the optimizer's step, free the gradients' memory."""
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)          # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def whole_step(X, Y):
    """A step of one micro-batch, the one a CUDA graph records."""
    loss = forward_backward(X, Y)
    update()
    return loss


@torch.no_grad()
def batch_loss(X, Y):
    """The loss of one batch, in the mode the model is in (estimate_loss: eval), no gradients;
    no DDP wrapper: the ranks evaluate unequal shares."""
    with ctx:
        _, loss = (model.module if ddp else model)(X, Y, max_targets=max_targets)
    return loss.float()


# the training step and the evaluation's forward, each recorded as a graph at its first call
graphed_step = CUDAGraphStep(whole_step) if cuda_graph else None
eval_batch_loss = CUDAGraphStep(batch_loss) if cuda_graph else batch_loss


@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches of each split every time (so evaluations are
    comparable); the ranks share them out and add up their sums."""
    out = {}
    raw_model.eval()                        # no dropout while measuring
    # The blocks are compiled for training: without gradients, torch.compile would compile them
    # a second time, seconds at the first evaluation to gain about a millisecond a batch.
    # So evaluation runs them as written (on a GPU inside its CUDA graph, where the launches of
    # their unfused kernels cost nothing).
    with torch.compiler.set_stance('force_eager'):
        for split in ('train', 'val'):
            total = torch.zeros((), device=device)
            for k in range(rank, eval_iters, world_size):
                X, Y = get_batch(data_dir, split, ('eval', k), seed, block_size, batch_size,
                                 device=device, example_length=example_length)
                total += eval_batch_loss(X, Y)
            if ddp:
                dist.all_reduce(total)
            out[split] = total.item() / eval_iters
    raw_model.train()
    return out


checkpoints = CheckpointWriter()            # the file is written while the training goes on


def save_checkpoint():
    """Write everything a resumed run needs to continue exactly as this one would. Under DDP
    every rank must call it (they hand their random states to the master, who writes)."""
    # Nothing non-finite is ever saved: a step can break the weights (or the optimizer's state)
    # after its loss was computed, and a stop signal saves with no evaluation in between. Every
    # rank checks, as every rank holds the same weights, so that all of them stop together.
    broken = non_finite({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict()})
    if broken:
        diverged(f"{broken} holds NaN or inf")
    mine = rng_state(device_type, device)   # this rank's random state
    rng_states = [None] * world_size if ddp else [mine]
    if ddp:
        dist.all_gather_object(rng_states, mine)    # every rank's, for the master to write
    if not master_process:
        return
    checkpoint = {
        'model': raw_model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict(),
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        'rng_states': rng_states,           # one per rank: the dropout masks to come
    }
    print(f"saving checkpoint to {ckpt_path}")
    checkpoints.write(checkpoint, ckpt_path)  # all or nothing: never half a file


def diverged(what):
    """Stop on a NaN/inf loss or weights, before anything could save the broken state."""
    fail(f"{what} at iter {iter_num}: training diverged. Stopping without saving, so "
         f"{ckpt_path} still holds the last good state (if any). Try a lower learning rate "
         f"(--learning_rate={learning_rate} now), a longer warmup (--warmup_iters) or gradient "
         f"clipping (--grad_clip=1.0), then resume or start again.")


# Ctrl-C (SIGINT) and SIGTERM only raise a flag, stop.signum: the loop saves a checkpoint at the
# next log step and exits. A second Ctrl-C stops at once, without saving.
stop = StopFlag()

# -----------------------------------------------------------------------------
# training loop. iter_num counts the optimizer steps taken so far.
if iter_num >= max_iters:
    log(f"iter {iter_num} >= max_iters={max_iters}: nothing to train, evaluating only")
X, Y = train_batch(iter_num, 0)             # the first micro-batch
t_start = time.time()
t_log, iter_log = t_start, iter_num          # when and at which step the last log was
losses = None
eval_seconds = None                         # how long the last evaluation took
if warming is not None:
    warming.join()
while True:

    # evaluate at every eval_interval and at the end; save when val improves
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        if eval_seconds is None or eval_seconds > 10:   # say what the pause is
            log(f"evaluating: {eval_iters} batches of train and val...")
        t0 = time.time()
        losses = estimate_loss()
        eval_seconds = time.time() - t0
        t_log, iter_log = time.time(), iter_num     # the step timings leave evaluation out
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            diverged(f"the evaluation loss is {losses['train']} (train), {losses['val']} (val)")
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if iter_num >= max_iters:
        break

    # set the learning rate of this step
    lr = get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    set_learning_rate(optimizer, lr)

    # forward and backward over this process's micro-batches: the gradients add up, so the step
    # sees a batch of gradient_accumulation_steps * batch_size sequences over all processes;
    # each next micro-batch (this step's or the next's) is read while the GPU works
    try:
        if cuda_graph:
            loss_sum = graphed_step(X, Y)
            X, Y = train_batch(iter_num + 1, 0)
        else:
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(micro_steps):
                last = micro_step == micro_steps - 1
                loss_sum += forward_backward(X, Y, sync=last)
                X, Y = train_batch(*((iter_num + 1, 0) if last else (iter_num, micro_step + 1)))
            update()
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory at iter {iter_num}: "
             f"{out_of_memory_advice(batch_size, block_size, gradient_accumulation_steps)}")
    iter_num += 1

    # Every log_interval steps, and only then, wait for the GPU and take the decisions all ranks
    # must take together: stop on a NaN loss on any rank, stop when any rank got a signal. In
    # between, the CPU queues the next steps while the GPU still works on this one. (A NaN in
    # between is still caught before anything is saved: evaluation checks its losses too.)
    if iter_num % log_interval != 0:
        continue
    stop_now = stop.signum                  # read once: a signal may land at any moment
    if ddp:
        dist.all_reduce(loss_sum)           # a NaN anywhere makes the sum NaN everywhere
        loss_sum /= world_size
        stop_now = torch.tensor(stop_now, device=device)
        dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
        stop_now = int(stop_now.item())
    lossf = loss_sum.item()                 # the mean loss over this step's whole batch
    if not math.isfinite(lossf):
        diverged(f"the loss is {lossf}")
    dt = (time.time() - t_log) / (iter_num - iter_log)  # per step, since the last log
    t_log, iter_log = time.time(), iter_num
    # MFU, model FLOPs utilisation: the FLOPs the model needs per second over what the GPU can
    # do (each GPU of world_size processes tokens_per_iter / world_size of them)
    mfu = raw_model.estimate_mfu(tokens_per_iter / dt / world_size, block_size, device)
    mfu = '' if mfu is None else f", MFU {100 * mfu:.1f}%"
    log(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
        f"{tokens_per_iter / dt:,.0f} tok/s{mfu}")

    if stop_now:
        save_checkpoint()
        checkpoints.finish()                # the file complete before we say so
        log(f"stopped at iter {iter_num} by {signal.Signals(stop_now).name}: {ckpt_path} holds "
            f"this state. To continue, run the same command with --init_from=resume")
        if ddp:
            dist.barrier()                  # leave together (gloo may abort a rank otherwise)
            dist.destroy_process_group()
        raise SystemExit(128 + stop_now)    # the status a process killed by the signal has

checkpoints.finish()
log(f"done: final train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
    f"(best {best_val_loss:.4f}) at iter {iter_num}, wall time {time.time() - t_start:.1f}s")
if ddp:
    dist.barrier()                          # leave together: gloo may abort a rank otherwise
    dist.destroy_process_group()
