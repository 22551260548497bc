# SWAT of GPT-2 small's shape (12 layers x 12 heads x 768, 124M) on OpenWebText, 5.2B tokens.
# Not run here: ~36 min on 8 H200s, from one H200's 210 ms per GPU share of a step; loss unknown.
#
#   python data/openwebtext/prepare.py                  # first: ~9B tokens, ~18 GB of bins
#   torchrun --standalone --nproc_per_node=8 train.py config/train_owt_124m.py
#
# The paper's ratio: sequences of 4 windows. A step is 16 micro-batches of 16 x 2048 tokens,
# 524,288 tokens, two micro-batches per GPU on 8 GPUs (on fewer GPUs, the same step takes
# longer). 10,000 steps are 5.2B tokens, about 42 per parameter.
#
# The estimate: one H200 ran this recipe's step for one of 8 GPUs (--gradient_accumulation_steps=2)
# in 210 ms, 311k tokens/s, MFU 25%, 13.8 GiB at peak (RESULTS.md); 10,000 of them take 35 min,
# plus a minute of compiling and the evaluations, if 8 GPUs scale perfectly (not measured; the
# gradient all-reduce adds to it). On one GPU the same run takes 8 times as long: ~4.7 h.

out_dir = 'out-owt-124m'
eval_interval = 1000
eval_iters = 100            # 100 x 16 x 2048 = 3.3M tokens of val.bin (and of train.bin)
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 16
batch_size = 16
block_size = 2048
# model
window = 512
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0               # one pass over a large corpus: nothing to overfit
# AdamW
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 10000
lr_decay_iters = 10000
warmup_iters = 700          # ~370M tokens
