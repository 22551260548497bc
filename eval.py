"""
Long-context evaluation: the validation loss of trained models on texts far longer than the
sequences they were trained on.

The README's comparison (train the presets first; each writes its own out_dir):

    python eval.py --checkpoints=out-vanilla,out-swa,out-swa:sinks=4,out-swat,out-swat-negative,out-swat-nonalibi,out-swat-norope

`out-swa:sinks=4` is model 2 once more, read with 4 attention sinks (StreamingLLM). A checkpoint
is an out_dir (or a path to its ckpt.pt), optionally followed by `:sinks=K` and/or `:window=W`,
which override --sink_tokens and --window for that checkpoint alone.

Seed groups. An entry may name several out_dirs joined with +, the same model trained with
different seeds; the options, written once after the last, apply to every one of them:

    python eval.py --checkpoints=out-swat-s1+out-swat-s2+out-swat-s3,out-swa-s1+out-swa-s2:sinks=4

Each member is read as a checkpoint of its own would be, and the row shows mean ± std over them,
the std the sample one (ddof=1), e.g. 4.735 ± 0.012 (a group of one: its plain value); the plot
draws the mean in a band of ± one std. The row's label writes what the members' names share at
the start and the end once and what differs in braces, as a shell would expand it:
out-swat-s{1,2,3} (names all alike are joined with +). The members must be the same kind of
model, the same model_args in their checkpoints (attn, alibi, window, n_layer, ...): the seed is
the one thing a group averages over.

For each checkpoint and each evaluation length L this reads stretches of L + 1 consecutive
tokens from the held-out documents of data/<dataset>/val.bin (documents end with the
<|endoftext|> token; a stretch never crosses one), runs the model over each stretch in ONE
forward, and reports the mean cross-entropy in nats per token over all L positions of the
stretch: early positions see little context, late ones up to L - 1 tokens. A length longer than
every document is skipped and shown as '-'. --max_tokens_per_length caps the tokens scored per
length: max_tokens_per_length / L stretches, spread evenly over all documents (on Shakespeare,
L = 32768 reads the first 32769 tokens of the two plays that long). It prints a markdown table (rows = checkpoints,
columns = lengths) and plots loss against length into the PNG file --plot (this needs
matplotlib; --plot='' for the table alone).

The window. --window=0 (default) reads each model with the window it was trained with; a model
trained with window >= block_size never had a window (vanilla attention), so it reads with full
causal attention. --window=W reads with W instead, --window=-1 with full attention. The weights
do not depend on the window, so this only rebuilds the model around the same weights.

Memory. A windowed model runs through its normal forward, in O(L * w): the fused kernel on a
GPU, the chunked einsum reference on a CPU, chunked SDPA for softmax, a chunked dense pass with
sinks. None ever builds an L x L matrix, and the loss takes the logits 1024 positions at a time,
never all B x L x 50304 of them. --max_batch_tokens caps the tokens of one forward.

    python eval.py --checkpoints=out --lengths=128,512,2048 --device=cpu --plot=''

The heads. --heads=heads.png then reads each model over batch_size stretches of its block_size
and prints, for every layer and head, the mean weight its attention gives the key d tokens back
(d = 0 .. w - 1) and the mean norm of its output, and plots the weights against d: what a
sigmoid head with a steep positive slope does with its window, for instance.
"""

import contextlib
import math
import os
import re
import time

import numpy as np
import torch

from configurator import apply_overrides
from kernel import window_bias
from runtime import setup_device_and_precision
from swat import SWAT, CheckpointError, apply_rope, checkpoint_path, load_checkpoint
from tokenizer import EOT
from training import check_folder, check_token_file, write_failure

# -----------------------------------------------------------------------------
checkpoints = 'out'         # comma-separated out_dirs or ckpt.pt paths, each maybe :sinks=K:window=W
                            # (a+b+c: a seed group, one row of mean ± std)
dataset = 'shakespeare'     # reads data/<dataset>/val.bin
lengths = '128,512,2048,8192,32768'  # evaluation lengths, comma-separated
window = 0                  # 0: each model's own window; W > 0: window W; -1: full attention
sink_tokens = 0             # keep the first k tokens of each stretch in view (softmax baseline)
max_tokens_per_length = 65536  # tokens scored per length, spread over the documents; 0: all
batch_size = 8              # stretches per forward at most ...
max_batch_tokens = 16384    # ... and at most this many tokens per forward (one stretch at least)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', 'mps', ...
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
                            # of the matmuls: 'float32', 'bfloat16', 'float16'
