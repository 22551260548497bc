"""
A recall benchmark: how far back can each model still find a fact?

A fact is written once, and the question that needs it comes exactly d tokens later. A model
whose attention sees the last w tokens can read the fact directly while d < w; with n_layer
layers, information can be relayed further, up to d < 1 + (w - 1) * n_layer (the receptive
field); beyond that nothing of the fact can reach the question, and the best a model can do is
guess. The benchmark trains one small model of every kind on the task and measures its accuracy
against d in the three bands.

    python recall.py                                # everything: data, 24 trainings, table, plot
    python recall.py --action=commands              # print the commands instead, to run elsewhere
                                                    # (each training in one go: scored at its end)
    python recall.py --action=eval                  # tables and plot from the trainings' scores
    python recall.py --action=train --seeds=1       # the trainings of one seed (a batch of them)
    python recall.py --trainings=vanilla --changes='n_pairs=4' --out_root=out-recall-p4
                                                    # one kind of model on a variant of the task
    python recall.py --action=heads --trainings=vanilla   # the weight each head gives the fact
    python recall.py --action=pairs --trainings=vanilla   # MQAR with 1, 2, 4 .. pairs: which
                                                    # answers are another pair's value
    python recall.py --preset=tiny --device=cpu     # the whole pipeline at a toy size, on a CPU:
                                                    # it learns nothing (see RESULTS.md, section 6)

The tasks, generated on the fly (no downloads), the answers given as single tokens:
- passkey: `FACT key value`, filler, `QUERY key` -> value. One fact per example. The filler is
  real text (Shakespeare: data/shakespeare/train.bin for training, the held-out plays of val.bin
  for evaluation) or random tokens.
- mqar, multi-query associative recall (Arora et al. 2023, "Zoology"): n_pairs `key value`
  pairs among random tokens, every key written again later -> its value. As in Zoology, keys and
  values come from disjoint vocabularies and the second occurrence of a key is the query; unlike
  Zoology, each query sits at a chosen distance from its pair (there: a power-law gap).
- induction, for training only, in a share of the examples (the preset's induction_share: half
  of them in the default preset): blocks of key and value ids, each repeated from a random one
  of them on, every token of the repeat an answer (induction_example): MQAR's matching, scored
  at every token, so that it is learnt (RESULTS.md, section 6, says what it does).

The distance d of a question is measured the way attention sees it: from the position whose
output must be the answer (the query's key) back to the fact's value token. The query sees that
token directly iff d <= w - 1.

Scoring counts the answers only: at each answer position the prediction is the value whose
logit is highest, among the n_values values (so a model that knows nothing scores exactly the
chance 1 / n_values, whatever it does with the other tokens). Each model is trained by the
ordinary train.py on data/recall (written by data/recall/prepare.py), where the loss mask scores
the answer tokens only: every example is block_size + 1 tokens and train.py reads whole examples
(--example_length). Training sees all distances, log-uniformly; evaluation uses fresh examples, the
same ones for every model, at fixed distances in each band.

The rows: full attention, softmax sliding-window attention (SWA), SWA read with 4 attention
sinks (StreamingLLM; the same checkpoints), and SWAT with each ALiBi mode, every one trained with
each of the preset's seeds. The output: per task, accuracy (mean +- std over the seeds) against
distance as a markdown table (printed, and written next to the plot as .md) and a PNG with the
window and the receptive field drawn in, both beside the checkpoints in out_root. Each training
runs on one learning-rate schedule to the last of the preset's score_steps and is scored at each
of them on its way, into a scores.json beside its checkpoint (kilobytes): the result to keep. A
second table gives each model's accuracy at those steps, and marks a model whose accuracy was
still rising at the last: its row is not converged. --action=eval makes the tables from those
files, scoring the finished trainings that have none yet, and says which have not finished; with
the JSON files alone (copied from the machines that trained, on other days) it needs no
checkpoint: recall_scores/ keeps those of the default preset's trainings run so far, and
`python recall.py --action=eval --out_root=recall_scores` prints their tables. --action=train
skips the finished trainings and resumes the others. Stopping recall.py (Ctrl-C, SIGTERM) stops
the trainings too, each after saving a checkpoint, and the same command continues them.

RESULTS.md, section 6, says what has been run and timed: the step times of the default preset on
an H200, and the tiny preset on a 2-core CPU, which runs every step of the benchmark but whose
models learn nothing of the task.
"""

import ast
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from configurator import apply_overrides
from eval import attention_weights, check_plot, load_model, write_result
from runtime import setup_device_and_precision
from swat import CheckpointError, load_checkpoint
from training import check_folder, prepare_dataset

# -----------------------------------------------------------------------------
preset = 'default'          # a name from PRESETS: the models, the task, the trainings, the seeds
action = 'all'              # 'commands' (print them), 'train', 'eval', 'all' (train, then eval),
                            # or 'heads' (where the trained models' heads look: fact_weights),
                            # 'pairs' (MQAR with fewer pairs: fewer_pairs_table)
out_root = 'out-recall'     # the checkpoints go to out_root/<training>-s<seed>
jobs = 8 if torch.cuda.is_available() else 1  # trainings at the same time (they share the GPU)
seeds = ''                  # which of the preset's seeds to train, e.g. '1' or '2,3'; '' for all:
                            # a benchmark too long for one machine runs in batches
trainings = ''              # which trainings (TRAININGS), e.g. 'vanilla' or 'vanilla,swat'; '' all
changes = ''                # fields of the preset to change, as keyword arguments, e.g.
                            # 'n_pairs=4, learning_rate=3e-3': a variant (give it its own out_root)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # of the trainings and the evaluation
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
                            # of the matmuls: 'float32', 'bfloat16', 'float16'
plot = 'recall.png'         # the plot, in out_root (the table beside it, as .md); '' for none
config_keys = ['preset', 'action', 'out_root', 'jobs', 'seeds', 'trainings', 'changes', 'device',
               'dtype', 'plot']
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(ROOT, 'data', 'recall')
ACTIONS = ('commands', 'train', 'eval', 'all', 'heads', 'pairs')


