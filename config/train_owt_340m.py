# SWAT of the paper's 340M model's shape (Table 1; 24 x 16 x 1024, 354M here) on OpenWebText.
# Not run here: ~1.6 h on 8 H200s, from one H200's 415 ms per GPU share of a step; loss unknown.
#
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_owt_340m.py
#
# The shape is that of the paper's 340M model as its code configures it: 24 layers, 16 heads of
# 64, 1024 wide (354M parameters here, with GPT-2's vocabulary and MLP). The corpus, window,
# sequence length and token budget are this recipe's choices: sequences of 4 windows as in the
# paper, 14,000 steps of 524,288 tokens, 7.3B tokens, about 21 per parameter. Two micro-batches
# per GPU on 8 GPUs.
#
# The estimate: one H200 ran this recipe's step for one of 8 GPUs (--gradient_accumulation_steps=2)
# in 415 ms, 158k tokens/s, MFU 36%, 35.5 GiB at peak (RESULTS.md); 14,000 of them take 97 min,
# plus the compiling and the evaluations, if 8 GPUs scale perfectly (not measured).

out_dir = 'out-owt-340m'
eval_interval = 1000
eval_iters = 100
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 16
batch_size = 16
block_size = 2048
# model
window = 512
n_layer = 24
n_head = 16
n_embd = 1024
dropout = 0.0
# AdamW: a lower peak rate than the 124M recipe's, for the larger model
learning_rate = 3e-4
min_lr = 3e-5
max_iters = 14000
lr_decay_iters = 14000
warmup_iters = 700