plot = 'eval.png'           # the plot: a .png, .pdf or .svg (needs matplotlib); '' for none
heads = ''                  # a plot of each head's mean weight against distance, and its output's
                            # norm, over batch_size stretches of block_size; '' for none
config_keys = ['checkpoints', 'dataset', 'lengths', 'window', 'sink_tokens', 'max_tokens_per_length',
               'batch_size', 'max_batch_tokens', 'device', 'dtype', 'plot', 'heads']
# -----------------------------------------------------------------------------
FULL = -1                   # the window value that means full causal attention
PLOT_FORMATS = ('.png', '.pdf', '.svg')     # what matplotlib writes with nothing else installed
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


def parse_checkpoint(spec, default_window, default_sinks):
    """'out-swa:sinks=4' -> ('out-swa', window, sinks): the path and its evaluation settings.
    The path of a seed group is its members' joined with +: 'out-s1+out-s2:sinks=4'."""
    path, *options = spec.split(':')
    if '' in path.split('+'):
        raise SystemExit(f"checkpoint {spec!r}: an out_dir is missing; expected an out_dir, or "
                         f"several joined with + (a seed group), before any :option")
    settings = {'window': default_window, 'sinks': default_sinks}
    for option in options:
        key, _, value = option.partition('=')
        if key not in settings or not re.fullmatch(r'-?[0-9]+', value):
            raise SystemExit(f"checkpoint {spec!r}: bad option {option!r}; expected "
                             f"sinks=K or window=W after the path, e.g. out-swa:sinks=4")
        settings[key] = int(value)
    window, sinks = settings['window'], settings['sinks']
    if window < FULL:
        raise SystemExit(f"checkpoint {spec!r} would read with window={window}; expected a "
                         f"window W >= 1, 0 (the model's own) or -1 (full attention)")
    if sinks < 0:
        raise SystemExit(f"checkpoint {spec!r} would read with sinks={sinks}; expected 0 or "
                         f"more sink tokens")
    return path, window, sinks


def load_model(path, eval_window, full_window, device):
    """The model saved at path (an out_dir or a ckpt.pt), rebuilt to read with eval_window
    (0: its own, -1: full). Full attention is a window of full_window >= every length read.
    Returns the model (in eval mode) and its label for the table."""
    try:
        # first what it was trained with, then the model around the same weights with the
        # window to read with (reading the file twice costs little next to the evaluation)
        args = load_checkpoint(path, option='--checkpoints')['model_args']
        trained = args['window']
        if eval_window == 0:
            # a model trained with window >= block_size saw full causal attention in training
            eval_window = FULL if trained >= args['block_size'] else trained
        model, _ = SWAT.from_checkpoint(path, device,
                                        window=full_window if eval_window == FULL else eval_window)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None

    # label: the out_dir's name and what kind of model it is
    name = checkpoint_name(path)
    w = 'full' if eval_window == FULL else f"{eval_window}"
    if eval_window != trained and not (eval_window == FULL and trained >= args['block_size']):
        w += f" (trained {trained})"
    rope = 'rope' if args['rope'] else 'no rope'
    attn = args['attn'] + (' + b=-log w' if args.get('sigmoid_bias') else '')  # (older files lack it)
    label = f"{name} ({attn}, alibi {args['alibi']}, {rope}, w={w})"
    return model, label


def checkpoint_name(path):
    """The name of the out_dir that holds the checkpoint at path (an out_dir or a ckpt.pt)."""
    return os.path.basename(os.path.normpath(os.path.dirname(checkpoint_path(path)) or '.'))


def check_same_kind(paths):
    """SystemExit with one line unless the checkpoints of a seed group hold the same kind of model:
    the same model_args (the seed is not one of them). Called once load_model has read each, so
    reading them again cannot fail, and costs little next to the evaluation."""
    (first, expected), *others = [(path, load_checkpoint(path)['model_args']) for path in paths]
    for path, args in others:
        differ = [f"{key}={expected.get(key)!r} vs {args.get(key)!r}"
                  for key in {**expected, **args} if expected.get(key) != args.get(key)]
        if differ:
            raise SystemExit(f"seed group {'+'.join(paths)!r}: {first} and {path} are not the same "
                             f"kind of model ({', '.join(differ)}); a group is one model trained "
                             f"with different seeds")