@dataclass(frozen=True)
class Preset:
    """One benchmark: the models' shape, the task, the trainings and the evaluation."""
    # the models: every kind gets this shape; `window` is that of the windowed ones
    n_layer: int
    n_head: int
    n_embd: int
    window: int
    block_size: int             # the length of an example, less one (inputs and their targets)
    # the task
    n_keys: int                 # keys are KEY_BASE + 0 .. n_keys - 1
    n_values: int               # values are VALUE_BASE + 0 .. n_values - 1; chance = 1 / n_values
    n_pairs: int                # key-value pairs in an mqar example
    induction_share: float      # the share of training examples that are the induction task
                                # (training only: see induction_example); the rest are a mix
                                # of TASKS
    train_examples: int         # examples in data/recall/train.bin (a mix of the tasks) ...
    val_examples: int           # ... and in val.bin (train.py's validation loss)
    # the trainings
    score_steps: tuple          # each training is scored at these steps, and ends at the last
    batch_size: int
    learning_rate: float
    warmup_iters: int
    seeds: tuple                # one training of every kind per seed
    # the evaluation
    points_per_band: int        # distances evaluated in each band, its edges included
    eval_examples: int          # examples per task and distance

    @property
    def example_length(self):
        return self.block_size + 1

    @property
    def max_iters(self):
        return self.score_steps[-1]

    @property
    def max_distance(self):
        """The largest distance evaluated. There, the value of a pair can sit at any of
        4 * n_pairs + 1 spots (its query and answer must fit after it), twice the 2 * n_pairs
        tokens all the pairs take: placed at random, they find room (or make_example says
        so: for examples shorter than about 18 * n_pairs they might not)."""
        return self.example_length - 3 - 4 * self.n_pairs


PRESETS = {
    # 4 layers of 256 (4 heads of 64), w = 64: receptive field 253 tokens; examples of 8 windows.
    # Half the training examples are the induction task: without it not even full attention
    # learns MQAR (at best 47% at d = 63 in 11 variants of the task and the training); with it,
    # full attention has 99.6-99.8% at every d in the window by step 9,600, over three seeds.
    # 300,000 examples, read once in the 9,600 steps of 32: with 50,000, read six times, the
    # windowed models memorised them (their validation loss rose) and relayed a fact a window
    # back (d = 127) in one seed of three at best; with 300,000 softmax SWA and SWAT both carry
    # the passkey there in both seeds run (RESULTS.md, section 6)
    'default': Preset(n_layer=4, n_head=4, n_embd=256, window=64, block_size=512,
                      n_keys=256, n_values=256, n_pairs=16, induction_share=0.5,
                      train_examples=300_000,
                      val_examples=1_000, score_steps=(2400, 4800, 9600), batch_size=32,
                      learning_rate=1e-3,
                      warmup_iters=100, seeds=(1, 2, 3), points_per_band=4, eval_examples=200),
    # a toy that runs every step on a CPU (4 minutes on 2 cores): its models learn nothing,
    # every accuracy is chance
    'tiny': Preset(n_layer=2, n_head=2, n_embd=32, window=8, block_size=64,
                   n_keys=32, n_values=32, n_pairs=4, induction_share=0.0,
                   train_examples=2_000, val_examples=200,
                   score_steps=(50, 100, 200), batch_size=16, learning_rate=1e-3,
                   warmup_iters=20,
                   seeds=(1,), points_per_band=3, eval_examples=32),
}


def changed_preset(name, changes=''):
    """PRESETS[name] with the fields `changes` names changed: keyword arguments as Python
    literals, e.g. 'n_pairs=4, score_steps=(1200, 2400)'. SystemExit with one line for a preset,
    a field or a value that does not exist or does not fit."""
    if name not in PRESETS:
        raise SystemExit(f"preset={name!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if not changes:
        return p
    fields = {f.name: type(getattr(p, f.name)) for f in dataclasses.fields(p)}
    try:
        call = ast.parse(f"f({changes})", mode='eval').body
        if not isinstance(call, ast.Call) or call.args or None in [kw.arg for kw in call.keywords]:
            raise ValueError
        values = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError):
        raise SystemExit(f"changes={changes!r}: expected fields of a preset and their values, "
                         f"e.g. 'n_pairs=4, learning_rate=3e-3'") from None
    for key, value in values.items():
        if key not in fields:
            raise SystemExit(f"changes={changes!r}: {key} is not a field of a preset; expected "
                             f"some of {', '.join(fields)}")
        expected = fields[key]
        if expected is float and type(value) is int:
            values[key] = value = float(value)
        if type(value) is not expected:
            raise SystemExit(f"changes={changes!r}: {key}={value!r}, expected a value of type "
                             f"{expected.__name__}")
    return dataclasses.replace(p, **values)


# The fields that fix the data: data/recall/meta.json records them, to tell stale data.
DATA_FIELDS = ('block_size', 'n_keys', 'n_values', 'n_pairs', 'induction_share', 'train_examples',
               'val_examples')

# The trainings: out_dir name -> the train.py settings of that kind of model. window=None means
# a window as long as the examples: full causal attention.
TRAININGS = {
    'vanilla': dict(attn='softmax', alibi='none', window=None),
    'swa': dict(attn='softmax', alibi='none'),
    'swat': dict(attn='sigmoid', alibi='balanced'),
    'swat-bias': dict(attn='sigmoid', alibi='balanced', sigmoid_bias=True),
    'swat-negative': dict(attn='sigmoid', alibi='negative'),
    'swat-positive': dict(attn='sigmoid', alibi='positive'),
    'swat-nonalibi': dict(attn='sigmoid', alibi='none'),
    'swat-paper-code': dict(attn='sigmoid', alibi='balanced_paper_code'),
}
# The rows of the table: (label, training, sink tokens). A row with sinks reads the checkpoints
# of its training once more, keeping the first tokens of every example in view.
READINGS = [
    ('full attention (vanilla)', 'vanilla', 0),
    ('softmax SWA', 'swa', 0),
    ('softmax SWA + 4 sinks', 'swa', 4),
    ('SWAT: sigmoid, balanced ALiBi', 'swat', 0),
    ('sigmoid, balanced, b = -log w', 'swat-bias', 0),
    ('sigmoid, negative ALiBi', 'swat-negative', 0),
    ('sigmoid, positive ALiBi', 'swat-positive', 0),
    ('sigmoid, no ALiBi', 'swat-nonalibi', 0),
    ("sigmoid, balanced, the paper code's slopes", 'swat-paper-code', 0),
]

