# A 124M SWAT (12 x 12 x 768, window 512, sequences of 2048) on PG-19's books, 2.1B tokens.
# Not run here: ~15 min on 8 H200s, from one H200's 210 ms per GPU share of a step; loss unknown.
#
#   python data/pg19/prepare.py                         # first: ~2 GB download, ~5 GB of bins
#   torchrun --standalone --nproc_per_node=8 train.py config/train_pg19_long.py
#   python eval.py --checkpoints=out-pg19-long --dataset=pg19 --lengths=2048,8192,32768,65536 \
#       --max_tokens_per_length=262144
#
# Trained on 2048 tokens, 4 windows (the paper's ratio), then read at up to 32 times that:
# PG-19's books average about 90k tokens (data/pg19/README.md), so the eval.py line above reads
# unbroken text at every length (4 stretches of 65536 tokens, 128 of 2048). From 8192 on the
# text is longer than the receptive field, 1 + 511 x 12 = 6133 tokens. A step is 524,288
# tokens, two micro-batches per GPU on 8 GPUs; 4,000 steps are 2.1B tokens, less than one pass
# over the train books.
#
# The estimate: the model and the step are those of config/train_owt_124m.py, whose share of a
# step for one of 8 GPUs took 210 ms on one H200 (RESULTS.md): 4,000 steps take 14 min, plus
# the compiling and the evaluations, if 8 GPUs scale perfectly (not measured).

out_dir = 'out-pg19-long'
eval_interval = 500
eval_iters = 100
# data
dataset = 'pg19'
gradient_accumulation_steps = 16
batch_size = 16
block_size = 2048
# model
window = 512
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
# AdamW
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 4000
lr_decay_iters = 4000
warmup_iters = 400