def group_label(paths, labels):
    """A seed group's row label from its members' paths and load_model labels (the out_dir's name,
    then what kind of model it is, read how: alike for all): the names with what they share at
    the start and the end written once and what differs in braces, out-swat-s{1,2,3}, never
    splitting a number (s{1,12}, not s1{,2}); names all alike are joined with +. A group of one:
    its member's label."""
    names = [checkpoint_name(path) for path in paths]
    kind = labels[0][len(names[0]):]
    if len(set(names)) == 1:                # one member, or out_dirs of one name in other folders
        return '+'.join(names) + kind
    start = re.sub(r'[0-9]+$', '', os.path.commonprefix(names))
    rests = [name[len(start):] for name in names]
    end = re.sub(r'^[0-9]+', '', os.path.commonprefix([rest[::-1] for rest in rests])[::-1])
    middles = [rest[:len(rest) - len(end)] for rest in rests]
    return f"{start}{{{','.join(middles)}}}{end}{kind}"


def check_plot(path):
    """Stop with one line unless a plot can be written to path (eval.py's and recall.py's):
    matplotlib is there, the file name ends in a format it writes without other software, and
    its folder takes files (it is made if need be). Before any work, not after the evaluation."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"plot={path!r} needs matplotlib, which is not installed: "
                         f"pip install matplotlib, or --plot='' for the table only") from None
    if os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
        raise SystemExit(f"plot={path!r}: expected a file name ending in "
                         f"{', '.join(PLOT_FORMATS)}, or --plot='' for the table only")
    check_folder(os.path.dirname(path) or '.', 'plot')


def datasets():
    """The datasets there are: the folders of data/ that have a prepare.py to make them."""
    return sorted(name for name in os.listdir(DATA_DIR)
                  if os.path.isfile(os.path.join(DATA_DIR, name, 'prepare.py')))


def val_path(dataset):
    """The path of data/<dataset>/val.bin, or SystemExit saying how to make it."""
    path = os.path.join(DATA_DIR, dataset, 'val.bin')
    if not os.path.exists(path):
        if dataset in datasets():
            raise SystemExit(f"no {path}: run python data/{dataset}/prepare.py first")
        raise SystemExit(f"dataset={dataset!r}: there is no data/{dataset}/val.bin nor a "
                         f"prepare.py to make it; the datasets are {', '.join(datasets())}")
    return path


# -----------------------------------------------------------------------------
# the stretches of text

def documents(tokens):
    """[(start, end), ...]: the documents of a token array, without their <|endoftext|>."""
    ends = np.flatnonzero(tokens == EOT).tolist()
    if not ends or ends[-1] != len(tokens) - 1:
        ends.append(len(tokens))                  # a last document with no EOT after it
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


def stretch_starts(docs, L, max_tokens):
    """Where the stretches of length L start: L + 1 tokens each (L inputs, L targets), laid end
    to end inside each document, never across two. When there are more than max_tokens / L of
    them (max_tokens > 0), take that many spread evenly over all documents, so that every length
    samples all of the validation text rather than its first document. [] if no document has
    L + 1 tokens."""
    candidates = [s for start, end in docs for s in range(start, end - L, L)]
    n = len(candidates) if max_tokens <= 0 else min(len(candidates), max(1, max_tokens // L))
    if n == 0:
        return []
    picks = np.linspace(0, len(candidates) - 1, n).round().astype(int)
    return [candidates[i] for i in picks]


# -----------------------------------------------------------------------------
# the loss

@torch.no_grad()
def stretch_loss(model, x, y, sink_tokens=0):
    """Mean cross-entropy (nats/token) of the targets y (B, L) given the inputs x (B, L), all
    positions, each row read in one pass of the model's normal forward: O(L * w) for a windowed
    model, and the loss in chunks, never all L x V logits. sink_tokens > 0 keeps the first
    tokens in view too (StreamingLLM)."""
    _, loss = model(x, y, sink_tokens=sink_tokens)
    return loss.item()


def evaluate(model, tokens, starts, L, sink_tokens, rows, device, ctx):
    """Mean loss over the stretches of length L that start at `starts`, `rows` per forward."""
    total = 0.0
    for i in range(0, len(starts), rows):
        batch = np.stack([tokens[s:s + L + 1].astype(np.int64) for s in starts[i:i + rows]])
        batch = torch.from_numpy(batch).to(device)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()   # y: x shifted by one
        with ctx:
            loss = stretch_loss(model, x, y, sink_tokens)
        total += loss * len(batch)                  # every row has L targets: weight by rows
    return total / len(starts)


def losses_by_length(model, label, sinks, tokens, starts, ctx):
    """The model's loss at each evaluation length L (starts: {L: its stretches}), None where it
    has none (no document is that long), and a line about each."""
    losses = []
    for L, at in starts.items():
        if not at:
            print(f"{label}  L={L}: skipped, no document has {L + 1} tokens")
            losses.append(None)
            continue
        t0 = time.time()
        rows = max(1, min(batch_size, max_batch_tokens // L))
        loss = evaluate(model, tokens, at, L, sinks, rows, device, ctx)
        if not math.isfinite(loss):
            print(f"warning: {label} at L={L} has a non-finite loss {loss}")
        print(f"{label}  L={L}: {loss:.4f} nats/token over {len(at) * L:,} tokens "
              f"({len(at)} stretches) in {time.time() - t0:.1f} s")
        losses.append(loss)
    return losses


def mean_std(losses):
    """A seed group's cell at one length from its members' losses: their mean and sample
    standard deviation (ddof=1); the std is None for a group of one, both are None where the
    length was skipped (for every member alike: the stretches depend on the length alone)."""
    if losses[0] is None:
        return None, None
    if len(losses) == 1:
        return losses[0], None
    return float(np.mean(losses)), float(np.std(losses, ddof=1))


# -----------------------------------------------------------------------------
# what each head does

@torch.no_grad()
def attention_weights(model, x):
    """Layer by layer, model's attention weights reading x (B, T), (B, H, T, T), and its values
    (B, H, T, D). For a sigmoid model a weight is sigmoid(q . k / sqrt(D) + s_h d + b), each
    key's own (b: 0, or -log(w) with sigmoid_bias); for softmax, its share of the query's
    attention. Written out densely, T x T per head: a probe of the model, not a way to read long
    texts."""
    cfg = model.config
    B, T = x.shape
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    cos_sin = model.rope_table(T, x.device)
    hidden = model.transformer.wte(x)
    for block in model.transformer.h:
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(cfg.n_embd, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2).float() for t in (q, k, v))   # (B, H, T, D)
        if cos_sin is not None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        # + s_h (m - n) inside the window, -inf outside it: Eq. 5's logits, every query at once
        bias = window_bias(0, T, 0, attn.slopes.float(), cfg.window)            # (H, T, T)
        logits = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        yield (torch.sigmoid(logits + attn.logit_bias) if attn.kind == 'sigmoid'
               else logits.softmax(dim=-1)), v
        hidden = block(hidden, cos_sin)


def head_statistics(model, x):
    """Per layer and head of model reading x (B, T): the mean weight its attention gives the key
    d tokens back, for d = 0 .. min(w, T) - 1 (over the queries at least d into x), (n_layer, H,
    min(w, T)); and the mean norm of the head's output, its weighted sum of values before the
    output projection, (n_layer, H). The weights: attention_weights."""
    weight_at, norm = [], []
    for weights, v in attention_weights(model, x):
        weight_at.append(torch.stack([weights.diagonal(-d, dim1=-2, dim2=-1).mean(dim=(0, 2))
                                      for d in range(min(model.config.window, x.size(1)))],
                                     dim=-1))                                  # (H, w)
        norm.append((weights @ v).norm(dim=-1).mean(dim=(0, 2)))                    # (H,)
    return torch.stack(weight_at), torch.stack(norm)


def format_heads(label, slopes, weight_at, norm):
    """Lines of a markdown table: each head of a model, its slope, its mean weight near, midway
    and far back in its window, the sum of those means (how many keys' worth it takes in) and
    its output's norm."""
    reach = weight_at.size(-1)
    lines = [f"**{label}**", '', f"| layer | head | slope | weight d=0 | d={reach // 2} | "
             f"d={reach - 1} | sum over d | output norm |", '|---|---|---|---|---|---|---|---|']
    for layer in range(weight_at.size(0)):
        for h in range(weight_at.size(1)):
            w = weight_at[layer, h]
            lines.append(f"| {layer} | {h} | {slopes[h]:+.4g} | {w[0]:.3g} | {w[reach // 2]:.3g} "
                         f"| {w[-1]:.3g} | {w.sum():.3g} | {norm[layer, h]:.3g} |")
    return '\n'.join(lines)


def plot_heads(path, labels, slopes, weight_at, norms):
    """Mean weight against distance, a panel per checkpoint (rows) and layer (columns), a line
    per head: blue the heads of negative slope (they favour recent keys), red positive, gray
    none; the legend gives each head's slope and output norm."""
    import matplotlib                             # only here: nothing else needs it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n_layer = max(w.size(0) for w in weight_at)
    fig, axes = plt.subplots(len(labels), n_layer, figsize=(4 * n_layer, 3 * len(labels)),
                             squeeze=False, sharey=True)
    for row, (label, s, w, n) in enumerate(zip(labels, slopes, weight_at, norms)):
        for layer in range(n_layer):
            ax = axes[row, layer]
            if layer >= w.size(0):
                ax.axis('off')
                continue
            for h in range(w.size(1)):
                color = 'tab:blue' if s[h] < 0 else 'tab:red' if s[h] > 0 else 'gray'
                ax.plot(w[layer, h].numpy(), color=color, alpha=0.4 + 0.6 * h / w.size(1),
                        label=f"s={s[h]:+.3g}, |y|={n[layer, h]:.2f}")
            ax.set_yscale('log')
            ax.set_title(f"{label[:40]}: layer {layer}", fontsize=8)
            ax.set_xlabel('distance back d')
            ax.legend(fontsize=5)
        axes[row, 0].set_ylabel('mean weight')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the output

def format_table(labels, lengths, results, spreads=None):
    """A markdown table: one row per checkpoint, one column per length; '-' where skipped. With
    spreads (a std or None per cell, as results), a seed group's cells are mean ± std."""
    lines = ['| model | ' + ' | '.join(str(L) for L in lengths) + ' |',
             '|---|' + '---|' * len(lengths)]
    spreads = spreads or [[None] * len(lengths)] * len(labels)
    for label, losses, stds in zip(labels, results, spreads):
        cells = ['-' if loss is None else f'{loss:.3f}' + ('' if std is None else f' ± {std:.3f}')
                 for loss, std in zip(losses, stds)]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_losses(path, labels, lengths, results, training_lengths, title, spreads=None):
    """Loss against evaluation length, log2 x axis, one line per checkpoint; with spreads (a std
    or None per point, as results), a seed group's mean in a band of ± its std."""
    import matplotlib                             # only here: nothing else needs it
    matplotlib.use('Agg')                         # write a file, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    spreads = spreads or [[None] * len(lengths)] * len(labels)
    for label, losses, stds in zip(labels, results, spreads):
        points = [(L, loss, std) for L, loss, std in zip(lengths, losses, stds) if loss is not None]
        if points:
            xs, ys, errors = zip(*points)
            line, = ax.plot(xs, ys, marker='o', label=label)
            if errors[0] is not None:           # a seed group of two or more
                ax.fill_between(xs, np.subtract(ys, errors), np.add(ys, errors),
                                color=line.get_color(), alpha=0.2)
    for L in sorted(set(training_lengths)):
        ax.axvline(L, color='gray', linestyle=':', linewidth=1)
    ax.set_xscale('log', base=2)
    ax.ticklabel_format(axis='y', useOffset=False)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel('evaluation length (tokens); dotted: training length')
    ax.set_ylabel('validation loss (nats/token)')
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_result(path, write):
    """write(path), a plot or a table of numbers already printed; if the disk refuses it (full,
    the folder gone), one line that says so, and no half-written file left behind."""
    try:
        write(path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise SystemExit(f"cannot write {path} ({write_failure(error)}); the table above holds "
                         f"the numbers: make room and run again, or pass --plot='' for none") \
            from None


def check_settings():
    """The evaluation lengths and the checkpoints' (path, window, sinks), a seed group's path its
    members' joined with +, or SystemExit with one line for a setting that cannot work: all
    checked before any work."""
    for path in (plot, heads):
        if path:
            check_plot(path)
    try:
        eval_lengths = [int(L) for L in lengths.split(',')]
    except ValueError:
        raise SystemExit(f"lengths={lengths!r}: expected comma-separated integers like 128,512")
    if not eval_lengths or min(eval_lengths) < 1:
        raise SystemExit(f"lengths={lengths!r}: every length must be at least 1")
    if batch_size < 1:
        raise SystemExit(f"batch_size={batch_size}: expected 1 or more stretches per forward")
    if max_batch_tokens < 1:
        raise SystemExit(f"max_batch_tokens={max_batch_tokens}: expected 1 or more tokens per "
                         f"forward (a stretch longer than that still runs, alone)")
    if max_tokens_per_length < 0:
        raise SystemExit(f"max_tokens_per_length={max_tokens_per_length}: expected 0 (all "
                         f"tokens) or more")
    specs = [parse_checkpoint(spec, window, sink_tokens) for spec in checkpoints.split(',') if spec]
    if not specs:
        raise SystemExit("checkpoints='': name at least one out_dir or ckpt.pt")
    return eval_lengths, specs


def main(args=None):
    """Evaluate as the settings say; args: the --key=value overrides (default: sys.argv[1:])."""
    apply_overrides(globals(), config_keys, args)
    eval_lengths, specs = check_settings()
    _, ctx = setup_device_and_precision(device, dtype)

    path = val_path(dataset)

    # Load every model before evaluating any, so that a bad checkpoint or setting fails at once,
    # not after an hour of evaluation. (The models here are small: all of them fit together.)
    groups = []                     # a row each: its label, sinks, and its members' (model, label)
    for spec, w, sinks in specs:
        paths = spec.split('+')
        members = [load_model(path, w, max(eval_lengths), device) for path in paths]
        if len(paths) > 1:
            check_same_kind(paths)
        if sinks > 0 and members[0][0].config.window >= max(eval_lengths):
            raise SystemExit(f"{spec}: sink tokens need a window shorter than the text; this model "
                             f"reads with full attention, which sees the first tokens anyway")
        suffix = f" +{sinks} sinks" if sinks else ''
        groups.append((group_label(paths, [label for _, label in members]) + suffix, sinks,
                       [(model, label + suffix) for model, label in members]))
    models = [(model, label, sinks) for _, sinks, members in groups for model, label in members]
    # train.py's checks of the data: uint16 ids, at least one, each inside every model's vocabulary
    check_token_file(path, 0, min(model.config.vocab_size for model, _, _ in models))

    tokens = np.memmap(path, dtype=np.uint16, mode='r')
    docs = documents(tokens)
    starts = {L: stretch_starts(docs, L, max_tokens_per_length) for L in eval_lengths}
    print(f"{dataset} val: {len(tokens):,} tokens in {len(docs)} documents, the longest "
          f"{max(e - s for s, e in docs):,} tokens")

    labels, results, spreads = [label for label, _, _ in groups], [], []
    for _, sinks, members in groups:
        losses = [losses_by_length(model, label, sinks, tokens, starts, ctx)
                  for model, label in members]
        means, stds = zip(*(mean_std(at) for at in zip(*losses)))     # length by length
        results.append(list(means))
        spreads.append(list(stds))

    print()
    print(format_table(labels, eval_lengths, results, spreads))
    if plot:
        training_lengths = [model.config.block_size for model, _, _ in models]
        title = f"{dataset}: validation loss against evaluation length"
        write_result(plot, lambda path: plot_losses(path, labels, eval_lengths, results,
                                                    training_lengths, title, spreads))
        print(f"plot written to {plot}")
    if heads:
        probe_heads(models, tokens, docs, ctx)


def probe_heads(models, tokens, docs, ctx):
    """The heads' table and plot (--heads): each model over its first batch_size stretches of
    its block_size."""
    labels, slopes, weight_at, norms = [], [], [], []
    for model, label, _ in models:
        L = model.config.block_size
        starts = stretch_starts(docs, L, batch_size * L)
        if not starts:
            print(f"{label}: no document has {L + 1} tokens, no heads to probe")
            continue
        x = torch.from_numpy(np.stack([tokens[s:s + L].astype(np.int64) for s in starts]))
        with ctx:
            w, n = head_statistics(model, x.to(device))
        labels.append(label)
        slopes.append(model.transformer.h[0].attn.slopes.tolist())
        weight_at.append(w.float().cpu())
        norms.append(n.float().cpu())
        print()
        print(format_heads(label, slopes[-1], weight_at[-1], norms[-1]))
    if labels:
        write_result(heads, lambda path: plot_heads(path, labels, slopes, weight_at, norms))
        print(f"heads plot written to {heads}")


if __name__ == '__main__':
    main()