# -----------------------------------------------------------------------------
# The vocabulary: GPT-2 token ids, so that text filler needs no other tokenizer and the models
# are ordinary GPT-2-vocabulary models. What the ids spell does not matter (the models learn the
# task from scratch); they only have to be told apart.
FACT, QUERY = 50257, 50258  # passkey markers: ids of GPT-2's padding, which no text ever holds
KEY_BASE = 30000            # keys: KEY_BASE + 0 .. n_keys - 1
VALUE_BASE = 40000          # values: VALUE_BASE + 0 .. n_values - 1
MAX_IDS = 10000             # room for keys (and for values) in those ranges
RANDOM_FILLER = (1000, 30000)  # random filler: uniform over these ids (no key, no value among them)
SPACE = 220                 # ' ': stands in for a key or value id that shows up in text filler
TASKS = ('passkey_text', 'passkey_random', 'mqar')
TASK_TITLES = {'passkey_text': 'passkey, text filler', 'passkey_random': 'passkey, random filler',
               'mqar': 'multi-query associative recall'}
MIN_DISTANCE = 2            # a passkey's `QUERY key` can follow its fact at once: d = 2
EVAL_SEED = 20250531        # the evaluation examples: the same for every model and every run


# -----------------------------------------------------------------------------
# The geometry: where a distance lies for a model with window w and n_layer layers

def receptive_field(window, n_layer):
    """How many tokens the last position can draw on through n_layer layers of window w,
    itself included: 1 + (w - 1) * n_layer (SWAT.receptive_field, for a shape without a model).
    A fact at distance d can reach the question only if d < receptive_field."""
    return 1 + (window - 1) * n_layer


def band(distance, window, n_layer):
    """Where a fact at `distance` lies: 'inside the window' (the question sees it directly),
    'inside the receptive field' (only layers relaying it can bring it) or 'beyond the receptive
    field' (nothing can)."""
    if distance < window:
        return 'inside the window'
    if distance < receptive_field(window, n_layer):
        return 'inside the receptive field'
    return 'beyond the receptive field'


def band_distances(window, n_layer, max_distance, per_band, min_distance=MIN_DISTANCE):
    """The distances to evaluate: per_band of them spread evenly over each band, both edges
    included, so that the steps at d = w and at d = receptive field show: [min_distance, w - 1],
    [w, rf - 1], [rf, max_distance]. A band above max_distance is left out."""
    rf = receptive_field(window, n_layer)
    distances = []
    for low, high in ((min_distance, window - 1), (window, rf - 1), (rf, max_distance)):
        high = min(high, max_distance)
        if low <= high:
            distances += np.linspace(low, high, per_band).round().astype(int).tolist()
    return sorted(set(distances))


# -----------------------------------------------------------------------------
# The examples. Each is an array of example_length tokens and a mask of its answer positions.
# It starts as filler; then each fact and its question are written over it at random free spots
# exactly d apart, and the answer after the question is marked.

def check_task(p):
    """Stop unless the preset's keys and values fit their id ranges and its induction share is a
    share of the examples."""
    for name in ('n_keys', 'n_values'):
        if not 1 <= getattr(p, name) <= MAX_IDS:
            raise SystemExit(f"{name}={getattr(p, name)}: expected 1 .. {MAX_IDS}")
    if p.n_pairs > p.n_keys:
        raise SystemExit(f"n_pairs={p.n_pairs} needs as many distinct keys: n_keys={p.n_keys}")
    if not 0.0 <= p.induction_share < 1.0:
        raise SystemExit(f"induction_share={p.induction_share}: expected 0 <= share < 1 (0 for "
                         f"none; the rest of the examples are the tasks the benchmark scores)")


def is_task_id(tokens, p):
    """Which of tokens are keys or values of preset p."""
    return (((tokens >= KEY_BASE) & (tokens < KEY_BASE + p.n_keys))
            | ((tokens >= VALUE_BASE) & (tokens < VALUE_BASE + p.n_values)))


def filler(task, rng, length, p, text):
    """length filler tokens: a random stretch of the token array `text` for passkey_text (a key
    or value id in it would be a false fact: it becomes a space), random ids otherwise."""
    if task == 'passkey_text':
        start = rng.integers(len(text) - length + 1)
        stretch = np.array(text[start:start + length], dtype=np.int64)
        return np.where(is_task_id(stretch, p), SPACE, stretch)
    return rng.integers(*RANDOM_FILLER, size=length)


def place(tokens, free, rng, fact, question, distance):
    """Write `fact` (ending with its value) and `question` (ending with the key; the answer, the
    value, follows it) over tokens at a random spot where every position is still free, with the
    question's key `distance` positions after the fact's value. Returns the answer's position,
    or None if there is no such spot."""
    a, b = len(fact), len(question)
    if distance < b:
        raise ValueError(f"distance={distance}: a question of {b} tokens would overlap its fact")
    # f: the fact's value. The fact takes f-a+1 .. f; the question q-b+1 .. q and the answer q+1,
    # with q = f + distance, and the answer must be inside the example.
    f = np.arange(a - 1, len(tokens) - 1 - distance)
    ok = np.ones(len(f), dtype=bool)
    for k in range(a):
        ok &= free[f - k]
    for k in range(-1, b):
        ok &= free[f + distance - k]
    if not ok.any():
        return None
    f = rng.choice(f[ok])
    q = f + distance
    tokens[f - a + 1:f + 1] = fact
    tokens[q - b + 1:q + 1] = question
    tokens[q + 1] = fact[-1]
    free[f - a + 1:f + 1] = free[q - b + 1:q + 2] = False
    return q + 1


