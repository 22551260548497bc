# The default run, written out: a 30M SWAT (6 x 6 x 384, window 128, sequences of 512), Shakespeare.
# One H200: 2000 steps in 69 s, compile included, to a val loss of 4.753 (measured: RESULTS.md).
#
#   python train.py config/train_shakespeare.py      # the same as python train.py
#
# Every setting but the machine's (device, dtype, compile, cuda_graph, backend) at its default:
# a copy to edit. See train.py for what each one does.

# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 50
always_save_checkpoint = False
init_from = 'scratch'
# data: 16 sequences of 512 tokens a step
dataset = 'shakespeare'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 512
example_length = 0
# model: 30M parameters, 6 heads of 64
window = 128
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
attn = 'sigmoid'
sigmoid_bias = False
alibi = 'balanced'
rope = True
rope_base = 10000.0
vocab_size = 50304
# AdamW, linear warmup, then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 1e-4
seed = 1337