def make_example(task, rng, p, text=None, distance=None):
    """(tokens, answers) of one example of task: example_length token ids (int64) and a bool
    mask, True exactly at the answer tokens.

    distance=None (training): each fact at a distance drawn log-uniformly from all that fit in
    the example; a fact that finds no room is left out. distance=d (evaluation): every fact at d,
    all n_pairs of them, or a ValueError."""
    length = p.example_length
    tokens, free = filler(task, rng, length, p, text), np.ones(length, dtype=bool)
    answers = np.zeros(length, dtype=bool)
    n = p.n_pairs if task == 'mqar' else 1
    keys = KEY_BASE + rng.choice(p.n_keys, n, replace=False)   # distinct: every query has one fact
    values = VALUE_BASE + rng.integers(p.n_values, size=n)
    if task == 'mqar':      # Zoology's pairs `key value`, and later `key` -> value
        facts, questions = [[k, v] for k, v in zip(keys, values)], [[k] for k in keys]
    else:                   # a passkey: `FACT key value`, and later `QUERY key` -> value
        facts, questions = [[FACT, k, v] for k, v in zip(keys, values)], [[QUERY, k] for k in keys]
    if distance is None:
        # Log-uniform from MIN_DISTANCE to the longest that fits (the fact's first token at
        # position 0, the answer at the last one), as Zoology draws its gaps from a power law:
        # as many facts 2-4 tokens back as 256-512, so that a windowed model too meets plenty of
        # questions it can answer, and every band is trained. The longest are placed first,
        # while there is most room.
        longest = length - 1 - len(facts[0])
        distances = np.exp(rng.uniform(np.log(MIN_DISTANCE), np.log(longest + 1), size=n))
        distances = np.sort(distances.astype(int))[::-1]
    else:
        distances = np.full(n, distance)
    for fact, question, d in zip(facts, questions, distances):
        where = place(tokens, free, rng, fact, question, d)
        if where is None and distance is not None:
            raise ValueError(f"{task}: no room for {n} facts at distance {d} in {length} tokens: "
                             f"evaluate shorter distances or fewer pairs")
        if where is not None:
            answers[where] = True
    return tokens, answers


def induction_example(rng, p):
    """(tokens, answers) of the induction task, for training only: blocks of s = window // 2
    key and value ids (no id twice in an example), each followed by the same ids again from a
    random one of them on (the cycle continued). Every token of the repeat is an answer: in the
    block, it followed the token before it; except the repeat's first and the one after the
    block's last id (the block does not say what follows that). This is what MQAR needs, a head
    that finds the token after the earlier occurrence of the current one (an induction head),
    scored at every token of a repeat instead of once per pair: at a toy size this model and a
    plain GPT form such a head within 12,000 steps on this task, and neither does on MQAR in
    30,000; with this task in half its examples, full attention learns MQAR at the default size
    (RESULTS.md, section 6). The whole block is in every model's window; filler fills the rest."""
    length = p.example_length
    ids = np.concatenate([KEY_BASE + np.arange(p.n_keys), VALUE_BASE + np.arange(p.n_values)])
    s = max(2, min(p.window // 2, length // 2, len(ids)))
    blocks = min(length // (2 * s), len(ids) // s)
    # no id in two blocks: the earlier occurrence of each is the one in its own block
    chosen = rng.choice(ids, (blocks, s), replace=False)
    tokens, answers = filler('induction', rng, length, p, None), np.zeros(length, dtype=bool)
    for start, block in zip(range(0, 2 * s * blocks, 2 * s), chosen):
        repeat = np.roll(block, -rng.integers(s))
        tokens[start:start + 2 * s] = np.concatenate([block, repeat])
        answers[start + s + 1:start + 2 * s] = repeat[:-1] != block[-1]
    return tokens, answers


def make_examples(task, rng, n, p, text=None, distance=None):
    """n examples of task stacked: tokens (n, example_length) int64, answers (n, example_length)
    bool. task=None draws the task of each example at random: the training mix, the induction
    task in a share p.induction_share of the examples."""
    def example():
        if task is not None:
            return make_example(task, rng, p, text, distance)
        if p.induction_share > 0 and rng.random() < p.induction_share:
            return induction_example(rng, p)
        return make_example(TASKS[rng.integers(len(TASKS))], rng, p, text, distance)
    pairs = [example() for _ in range(n)]
    return np.stack([t for t, _ in pairs]), np.stack([a for _, a in pairs])


def shakespeare_tokens(split):
    """The token ids of data/shakespeare/{split}.bin (tokenized first if need be): text filler."""
    data_dir = os.path.join(ROOT, 'data', 'shakespeare')
    prepare_dataset(data_dir, ddp=False)
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


# -----------------------------------------------------------------------------
# Scoring. Position i of the inputs x = tokens[:-1] predicts token i + 1, as in train.py, so
# the answers at mask positions t are read off the outputs at t - 1: where = answers[:, 1:].

@torch.no_grad()
def answer_logits(model, x, where, sink_tokens=0):
    """The logits (n, V) at the positions where[b, i] is True of the inputs x (B, T), in row
    order: one pass of the model over x, the output layer at those positions only (model(x)
    would give the last position's alone). With sink_tokens=k the first k tokens of every
    example stay in view of every query (StreamingLLM's attention sinks)."""
    return model.lm_head(model.hidden_states(x, sink_tokens)[where])


def model_predictor(model, n_values, sink_tokens=0):
    """predict(x, where) -> the value each answer position of x gives the highest logit."""
    def predict(x, where):
        logits = answer_logits(model, x, where, sink_tokens)
        return VALUE_BASE + logits[:, VALUE_BASE:VALUE_BASE + n_values].argmax(dim=-1)
    return predict


def score(predict, tokens, answers, device='cpu'):
    """(correct, total) over the answers of a batch of examples: tokens and answers are
    (B, example_length) arrays as make_examples gives them; predict(x, where) returns the
    predicted token ids at the positions where (B, T) is True of the inputs x (B, T)."""
    tokens = torch.from_numpy(tokens).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    where = torch.from_numpy(answers[:, 1:]).to(device)
    predicted = predict(x, where)
    return int((predicted == y[where]).sum()), int(where.sum())


# -----------------------------------------------------------------------------
# The trainings

def checkpoint_dir(name, seed):
    return os.path.join(out_root, f'{name}-s{seed}')


def train_settings(p, name, seed, steps=None):
    """The train.py settings of training `name` with `seed` under preset p, up to `steps` (by
    default to the end) of its one learning-rate schedule, p.max_iters long: train.py picks the
    device, these are the commands for any machine."""
    kind = dict(TRAININGS[name])
    window = kind.pop('window', p.window)
    return dict(
        out_dir=checkpoint_dir(name, seed), seed=seed, dataset='recall',
        example_length=p.example_length, block_size=p.block_size, n_layer=p.n_layer,
        n_head=p.n_head, n_embd=p.n_embd, window=p.block_size if window is None else window,
        **kind, dropout=0.0,
        batch_size=p.batch_size, max_iters=steps or p.max_iters, lr_decay_iters=p.max_iters,
        warmup_iters=p.warmup_iters, learning_rate=p.learning_rate, min_lr=p.learning_rate / 10,
        # evaluate at the start and at the end only, and keep the final weights
        eval_interval=steps or p.max_iters, eval_iters=20, log_interval=100,
        always_save_checkpoint=True,
        # no torch.compile: its start-up, tens of seconds, is a large part of a training this short
        compile=False)


def command(script, settings):
    """`python script --key=value ...`, script relative to the repo root, as a list."""
    return ['python', script, *(f'--{k}={v}' for k, v in settings.items())]


def run_command(cmd, **kwargs):
    """Start cmd (from `command`) with this Python, from any working directory."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, cmd[1]), *cmd[2:]], **kwargs)


def prepare_command():
    variant = dict(changes=changes) if changes else {}
    return command(os.path.join('data', 'recall', 'prepare.py'), dict(preset=preset, **variant))


def data_is_prepared(p):
    """True if data/recall holds the data of preset p (its meta.json says so)."""
    path = os.path.join(DATA_DIR, 'meta.json')
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f) == {k: getattr(p, k) for k in DATA_FIELDS}


def trained_steps(out_dir):
    """The iteration the checkpoint in out_dir got to; 0 if there is none."""
    try:
        return load_checkpoint(out_dir)['iter_num']
    except CheckpointError:
        return 0


def last_line(path):
    """The last line of the text file at path: the one-line error of a train.py that failed."""
    with open(path, errors='replace') as f:
        lines = f.read().strip().splitlines()
    return lines[-1] if lines else '(nothing)'


def next_stage(p, name, seed):
    """The train.py settings that take training (name, seed) to its next scoring step (resuming
    its checkpoint), or None once it is at the last."""
    steps = trained_steps(checkpoint_dir(name, seed))
    later = [s for s in p.score_steps if s > steps]
    if not later:
        return None
    settings = dict(train_settings(p, name, seed, later[0]), device=device, dtype=dtype)
    if steps > 0:
        settings['init_from'] = 'resume'
    return settings


def selected_seeds(p):
    """The seeds to train: those `seeds` names, or all of the preset's; SystemExit with one line
    for a seed the preset does not have."""
    if not seeds:
        return p.seeds
    try:
        chosen = tuple(int(seed) for seed in seeds.split(','))
    except ValueError:
        chosen = ()
    if not chosen or not set(chosen) <= set(p.seeds):
        raise SystemExit(f"seeds={seeds!r}: expected some of preset {preset}'s seeds "
                         f"{','.join(map(str, p.seeds))}, comma-separated, or '' for all")
    return chosen


def selected_trainings():
    """The trainings to run and evaluate: those `trainings` names, or all of TRAININGS; SystemExit
    with one line for a name that is not one."""
    if not trainings:
        return list(TRAININGS)
    chosen = trainings.split(',')
    if not set(chosen) <= set(TRAININGS):
        raise SystemExit(f"trainings={trainings!r}: expected some of {', '.join(TRAININGS)}, "
                         f"comma-separated, or '' for all")
    return [name for name in TRAININGS if name in chosen]


def run_trainings(p):
    """Prepare the data if needed, then run every training of the selected seeds that has not
    finished, `jobs` at a time; each logs to its out_dir/train.log, runs to each of p.score_steps in turn and is scored
    there (its scores.json), then goes on. A training cut short continues from its checkpoint.
    When one fails, or recall.py is stopped (Ctrl-C, SIGTERM), the others are stopped too: each
    saves a checkpoint at its next log step, and none runs on after recall.py."""
    if not data_is_prepared(p) and run_command(prepare_command()).wait() != 0:
        raise SystemExit("data/recall/prepare.py failed")
    # each training is scored as soon as it reaches a scoring step: scores.json is the result
    distances = band_distances(p.window, p.n_layer, p.max_distance, p.points_per_band)
    scorer = Scorer(p, distances)
    # one stopped after a stage but before its scoring is scored first (at the last step, it
    # would not run again: its checkpoint says it is finished)
    for seed in selected_seeds(p):
        for name in selected_trainings():
            steps = trained_steps(checkpoint_dir(name, seed))
            if steps in p.score_steps and steps not in saved_scores(p, name, seed, distances):
                scorer(name, seed)
    todo = [(name, seed, settings) for seed in selected_seeds(p) for name in selected_trainings()
            if (settings := next_stage(p, name, seed)) is not None]
    print(f"{len(todo)} trainings to run, {jobs} at a time")
    running = []
    # SIGTERM (from `timeout`, `kill` or a cluster) stops recall.py as Ctrl-C does: by raising
    # KeyboardInterrupt, so that the `finally` below stops the trainings too
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, seed, settings = todo.pop(0)
                os.makedirs(settings['out_dir'], exist_ok=True)
                log = open(os.path.join(settings['out_dir'], 'train.log'), 'a')
                process = run_command(command('train.py', settings), stdout=log,
                                      stderr=subprocess.STDOUT)
                running.append((process, settings['out_dir'], log, time.time(), name, seed))
                print(f"training {settings['out_dir']}")
            time.sleep(0.5)
            for entry in [r for r in running if r[0].poll() is not None]:
                process, out_dir, log, t0, name, seed = entry
                log.close()
                running.remove(entry)
                if process.returncode != 0:
                    log_path = os.path.join(out_dir, 'train.log')
                    raise SystemExit(f"training {out_dir} failed (exit {process.returncode}): "
                                     f"{last_line(log_path)} (the whole log: {log_path})")
                steps = trained_steps(out_dir)
                print(f"  {out_dir} at step {steps} in {time.time() - t0:.0f} s")
                if steps in p.score_steps:
                    scorer(name, seed)
                settings = next_stage(p, name, seed)
                if settings is not None:
                    todo.append((name, seed, settings))
    except KeyboardInterrupt:
        raise SystemExit("stopped: run the same command to continue the trainings from their "
                         "checkpoints") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if running:
            print(f"stopping {len(running)} training(s): each saves a checkpoint at its next "
                  f"log step")
        for process, *_ in running:
            process.terminate()                 # SIGTERM: train.py saves, then exits
        for process, _, log, *_ in running:
            process.wait()
            log.close()


def print_commands(p):
    """The commands that run the whole benchmark, one per line: for a GPU session elsewhere.
    Each training runs to its end in one go, so --action=eval scores it there alone: the steps
    before (the learning curve) need recall.py --action=train."""
    print(shlex.join(prepare_command()))
    for seed in selected_seeds(p):
        for name in selected_trainings():
            print(shlex.join(command('train.py', train_settings(p, name, seed))))
    variant = {key: value for key, value in dict(trainings=trainings, changes=changes).items()
               if value}
    print(shlex.join(command('recall.py', dict(preset=preset, action='eval', out_root=out_root,
                                               **variant))))


# -----------------------------------------------------------------------------
# The evaluation

SCORES = 'scores.json'       # each finished training's accuracies, beside its checkpoint


def evaluation_settings(p, distances):
    """What a training's scores depend on besides its weights: a scores.json made with other
    settings is stale."""
    return dict(tasks=list(TASKS), distances=list(distances), eval_seed=EVAL_SEED,
                preset=json.loads(json.dumps(dataclasses.asdict(p))))   # its tuples as lists


def saved_scores(p, name, seed, distances):
    """{step: {label: {task: [accuracy at each distance]}}} from the scores.json of training
    (name, seed), if it holds this evaluation's and none from beyond its checkpoint (if there is
    one: a training begun again); {} otherwise. With the JSON files alone (copied from the
    machines that trained), the tables can be made anywhere."""
    try:
        with open(os.path.join(checkpoint_dir(name, seed), SCORES)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if saved.get('evaluation') != evaluation_settings(p, distances):
        return {}
    scores = {int(step): per_label for step, per_label in saved['scores'].items()}
    steps = trained_steps(checkpoint_dir(name, seed))
    return {} if 0 < steps < max(scores, default=0) else scores


def evaluation_examples(p, distances, text):
    """{(task, d): (tokens, answers)}: the evaluation's examples, p.eval_examples of each task at
    each distance, the same for every model and every run (text: the held-out plays' tokens)."""
    return {(task, d): make_examples(task, np.random.default_rng([EVAL_SEED, i, d]),
                                     p.eval_examples, p, text, d)
            for i, task in enumerate(TASKS) for d in distances}


class Scorer:
    """Scores trainings on the evaluation's examples, the same ones for every model (made at the
    first use: they need the held-out plays), and adds the scores to each one's scores.json."""

    def __init__(self, p, distances):
        self.p, self.distances, self.examples = p, distances, None
        _, self.ctx = setup_device_and_precision(device, dtype)

    def __call__(self, name, seed):
        """Score training (name, seed) at the step its checkpoint got to, in each of its
        readings: {label: {task: [accuracy at each distance]}}, also kept in its scores.json."""
        p, distances = self.p, self.distances
        if self.examples is None:
            text = shakespeare_tokens('val')            # the held-out plays
            self.examples = evaluation_examples(p, distances, text)
        t0, step = time.time(), trained_steps(checkpoint_dir(name, seed))
        model, _ = load_model(checkpoint_dir(name, seed), 0, p.example_length, device)
        scores = {}
        for label, reading, sinks in READINGS:
            if reading != name:
                continue
            predict = model_predictor(model, p.n_values, sinks)
            scores[label] = {task: [] for task in TASKS}
            for (task, d), (tokens, answers) in self.examples.items():
                with self.ctx:
                    correct, total = score(predict, tokens, answers, device)
                scores[label][task].append(correct / total)
            print(f"{label}, seed {seed}, step {step}: " + ', '.join(
                f"{task} {100 * np.mean(scores[label][task]):.1f}%" for task in TASKS)
                + f" (mean over distances), {time.time() - t0:.1f} s")
        every_step = {**saved_scores(p, name, seed, distances), step: scores}
        saved = dict(evaluation=evaluation_settings(p, distances), scores=every_step)
        write_result(os.path.join(checkpoint_dir(name, seed), SCORES),
                     lambda path: write_text(path, json.dumps(saved, indent=1)))
        return scores


def evaluate(p, distances):
    """(accuracy, curves): accuracy[label][task], an array (seeds, distances) of each reading's
    accuracies at the end of its training, and curves[label][task], an array (seeds, score
    steps) of its accuracy averaged over the distances at each scoring step (NaN: not scored),
    over the seeds whose training has finished (a reading with none is left out, and said so).
    From each training's scores.json; a finished training not scored at its end is scored now."""
    scorer, found = Scorer(p, distances), {}
    for name in selected_trainings():
        for seed in p.seeds:
            scores = saved_scores(p, name, seed, distances)
            if p.max_iters not in scores and \
                    trained_steps(checkpoint_dir(name, seed)) >= p.max_iters:
                scores[p.max_iters] = scorer(name, seed)
            if p.max_iters in scores:
                found[name, seed] = scores
    if not found:
        raise SystemExit(f"no finished training in {out_root}: run python recall.py "
                         f"--preset={preset} --action=train first")
    accuracy, curves = {}, {}
    for label, name, _ in READINGS:
        if name not in selected_trainings():
            continue
        seeds = [seed for seed in p.seeds if (name, seed) in found]
        if len(seeds) < len(p.seeds):
            print(f"{label}: {len(seeds)} of {len(p.seeds)} trainings of {name} finished")
        if not seeds:
            continue
        row = label if len(seeds) == len(p.seeds) else \
            f"{label} ({len(seeds)} of {len(p.seeds)} seeds)"   # the table says so too
        accuracy[row] = {task: np.array([found[name, seed][p.max_iters][label][task]
                                         for seed in seeds]) for task in TASKS}
        curves[row] = {task: np.array([[np.mean(found[name, seed][step][label][task])
                                        if step in found[name, seed] else np.nan
                                        for step in p.score_steps] for seed in seeds])
                       for task in TASKS}
    return accuracy, curves


# -----------------------------------------------------------------------------
# Where the heads look: how much weight the question gives its fact, head by head. A model that
# answers from the window must put weight there; one whose weight fades with the distance while
# the fact is still in view loses it among the other tokens.

@torch.no_grad()
def fact_weights(model, tokens, answers, distance, batch_size=16):
    """(n_layer, H): each head's attention weight from a question to its fact, averaged over the
    answers of examples whose facts all sit `distance` back (make_examples(..., distance=d)):
    from the position whose output is the answer (the question's key) to the fact's value,
    `distance` tokens before it. Weights as eval.attention_weights gives them."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size, :-1]).to(device)
        b, m = torch.from_numpy(answers[i:i + batch_size, 1:]).to(device).nonzero(as_tuple=True)
        total = total + torch.stack([weights[b, :, m, m - distance].sum(dim=0)
                                     for weights, _ in attention_weights(model, x)])
    return total / int(answers[:, 1:].sum())


def format_fact_weights(label, weights, distances):
    """A markdown table: a row per layer, a column per distance, each cell the largest weight a
    head of that layer gives the fact (and which head). weights: {d: (n_layer, H)}."""
    lines = [f"{label}: the largest weight a head of each layer gives the fact (the head)", '',
             '| layer | ' + ' | '.join(str(d) for d in distances) + ' |',
             '|---|' + '---|' * len(distances)]
    for layer in range(len(weights[distances[0]])):
        cells = [f"{weights[d][layer].max():.2f} (h{int(weights[d][layer].argmax())})"
                 for d in distances]
        lines.append(f"| {layer} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def finished_models(p):
    """(label, seed, model) for every finished training of the selected ones."""
    for name in selected_trainings():
        for seed in p.seeds:
            if trained_steps(checkpoint_dir(name, seed)) < p.max_iters:
                continue
            model, _ = load_model(checkpoint_dir(name, seed), 0, p.example_length, device)
            label = next(label for label, reading, sinks in READINGS if reading == name)
            yield label, seed, model


def print_heads(p, distances):
    """For every finished training of the selected ones, per task, format_fact_weights."""
    examples = evaluation_examples(p, distances, shakespeare_tokens('val'))
    _, ctx = setup_device_and_precision(device, dtype)
    for label, seed, model in finished_models(p):
        for task in TASKS:
            with ctx:
                weights = {d: fact_weights(model, *examples[task, d], d).float().cpu()
                           for d in distances}
            print()
            print(format_fact_weights(f"{label}, seed {seed}, {TASK_TITLES[task]}", weights,
                                      distances))


# -----------------------------------------------------------------------------
# MQAR with fewer pairs. A model that answers one pair at every distance but fails with more has
# not lost the fact over the distance: it finds a value, the wrong one, confusing the keys. So
# the same trained model answers examples of 1, 2, 4 .. n_pairs pairs, and of its wrong answers
# we count those that are another value in view.

@torch.no_grad()
def answers_in_view(predict, tokens, answers, device='cpu'):
    """(right, in_view), a bool per answer of the examples (tokens, answers as make_examples
    gives them), in row order: whether predict(x, where) got it, and whether what it predicted
    is a value already in view, one of the tokens before the answer."""
    tokens = torch.from_numpy(tokens).to(device)
    x, where = tokens[:, :-1], torch.from_numpy(answers[:, 1:]).to(device)
    predicted = predict(x, where)
    rows, columns = where.nonzero(as_tuple=True)
    before = torch.arange(x.size(1), device=device) <= columns[:, None]     # (answers, T)
    in_view = ((x[rows] == predicted[:, None]) & before).any(dim=1)
    return predicted == tokens[:, 1:][where], in_view


def fewer_pairs_table(label, predict, p, distances, ctx, device='cpu'):
    """A markdown table: MQAR accuracy at each distance for examples of 1, 2, 4 .. n_pairs pairs
    (p.eval_examples examples each, the same for every model), and the share of the wrong
    answers that are another value in view."""
    counts = sorted({2 ** i for i in range(p.n_pairs.bit_length()) if 2 ** i < p.n_pairs}
                    | {p.n_pairs})
    columns = [f"d = {d}" for d in distances] + ['wrong: a value in view']
    lines = [f"{label}: MQAR accuracy (%) with fewer pairs; of the wrong answers, the share "
             f"that is a value in view", '', '| pairs | ' + ' | '.join(columns) + ' |',
             '|---|' + '---|' * len(columns)]
    for n in counts:
        fewer = dataclasses.replace(p, n_pairs=n)
        cells, wrong, wrong_in_view = [], 0, 0
        for d in distances:
            examples = make_examples('mqar', np.random.default_rng([EVAL_SEED, n, d]),
                                     p.eval_examples, fewer, distance=d)
            with ctx:
                right, in_view = answers_in_view(predict, *examples, device)
            cells.append(f"{100 * right.float().mean():.1f}")
            wrong += int((~right).sum())
            wrong_in_view += int((~right & in_view).sum())
        share = f"{100 * wrong_in_view / wrong:.0f}%" if wrong else '-'
        lines.append(f"| {n} | " + ' | '.join(cells) + f" | {share} |")
    return '\n'.join(lines)


def print_fewer_pairs(p, distances):
    """fewer_pairs_table for every finished training of the selected ones."""
    _, ctx = setup_device_and_precision(device, dtype)
    for label, seed, model in finished_models(p):
        print()
        print(fewer_pairs_table(f"{label}, seed {seed}", model_predictor(model, p.n_values), p,
                                distances, ctx, device))


def mean_std(values):
    """Mean and standard deviation (over the seeds; 0 for a single seed) of values."""
    values = np.asarray(values)
    return values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0


def percent(values):
    """A table's cell: values (one per seed) in percent, mean +- std; '-' for none (NaN)."""
    values = np.asarray(values)[np.isfinite(values)]
    if not len(values):
        return '-'
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def still_rising(curve):
    """Whether a curve (seeds, score steps) still rose at its last step: its mean over the
    seeds gained more than 1 point, and more than its spread over the seeds there."""
    (last, spread), (before, _) = mean_std(curve[:, -1]), mean_std(curve[:, -2])
    return last - before > max(0.01, spread)


def format_tables(accuracy, distances, window, n_layer, chance, curves=None):
    """One markdown table per task: a row per reading, a column per distance, each cell the
    accuracy in percent, mean +- std over the seeds; a reading whose curve (see evaluate) still
    rose at its last scoring step is marked so."""
    rf = receptive_field(window, n_layer)
    bands = {}
    for d in distances:
        bands.setdefault(band(d, window, n_layer), []).append(d)
    where = '; '.join(f"{b}: d = {ds[0]}-{ds[-1]}" for b, ds in bands.items())
    lines = [f"Accuracy in % (mean +- std over seeds) against distance d; the windowed models' "
             f"window w = {window}, receptive field {rf} ({where}); chance {100 * chance:.1f}%."]
    for task in TASKS:
        lines += ['', f"**{TASK_TITLES[task]}**", '',
                  '| model | ' + ' | '.join(str(d) for d in distances) + ' |',
                  '|---|' + '---|' * len(distances)]
        for label, per_task in accuracy.items():
            rising = curves is not None and still_rising(curves[label][task])
            name = f"{label} (still rising)" if rising else label
            lines.append(f'| {name} | ' + ' | '.join(map(percent, per_task[task].T)) + ' |')
    return '\n'.join(lines)


def format_curves(curves, score_steps):
    """One markdown table per task: a row per reading, a column per scoring step, each cell the
    accuracy averaged over the distances, in percent, mean +- std over the seeds."""
    lines = ["Accuracy in % averaged over the distances (mean +- std over seeds) at each scoring "
             "step of one training (one learning-rate schedule, to the last step); still rising: "
             "up by more than 1 point, and more than the spread over the seeds, at the last."]
    for task in TASKS:
        lines += ['', f"**{TASK_TITLES[task]}**", '',
                  '| model | ' + ' | '.join(f"step {s}" for s in score_steps) + ' | |',
                  '|---|' + '---|' * (len(score_steps) + 1)]
        for label, per_task in curves.items():
            mark = 'still rising' if still_rising(per_task[task]) else ''
            lines.append(f'| {label} | ' + ' | '.join(map(percent, per_task[task].T)) +
                         f' | {mark} |')
    return '\n'.join(lines)


def plot_accuracy(path, accuracy, distances, window, n_layer, chance):
    """Accuracy against distance, one panel per task, a line per reading (the band: +- std over
    seeds), with the window, the receptive field and chance drawn in. Writes path (PNG) and
    returns the figure (closed), for inspection."""
    import matplotlib                           # only here: nothing else needs it
    matplotlib.use('Agg')                       # write a file, no display needed
    import matplotlib.pyplot as plt

    rf = receptive_field(window, n_layer)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5), sharey=True)
    for ax, task in zip(axes, TASKS):
        for label, per_task in accuracy.items():
            mean, std = np.array([mean_std(column) for column in per_task[task].T]).T * 100
            ax.plot(distances, mean, marker='o', markersize=3, label=label)
            # an accuracy lies in [0, 100]: so does its band, however far apart the seeds are
            ax.fill_between(distances, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100),
                            alpha=0.2)
        ax.axvline(window, color='black', linestyle='--', linewidth=1, label=f'window w = {window}')
        ax.axvline(rf, color='black', linestyle=':', linewidth=1,
                   label=f'receptive field 1 + (w-1) x {n_layer} = {rf}')
        ax.axhline(100 * chance, color='gray', linewidth=1, label='chance')
        ax.set_title(TASK_TITLES[task])
        ax.set_xlabel('distance d from the fact to its question (tokens)')
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel('accuracy (%)')
    axes[-1].legend(fontsize=7, loc='center right')
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return fig


def write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)


def plot_path():
    """Where the plot goes: beside the checkpoints, in out_root (a path of its own stays so)."""
    return os.path.join(out_root, plot)


def check_settings():
    """The preset (with its changes), or SystemExit with one line for a setting that cannot
    work."""
    p = changed_preset(preset, changes)
    selected_trainings()
    if action not in ACTIONS:
        raise SystemExit(f"action={action!r}: expected one of {', '.join(ACTIONS)}")
    if jobs < 1:
        raise SystemExit(f"jobs={jobs}: expected 1 or more trainings at a time")
    if action != 'commands':                # (the commands are for another machine)
        setup_device_and_precision(device, dtype)   # a GPU that is not here: before the data
    if action in ('train', 'all'):
        check_folder(out_root, 'out_root')  # where the checkpoints go
    if plot and action in ('eval', 'all'):           # say so now, not after the evaluation
        check_plot(plot_path())
    check_task(p)
    selected_seeds(p)
    return p


def main(args=None):
    """Run the benchmark as the settings say; args: the --key=value overrides (default:
    sys.argv[1:])."""
    apply_overrides(globals(), config_keys, args)
    p = check_settings()
    if action == 'commands':
        print_commands(p)
        return
    if action in ('heads', 'pairs'):
        distances = band_distances(p.window, p.n_layer, p.max_distance, p.points_per_band)
        (print_heads if action == 'heads' else print_fewer_pairs)(p, distances)
        return
    if action in ('train', 'all'):
        run_trainings(p)
    if action in ('eval', 'all'):
        distances = band_distances(p.window, p.n_layer, p.max_distance, p.points_per_band)
        accuracy, curves = evaluate(p, distances)
        table = (format_tables(accuracy, distances, p.window, p.n_layer, 1 / p.n_values, curves)
                 + '\n\n' + format_curves(curves, p.score_steps))
        print()
        print(table)
        if plot:
            path, table_path = plot_path(), os.path.splitext(plot_path())[0] + '.md'
            write_result(table_path, lambda path: write_text(path, table + '\n'))
            write_result(path, lambda path: plot_accuracy(path, accuracy, distances, p.window,
                                                          p.n_layer, 1 / p.n_values))
            print(f"plot written to {path}, table to {table_path}")


if __name__ == '__main__':
    main()
