"""
The tests: python -m pytest -q test_swat.py

Without a GPU the Triton kernels run in Triton's CPU interpreter at small shapes (float32 and
float16; the interpreter multiplies bfloat16 wrongly inside tl.dot). With a GPU the same tests
run on it, and the GPU-only cases add full sizes, bfloat16 and torch.compile.
"""

import hashlib
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')     # must be set before triton is imported

import kernel  # noqa: E402
import swat  # noqa: E402
from kernel import (swat_attention, swat_attention_reference, swat_backward,  # noqa: E402
                    swat_forward, window_bias)
from swat import SWAT, KVCache, SWATConfig, alibi_slopes, apply_rope, rope_cos_sin  # noqa: E402
import tokenizer  # noqa: E402
from configurator import apply_overrides  # noqa: E402
from tokenizer import EOT, gpt2_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ROOT, 'data', 'shakespeare')
PREPARE = os.path.join(DATA, 'prepare.py')
# the scripts run as a user runs them: on a CPU through the reference, not the interpreter
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
GPU = torch.cuda.is_available()
DEVICE = 'cuda' if GPU else 'cpu'
needs_gpu = pytest.mark.skipif(not GPU, reason='needs a CUDA GPU')
# ||out - ref|| / ||ref|| against float64 (SPEC.md section 4)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def naive_swat(q, k, v, slopes, window, scale=None):
    """Eq. 5 written out with a full T x T mask, independently of kernel.py."""
    T, D = q.shape[-2:]
    scale = 1 / math.sqrt(D) if scale is None else scale
    m = torch.arange(T, device=q.device)[:, None]
    n = torch.arange(T, device=q.device)[None, :]
    visible = (n <= m) & (m - n <= window - 1)
    logits = scale * q @ k.transpose(-1, -2) + slopes.view(-1, 1, 1) * (m - n)
    return (torch.sigmoid(logits) * visible) @ v


def random_inputs(B, H, T, D, dtype=torch.float64, device=DEVICE):
    return [torch.randn(B, H, T, D, dtype=dtype, device=device) for _ in range(3)]


def random_slopes(H, sign='mixed'):
    magnitudes = torch.rand(H) * 0.5 + 0.01
    signs = {'mixed': torch.randint(0, 2, (H,)) * 2 - 1, 'positive': 1, 'negative': -1}[sign]
    return (magnitudes * signs).to(DEVICE)


def relative_error(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# -----------------------------------------------------------------------------
# the einsum reference against the naive definition

@pytest.mark.parametrize('T, window', [(1, 1), (37, 1), (37, 5), (37, 37), (37, 80), (300, 64), (300, 299)])
@pytest.mark.parametrize('sign', ['mixed', 'positive', 'negative'])
def test_reference_matches_naive(T, window, sign):
    q, k, v = random_inputs(2, 3, T, 16)
    slopes = random_slopes(3, sign).double()
    out = swat_attention_reference(q, k, v, slopes, window, chunk_size=64)
    assert relative_error(out, naive_swat(q, k, v, slopes, window)) < 1e-12


def test_reference_scale_argument():
    q, k, v = random_inputs(1, 2, 20, 16)
    slopes = random_slopes(2).double()
    out = swat_attention_reference(q, k, v, slopes, 6, scale=0.3)
    assert relative_error(out, naive_swat(q, k, v, slopes, 6, scale=0.3)) < 1e-12


def test_reference_gradcheck():
    q, k, v = (x.requires_grad_() for x in random_inputs(1, 2, 9, 4, device='cpu'))
    slopes = torch.tensor([-0.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: swat_attention_reference(q, k, v, slopes, 4, chunk_size=4), (q, k, v))


@pytest.mark.parametrize('attention', ['reference', 'kernel'])
def test_window_and_causality(attention):
    """Output m depends on keys m-w+1 .. m only: not on older tokens, never on future ones."""
    attend = swat_attention_reference if attention == 'reference' else swat_attention
    T, w, changed = 40, 6, 17
    q, k, v = random_inputs(1, 2, T, 16, dtype=torch.float32)
    slopes = random_slopes(2)
    out = attend(q, k, v, slopes, w)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, changed] += 1.0
    v2[:, :, changed] += 1.0
    out2 = attend(q, k2, v2, slopes, w)
    same = (out - out2).abs().amax(dim=(0, 1, 3)) == 0                 # per query position
    m = torch.arange(T, device=same.device)
    assert torch.equal(same, (m < changed) | (m >= changed + w))


# -----------------------------------------------------------------------------
# the fused kernels against the float64 ground truth and the reference

# (B, H, T, D, window): T below one block, T not a multiple of the blocks, w = 1, w not a
# multiple of the blocks, w = T, w > T, every head size, B * H > 1
CPU_SHAPES = [(1, 2, 1, 16, 1), (1, 2, 20, 16, 4), (2, 3, 77, 32, 1), (1, 2, 77, 16, 77),
              (1, 2, 50, 64, 200), (1, 2, 100, 128, 33), (2, 2, 130, 32, 17)]
GPU_SHAPES = [(2, 4, 1000, 64, 128), (1, 3, 2049, 128, 300), (2, 2, 513, 32, 1),
              (1, 2, 3000, 16, 5000), (1, 4, 4096, 128, 2048), (3, 2, 777, 64, 100)]
SHAPES = CPU_SHAPES + (GPU_SHAPES if GPU else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def check_against_ground_truth(B, H, T, D, window, dtype, sign):
    q, k, v = random_inputs(B, H, T, D)
    do = torch.randn_like(q)
    slopes = random_slopes(H, sign)
    inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = swat_attention(*inputs, slopes, window)
    out.backward(do.to(dtype))
    exact = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth = naive_swat(*exact, slopes.double(), window)
    truth.backward(do)
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, truth) < tolerance
    for name, x, x_exact in zip('qkv', inputs, exact):
        assert relative_error(x.grad, x_exact.grad) < tolerance, f'd{name}'
    reference = swat_attention_reference(*(x.detach() for x in inputs), slopes, window)
    assert relative_error(out, reference) < tolerance


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('B, H, T, D, window', SHAPES)
def test_kernel_matches_ground_truth(B, H, T, D, window, dtype):
    check_against_ground_truth(B, H, T, D, window, dtype, 'mixed')


@pytest.mark.parametrize('sign', ['positive', 'negative'])
def test_kernel_slope_signs(sign):
    check_against_ground_truth(2, 2, 90, 32, 24, torch.float32, sign)


def test_kernel_non_contiguous_inputs():
    """q, k, v as the model makes them: views into one (B, T, 3 * H * D) projection."""
    B, T, H, D, w = 2, 45, 2, 16, 9
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE)
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))
    slopes = random_slopes(H)
    out = swat_attention(q, k, v, slopes, w)
    assert relative_error(out, naive_swat(q.double(), k.double(), v.double(), slopes.double(), w)) < 1e-5


def test_kernel_writes_every_element():
    """Poisoned (NaN) output and gradient buffers come back fully overwritten."""
    B, H, T, D, w = 2, 3, 61, 32, 13
    q, k, v = random_inputs(B, H, T, D, dtype=torch.float32)
    do = torch.randn_like(q)
    slopes = random_slopes(H)
    out = swat_forward(q, k, v, slopes, w, D ** -0.5, torch.full_like(q, float('nan')))
    grads = swat_backward(do, q, k, v, slopes, w, D ** -0.5,
                          *(torch.full_like(q, float('nan')) for _ in range(3)))
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    truth = naive_swat(*exact, slopes.double(), w)
    truth.backward(do.double())
    assert relative_error(out, truth) < 1e-5
    for g, x in zip(grads, exact):
        assert relative_error(g, x.grad) < 1e-5


def bad_call(**changes):
    q, k, v = random_inputs(1, 2, 8, 16, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, slopes=torch.zeros(2, device=DEVICE), window=4)
    args.update(changes)
    swat_attention(**args)


@pytest.mark.parametrize('changes, message', [
    (dict(q=torch.randn(1, 2, 8, 96), k=torch.randn(1, 2, 8, 96), v=torch.randn(1, 2, 8, 96)), 'head size D=96'),
    (dict(k=torch.randn(1, 2, 9, 16)), 'one shape'),
    (dict(v=torch.randn(2, 8, 16)), 'one shape'),
    (dict(q=torch.randn(1, 2, 8, 16, dtype=torch.float64)), 'one dtype'),
    (dict(v=torch.randn(1, 2, 8, 16, device='meta')), 'one device'),
    (dict(slopes=torch.zeros(3)), 'shape (H,)'),
    (dict(window=0), 'window must be an integer >= 1'),
    (dict(window=2.5), 'window must be an integer >= 1'),
    (dict(q=torch.randn(1, 2, 0, 16), k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16)), 'empty'),
])
def test_kernel_rejects_bad_input(changes, message):
    changes = {name: x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type == 'cpu' else x
               for name, x in changes.items()}
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        bad_call(**changes)


@needs_gpu
def test_kernel_under_torch_compile():
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in random_inputs(2, 4, 500, 64))
    slopes = alibi_slopes(4).cuda()

    def loss(q, k, v):
        return swat_attention(q, k, v, slopes, 64).float().square().sum()

    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert relative_error(compiled, eager) < 1e-6


@needs_gpu
def test_kernel_memory_is_linear_in_length():
    """No (T x T) or (T x w) buffer: peak extra memory of forward+backward is O(T * D)."""
    B, H, T, D, w = 1, 8, 16384, 64, 2048
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in random_inputs(B, H, T, D))
    do = torch.randn_like(q)
    slopes = alibi_slopes(H).cuda()
    swat_attention(q, k, v, slopes, w).backward(do)        # tune first: tuning has its own buffers
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    swat_attention(q, k, v, slopes, w).backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_tensor = q.numel() * q.element_size()
    assert extra <= 5 * one_tensor            # out, dq, dk, dv and slack; T x w would be 32x


# -----------------------------------------------------------------------------
# the model

def tiny_config(**changes):
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, window=8, vocab_size=101)
    settings.update(changes)
    return SWATConfig(**settings)


def test_alibi_slopes():
    assert alibi_slopes(12).tolist() == [-2.0 ** -k for k in range(1, 7)] + [2.0 ** -k for k in range(1, 7)]
    assert torch.allclose(alibi_slopes(8, 'negative'), -(2.0 ** (-torch.arange(1, 9.0))))
    assert torch.equal(alibi_slopes(8, 'positive'), -alibi_slopes(8, 'negative'))
    assert torch.equal(alibi_slopes(4, 'none'), torch.zeros(4))
    assert alibi_slopes(6).dtype == torch.float32
    with pytest.raises(ValueError, match='even n_head'):
        alibi_slopes(5)
    with pytest.raises(ValueError, match='balanced'):
        alibi_slopes(4, 'sideways')


@pytest.mark.parametrize('changes, message', [
    (dict(n_embd=30, n_head=4), 'n_embd=30 must be divisible by n_head=4'),
    (dict(n_head=3, n_embd=48), "alibi='balanced'.*even n_head"),
    (dict(window=0), 'window=0 must be a positive integer'),
    (dict(attn='linear'), "attn='linear' is unknown"),
    (dict(alibi='left'), "alibi='left' is unknown"),
    (dict(n_head=2, n_embd=96), 'head size 48'),
])
def test_config_rejects_what_cannot_work(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)


@pytest.mark.parametrize('attn', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('alibi', ['balanced', 'negative', 'positive', 'none'])
def test_model_forward_backward(attn, alibi):
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn, alibi=alibi)).to(DEVICE)
    idx, targets = torch.randint(0, 101, (2, 2, 50), device=DEVICE)   # longer than block_size
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 50, 101)
    assert abs(loss.item() - math.log(101)) < 0.5                 # about uniform at init
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 101) and loss is None


@pytest.mark.parametrize('rope', [True, False])
def test_model_single_layer_sees_only_its_window(rope):
    torch.manual_seed(0)
    w, T, changed = 5, 30, 11
    model = SWAT(tiny_config(n_layer=1, window=w, rope=rope)).to(DEVICE).eval()
    idx = torch.randint(0, 101, (1, T), device=DEVICE)
    idx2 = idx.clone()
    idx2[0, changed] = (idx[0, changed] + 1) % 101
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(idx2, idx2)
    # position `changed` itself changes through its own embedding; look at everything else
    same = (a - b).abs().amax(dim=(0, 2)) == 0
    m = torch.arange(T, device=same.device)
    expected = (m < changed) | (m >= changed + w)
    assert torch.equal(same, expected)


def test_model_receptive_field_grows_with_depth():
    model = SWAT(tiny_config(n_layer=3, window=4))
    assert model.receptive_field == 1 + 3 * 3


# -----------------------------------------------------------------------------
# the tokenizer and the data

def test_tokenizer_file_hash():
    with open(tokenizer.RANKS_PATH, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer.RANKS_SHA256


def test_known_gpt2_encodings():
    enc = gpt2_tokenizer()
    assert enc.n_vocab == 50257 and EOT == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert gpt2_tokenizer() is enc  # cached


def test_decode_round_trip():
    enc = gpt2_tokenizer()
    text = "To be, or not to be\u2014that is the question:\n\tWhether \u2019tis nobler\u2026  \n\n  caf\u00e9 \u2603 "
    assert enc.decode(enc.encode_ordinary(text)) == text


@pytest.mark.parametrize("content", [None, b"IQ== 0\n"])  # missing, corrupt
def test_bad_tokenizer_file_gives_clear_error(tmp_path, monkeypatch, content):
    path = tmp_path / "r50k_base.tiktoken"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(tokenizer, "RANKS_PATH", str(path))
    gpt2_tokenizer.cache_clear()  # force a fresh load from the patched path
    try:
        with pytest.raises((ValueError, FileNotFoundError), match="git checkout data/r50k_base.tiktoken"):
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()  # the next test reloads the real file


def test_prepare_shakespeare(tmp_path):
    prepare = runpy.run_path(PREPARE)["prepare"]  # not as __main__: nothing runs on load
    n_train, n_val = prepare(str(tmp_path))
    train = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tmp_path / "val.bin", dtype=np.uint16, mode="r")
    assert (len(train), len(val)) == (n_train, n_val)
    # one EOT per work: 4 validation plays, the other 38 texts in train
    assert (val == EOT).sum() == 4 and val[-1] == EOT
    assert (train == EOT).sum() == 38 and train[-1] == EOT
    assert 0.08 < n_val / (n_train + n_val) < 0.12
    # no validation text leaks into train: a passage from inside each val play
    enc = gpt2_tokenizer()
    train_text = enc.decode(train.tolist())
    ends = np.flatnonzero(val == EOT)
    for start in [0, *(ends[:-1] + 1)]:
        passage = enc.decode(val[start + 1000:start + 1200].tolist())
        assert len(passage) > 300 and passage not in train_text


# -----------------------------------------------------------------------------
# the scripts: configurator, train.py, sample.py

# a model small enough to train for a few dozen steps in seconds on a CPU
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64', '--window=16',
        '--batch_size=4', '--eval_iters=2', '--device=cpu', '--compile=False', '--dtype=float32',
        '--dropout=0.0']


def run(script, *args, check=True):
    """Run `python script args...` from the repo root; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=SCRIPT_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def eval_losses(stdout):
    """[(step, train loss, val loss), ...] from train.py's evaluation lines."""
    return [(int(s), float(t), float(v)) for s, t, v in
            re.findall(r'step (\d+): train loss ([\d.]+), val loss ([\d.]+)', stdout)]


@pytest.fixture(scope='session')
def shakespeare():
    """Make sure data/shakespeare/{train,val}.bin exist (tokenize the corpus once if not)."""
    if not all(os.path.exists(os.path.join(DATA, f'{s}.bin')) for s in ('train', 'val')):
        run(os.path.join('data', 'shakespeare', 'prepare.py'))
    return DATA


@pytest.fixture(scope='module')
def trained(shakespeare, tmp_path_factory):
    """An out_dir holding the checkpoint of a 10-step run (tests must not modify it)."""
    out = tmp_path_factory.mktemp('trained')
    proc = run('train.py', *TINY, f'--out_dir={out}', '--max_iters=10', '--eval_interval=5',
               '--always_save_checkpoint=True')
    return out, proc


# -----------------------------------------------------------------------------
# configurator

def defaults():
    return {'batch_size': 16, 'learning_rate': 1e-3, 'compile': False, 'device': 'cpu',
            'start': '\n'}


def test_configurator_parses_and_checks_types():
    cfg = defaults()
    overrides = apply_overrides(cfg, list(cfg), ['--batch_size=32', '--learning_rate=3e-4',
                                                 '--compile=True', '--device=cuda:1'])
    assert cfg == {'batch_size': 32, 'learning_rate': 3e-4, 'compile': True, 'device': 'cuda:1',
                   'start': '\n'}
    assert set(overrides) == {'batch_size', 'learning_rate', 'compile', 'device'}
    # an int is fine where a float is expected, and becomes a float
    apply_overrides(cfg, list(cfg), ['--learning_rate=1'])
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)
    # a string setting keeps the text as written, quoted or not, even if it looks like a number
    apply_overrides(cfg, list(cfg), ['--start=123', '--device="cpu"'])
    assert cfg['start'] == '123' and cfg['device'] == 'cpu'
    apply_overrides(cfg, list(cfg), ['--start=a=b'])        # only the first '=' splits
    assert cfg['start'] == 'a=b'


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=1.5', 'batch_size'),         # float where an int is expected
    ('--batch_size=big', 'batch_size'),         # string where an int is expected
    ('--compile=1', 'True or False'),           # bool must be spelled True/False
    ('--compile=yes', 'True or False'),
    ('--learning_rate=fast', 'learning_rate'),
    ('--bach_size=8', 'valid keys: batch_size, learning_rate, compile, device, start'),  # typo
    ('batch_size=8', 'valid keys'),             # not --key=value
    ('--batch_size', 'valid keys'),
])
def test_configurator_errors(arg, message, capsys):
    cfg = defaults()
    with pytest.raises(SystemExit) as e:
        apply_overrides(cfg, list(cfg), [arg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert cfg == defaults()                    # nothing half-applied


# -----------------------------------------------------------------------------
# train.py

def test_train_loss_falls(shakespeare, tmp_path):
    proc = run('train.py', *TINY, f'--out_dir={tmp_path}', '--max_iters=60',
               '--eval_interval=30', '--learning_rate=1e-2', '--warmup_iters=5',
               '--lr_decay_iters=60', '--min_lr=1e-3', '--eval_iters=4')
    losses = eval_losses(proc.stdout)
    assert [step for step, _, _ in losses] == [0, 30, 60]
    first, last = losses[0], losses[-1]
    assert first[1] > 10.0                      # ~ln(50304) = 10.8 at initialisation
    assert last[1] < first[1] - 2.0, losses     # the train loss clearly falls
    assert last[2] < first[2] - 2.0, losses     # and so does the val loss
    assert re.search(r'done: final train loss [\d.]+, val loss [\d.]+ .*wall time', proc.stdout)
    assert os.path.exists(os.path.join(tmp_path, 'ckpt.pt'))
    assert not os.path.exists(os.path.join(tmp_path, 'ckpt.pt.tmp'))


def test_checkpoint_contents(trained):
    out, proc = trained
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu')
    assert set(ckpt) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}
    assert ckpt['iter_num'] == 10
    assert ckpt['model_args']['n_layer'] == 2 and ckpt['model_args']['window'] == 16
    assert ckpt['config']['batch_size'] == 4 and ckpt['config']['max_iters'] == 10
    assert ckpt['best_val_loss'] == pytest.approx(min(v for _, _, v in eval_losses(proc.stdout)),
                                                abs=1e-4)


def test_resume_continues_the_iteration_count(trained, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(trained[0], out)
    # the shape options on the command line are overruled by the checkpoint's
    proc = run('train.py', *TINY, '--n_layer=3', f'--out_dir={out}', '--init_from=resume',
               '--max_iters=20', '--eval_interval=5', '--always_save_checkpoint=True')
    assert 'continuing from iter 10' in proc.stdout
    assert 'n_layer=2 from the checkpoint' in proc.stdout
    assert [s for s, _, _ in eval_losses(proc.stdout)] == [10, 15, 20]
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu')
    assert ckpt['iter_num'] == 20 and ckpt['model_args']['n_layer'] == 2


def test_train_tokenizes_a_missing_dataset(tmp_path):
    """Without train.bin/val.bin, train.py runs data/<dataset>/prepare.py itself. Done in a copy
    of the repo (so the real .bin files stay put), started from another folder: data/ is found
    next to train.py, whatever the current directory."""
    repo = tmp_path / 'repo'
    (repo / 'data' / 'shakespeare').mkdir(parents=True)
    for name in os.listdir(ROOT):
        if name.endswith('.py'):
            shutil.copy(os.path.join(ROOT, name), repo)
    shutil.copy(os.path.join(ROOT, 'data', 'r50k_base.tiktoken'), repo / 'data')
    for name in ('prepare.py', 'plays.tar.xz'):
        shutil.copy(os.path.join(DATA, name), repo / 'data' / 'shakespeare')
    proc = subprocess.run([sys.executable, str(repo / 'train.py'), *TINY, '--max_iters=0',
                           f'--out_dir={tmp_path / "out"}'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'running' in proc.stdout and 'prepare.py' in proc.stdout
    for split in ('train', 'val'):
        assert os.path.getsize(repo / 'data' / 'shakespeare' / f'{split}.bin') > 100_000
    assert [s for s, _, _ in eval_losses(proc.stdout)] == [0]
    assert os.path.exists(tmp_path / 'out' / 'ckpt.pt')


def test_train_errors(shakespeare, tmp_path):
    proc = run('train.py', '--no_such_option=1', check=False)
    assert proc.returncode == 2
    assert 'unknown option --no_such_option' in proc.stderr
    assert 'valid keys:' in proc.stderr and 'batch_size' in proc.stderr and 'window' in proc.stderr
    assert 'Traceback' not in proc.stderr

    proc = run('train.py', '--max_iters=ten', check=False)
    assert proc.returncode == 2 and 'max_iters' in proc.stderr and 'Traceback' not in proc.stderr

    missing = tmp_path / 'nothing_here'
    proc = run('train.py', *TINY, '--init_from=resume', f'--out_dir={missing}', check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert os.path.join(str(missing), 'ckpt.pt') in proc.stderr

    proc = run('train.py', *TINY, '--dataset=no_such_dataset', f'--out_dir={tmp_path}',
               check=False)
    assert proc.returncode != 0 and 'no_such_dataset' in proc.stderr
    assert 'Traceback' not in proc.stderr

    proc = run('train.py', *TINY, '--block_size=100000000', f'--out_dir={tmp_path}', check=False)
    assert proc.returncode != 0 and 'block_size' in proc.stderr and 'Traceback' not in proc.stderr

    proc = run('train.py', *TINY, '--n_head=3', '--n_embd=48', f'--out_dir={tmp_path}',
               check=False)                     # balanced ALiBi needs an even number of heads
    assert proc.returncode != 0 and 'n_head' in proc.stderr and 'Traceback' not in proc.stderr


# -----------------------------------------------------------------------------
# sample.py and generation

SEPARATOR = '---------------'


def test_sample_prints_the_samples(trained, tmp_path):
    out, _ = trained
    proc = run('sample.py', f'--out_dir={out}', '--num_samples=3', '--max_new_tokens=8',
               '--device=cpu', '--start=ROMEO:')
    lines = proc.stdout.splitlines()
    assert lines.count(SEPARATOR) == 3
    assert proc.stdout.count('ROMEO:') >= 3     # each sample starts with the prompt
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('JULIET:\n', encoding='utf-8')
    proc = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=4',
               '--device=cpu', f'--start=FILE:{prompt}', '--top_k=0', '--temperature=1')
    assert proc.stdout.splitlines().count(SEPARATOR) == 1 and 'JULIET:' in proc.stdout


def test_sample_errors(tmp_path):
    proc = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert os.path.join(str(tmp_path), 'ckpt.pt') in proc.stderr and 'train.py' in proc.stderr

    proc = run('sample.py', f'--out_dir={tmp_path}', '--start=', check=False)
    assert proc.returncode != 0 and 'empty' in proc.stderr and 'Traceback' not in proc.stderr
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    proc = run('sample.py', f'--out_dir={tmp_path}', f'--start=FILE:{empty}', check=False)
    assert proc.returncode != 0 and 'empty' in proc.stderr and 'Traceback' not in proc.stderr

    proc = run('sample.py', '--temperature=hot', check=False)
    assert proc.returncode == 2 and 'valid keys' not in proc.stderr and 'temperature' in proc.stderr
    proc = run('sample.py', '--windw=3', check=False)
    assert proc.returncode == 2 and 'valid keys:' in proc.stderr and 'num_samples' in proc.stderr


def test_generate_appends_tokens():
    torch.manual_seed(0)
    model = SWAT(SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, window=16)).eval()
    idx = torch.randint(0, 50257, (2, 5))
    out = model.generate(idx, max_new_tokens=7, temperature=0.8, top_k=20)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], idx)
    # no position embedding: the context may grow past block_size
    long = model.generate(torch.randint(0, 50257, (1, 60)), max_new_tokens=10)
    assert long.shape == (1, 70)
    logits, loss = model(long)
    assert logits.shape == (1, 1, 50304) and loss is None


# -----------------------------------------------------------------------------
# train.py at full strength: resume, DDP, faults, FLOPs

def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu')


def file_hash(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_same_weights(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_resume_equals_an_uninterrupted_run(shakespeare, tmp_path, dropout):
    """6 steps in one go == 3 steps, stop, resume, 3 steps: bit for bit (same batches, same
    optimizer state, same dropout masks)."""
    args = [*TINY, f'--dropout={dropout}', '--eval_interval=3', '--always_save_checkpoint=True',
            '--warmup_iters=2', '--lr_decay_iters=6', '--learning_rate=1e-2',
            '--gradient_accumulation_steps=2']
    whole, half = tmp_path / 'whole', tmp_path / 'half'
    run('train.py', *args, f'--out_dir={whole}', '--max_iters=6')
    run('train.py', *args, f'--out_dir={half}', '--max_iters=3')
    assert load_ckpt(half)['iter_num'] == 3
    proc = run('train.py', *args, f'--out_dir={half}', '--max_iters=6', '--init_from=resume')
    assert 'continuing from iter 3' in proc.stdout and 'no random state' not in proc.stdout
    assert 'evaluating: 2 batches of train and val' in proc.stdout
    a, b = load_ckpt(whole), load_ckpt(half)
    assert a['iter_num'] == b['iter_num'] == 6
    assert_same_weights(a['model'], b['model'])
    assert a['best_val_loss'] == b['best_val_loss']
    assert a['rng_states'][0]['torch'].equal(b['rng_states'][0]['torch'])


def torchrun(*args, nproc=2):
    """Run train.py under torchrun with nproc processes on the CPU."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={nproc}', 'train.py', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**SCRIPT_ENV, 'OMP_NUM_THREADS': '1'})


def test_ddp_two_processes_equal_one(shakespeare, tmp_path):
    """2 processes of 1 micro-batch each == 1 process of 2 micro-batches (same global batch):
    the ranks read different micro-batches, and their gradients are averaged."""
    args = [*TINY, '--max_iters=4', '--eval_interval=2', '--always_save_checkpoint=True',
            '--gradient_accumulation_steps=2', '--learning_rate=1e-2', '--warmup_iters=1']
    proc = torchrun(*args, f'--out_dir={tmp_path / "ddp"}', '--backend=gloo')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the master alone logs: one evaluation line per evaluation, one 'done'
    assert [s for s, _, _ in eval_losses(proc.stdout)] == [0, 2, 4]
    assert proc.stdout.count('done: final train loss') == 1
    assert '2 process(es) x 1 micro-batch(es)' in proc.stdout
    digests = re.search(r'final weights, sha256 per rank: (\w+) (\w+)', proc.stdout)
    assert digests and digests[1] == digests[2], proc.stdout   # identical weights on both ranks

    single = run('train.py', *args, f'--out_dir={tmp_path / "single"}')
    a, b = load_ckpt(tmp_path / 'ddp'), load_ckpt(tmp_path / 'single')
    assert a['iter_num'] == b['iter_num'] == 4 and len(a['rng_states']) == 2
    assert_same_weights(a['model'], b['model'], rtol=1e-5, atol=1e-7)
    for (_, t1, v1), (_, t2, v2) in zip(eval_losses(proc.stdout), eval_losses(single.stdout)):
        assert t1 == pytest.approx(t2, abs=2e-4) and v1 == pytest.approx(v2, abs=2e-4)

    # the total micro-batches must split evenly among the processes
    proc = torchrun(*TINY, '--gradient_accumulation_steps=3', f'--out_dir={tmp_path / "bad"}')
    assert proc.returncode != 0
    assert 'gradient_accumulation_steps=3 must be divisible by the number of processes (2)' \
        in proc.stderr


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_works(shakespeare, tmp_path, signum):
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, 'train.py', *TINY, f'--out_dir={out}',
                             '--max_iters=100000', '--eval_interval=100000', '--log_interval=1'],
                            cwd=ROOT, env=SCRIPT_ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in proc.stdout:            # train.py logs line by line, even into a pipe
            lines.append(line)
            if line.startswith('iter 3:'):
                proc.send_signal(signum)
                break
        stdout = ''.join(lines) + proc.stdout.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stdout
    stopped = re.search(r'stopped at iter (\d+) by (\w+): .*--init_from=resume', stdout)
    assert stopped and stopped[2] == signal.Signals(signum).name, stdout
    assert 'Traceback' not in stdout
    stop_iter = int(stopped[1])
    assert stop_iter >= 3
    assert load_ckpt(out)['iter_num'] == stop_iter      # saved although the val loss was not
    assert not os.path.exists(out / 'ckpt.pt.tmp')

    proc = run('train.py', *TINY, f'--out_dir={out}', '--init_from=resume',
               f'--max_iters={stop_iter + 2}', '--eval_interval=100000')
    assert f'continuing from iter {stop_iter}' in proc.stdout
    assert load_ckpt(out)['iter_num'] == stop_iter + 2
    # and the interrupted run ends as one that was never stopped
    whole = tmp_path / 'whole'
    run('train.py', *TINY, f'--out_dir={whole}', f'--max_iters={stop_iter + 2}',
        '--eval_interval=100000', '--always_save_checkpoint=True')
    assert_same_weights(load_ckpt(out)['model'], load_ckpt(whole)['model'])


def test_sigterm_to_torchrun_saves_a_checkpoint(shakespeare, tmp_path):
    """torchrun passes SIGTERM on to its workers: they agree on the step, save, and stop."""
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             '--nproc_per_node=2', 'train.py', *TINY, f'--out_dir={out}',
                             '--gradient_accumulation_steps=2', '--max_iters=100000',
                             '--eval_interval=100000', '--log_interval=1'],
                            cwd=ROOT, env={**SCRIPT_ENV, 'OMP_NUM_THREADS': '1'}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('iter 3:'):
                proc.send_signal(signal.SIGTERM)
                break
        stdout = ''.join(lines) + proc.stdout.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    stopped = re.search(r'stopped at iter (\d+) by SIGTERM', stdout)
    assert stopped and stdout.count('stopped at iter') == 1, stdout
    ckpt = load_ckpt(out)
    assert ckpt['iter_num'] == int(stopped[1]) and len(ckpt['rng_states']) == 2


def test_nan_loss_stops_and_keeps_the_good_checkpoint(shakespeare, tmp_path):
    run('train.py', *TINY, f'--out_dir={tmp_path}', '--max_iters=2', '--eval_interval=2')
    ckpt = tmp_path / 'ckpt.pt'
    before = file_hash(ckpt), os.path.getmtime(ckpt)
    # A learning rate of 1e30 without clipping sends the weights to infinity in a few steps.
    # No evaluation before the end (eval_interval): that would save the state it measures.
    proc = run('train.py', *TINY, f'--out_dir={tmp_path}', '--init_from=resume',
               '--max_iters=10', '--eval_interval=100', '--always_save_checkpoint=True',
               '--learning_rate=1e30', '--grad_clip=0.0', '--warmup_iters=0', check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr
    assert re.search(r'the (evaluation )?loss is .*(nan|inf).* at iter \d+: training diverged',
                     proc.stderr), proc.stderr
    assert 'learning_rate' in proc.stderr
    assert (file_hash(ckpt), os.path.getmtime(ckpt)) == before
    ckpt_data = load_ckpt(tmp_path)
    assert ckpt_data['iter_num'] == 2
    assert all(torch.isfinite(t).all() for t in ckpt_data['model'].values())


def test_incompatible_checkpoint_is_refused_clearly(shakespeare, tmp_path):
    good = tmp_path / 'good'
    run('train.py', *TINY, f'--out_dir={good}', '--max_iters=0')
    ckpt = load_ckpt(good)

    # weights of another shape than model_args says
    bad = tmp_path / 'shape'
    bad.mkdir()
    tampered = dict(ckpt, model={**ckpt['model'], 'lm_head.weight': torch.zeros(50304, 48)})
    torch.save(tampered, bad / 'ckpt.pt')
    proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert str(bad / 'ckpt.pt') in proc.stderr and 'do not fit' in proc.stderr
    assert 'lm_head.weight' in proc.stderr and 'size mismatch' in proc.stderr

    # a parameter missing
    bad = tmp_path / 'missing'
    bad.mkdir()
    weights = dict(ckpt['model'])
    del weights['transformer.h.1.mlp.c_fc.weight']
    torch.save(dict(ckpt, model=weights), bad / 'ckpt.pt')
    proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'transformer.h.1.mlp.c_fc.weight' in proc.stderr

    # not a checkpoint of train.py at all
    bad = tmp_path / 'foreign'
    bad.mkdir()
    torch.save({'state_dict': ckpt['model']}, bad / 'ckpt.pt')
    proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert str(bad / 'ckpt.pt') in proc.stderr and "lacks ['best_val_loss'" in proc.stderr

    # an unknown model setting
    bad = tmp_path / 'args'
    bad.mkdir()
    torch.save(dict(ckpt, model_args={**ckpt['model_args'], 'n_experts': 8}), bad / 'ckpt.pt')
    proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'n_experts' in proc.stderr and str(bad / 'ckpt.pt') in proc.stderr

    # garbage
    bad = tmp_path / 'garbage'
    bad.mkdir()
    (bad / 'ckpt.pt').write_bytes(b'not a checkpoint')
    proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert 'cannot read the checkpoint' in proc.stderr


# -----------------------------------------------------------------------------
# the FLOP count behind MFU

def test_flops_per_token_counts_only_the_window():
    cfg = SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, window=16)
    model = SWAT(cfg)
    N, L, H, D = model.get_num_params(), 2, 2, 16
    for T, w in [(64, 16), (64, 64), (64, 1000), (1, 16), (17, 16), (1000, 7)]:
        model.config.window = w
        keys = sum(min(m + 1, w) for m in range(T))      # the in-window (query, key) pairs
        assert model.flops_per_token(T) == pytest.approx(6 * N + 12 * L * H * D * keys / T)
    model.config.window = 16
    assert model.flops_per_token() == model.flops_per_token(64)     # default: block_size
    # linear, not quadratic, in T once T >> w: the attention part per token stops growing
    attention = [model.flops_per_token(T) - 6 * N for T in (4096, 8192)]
    assert attention[1] == pytest.approx(attention[0], rel=1e-2)


@pytest.mark.parametrize('gpu, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                       ('NVIDIA A100-SXM4-40GB', 312e12), ('Tesla T4', None)])
def test_estimate_mfu_divides_model_flops_by_the_gpu_peak(monkeypatch, gpu, peak):
    model = SWAT(SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, window=16))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: gpu)
    mfu = model.estimate_mfu(1e6, 64, 'cuda:0')
    if peak is None:
        assert mfu is None                          # an unknown GPU: no made-up peak
    else:
        assert mfu == pytest.approx(model.flops_per_token(64) * 1e6 / peak)
    assert model.estimate_mfu(1e6, 64, 'cpu') is None


# -----------------------------------------------------------------------------
# constant-memory generation

def new_caches(model, sink_tokens=0, bounded=True):
    return [KVCache(model.config.window, sink_tokens, bounded) for _ in model.transformer.h]


@pytest.mark.parametrize('attn', ['sigmoid', 'softmax'])
def test_generation_with_cache_is_the_full_forward(attn, monkeypatch):
    """Greedy tokens and logits of the cached path are those of the full windowed forward
    recomputed over the whole text at every step, long past the window and block_size."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)    # on a CPU, the reference: much faster
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn)).to(DEVICE).eval()        # window 8, block_size 32
    P, N = 21, 100                                                  # prompt longer than the window
    prompt = torch.randint(0, 101, (2, P), device=DEVICE)
    out = model.generate(prompt, N, top_k=1)                        # (2, 121): 4 x block_size
    assert out.shape == (2, P + N) and torch.equal(out[:, :P], prompt)
    caches = new_caches(model)
    with torch.no_grad():
        cached, _ = model(prompt, caches=caches)                    # the prompt in 3 chunks
        for t in range(P, P + N):
            full, _ = model(out[:, :t])                             # the kernel / reference path
            assert torch.allclose(cached, full, atol=1e-4, rtol=0), (t, (cached - full).abs().max())
            assert torch.equal(out[:, t], full[:, -1].argmax(-1)), t
            cached, _ = model(out[:, t:t + 1], caches=caches)
        # with targets, the cached path gives every position's logits and the same loss
        targets = out[:, 1:].contiguous()
        full, full_loss = model(out[:, :-1], targets)
        cached, cached_loss = model(out[:, :-1], targets, caches=new_caches(model))
    assert torch.allclose(cached, full, atol=1e-4, rtol=0)
    assert abs(cached_loss.item() - full_loss.item()) < 1e-5


def test_sink_tokens_are_streaming_llm():
    """One layer, softmax: with s sinks the last position sees [first s tokens] + [last w tokens],
    placed next to each other. Layer-1 keys depend on their own token alone, so this is the full
    forward of a model with the same weights and a window of s + w over that concatenation."""
    torch.manual_seed(0)
    s, w = 3, 8
    model = SWAT(tiny_config(n_layer=1, attn='softmax', window=w)).to(DEVICE).eval()
    wide = SWAT(tiny_config(n_layer=1, attn='softmax', window=s + w)).to(DEVICE).eval()
    wide.load_state_dict(model.state_dict())
    seq = torch.randint(0, 101, (2, 60), device=DEVICE)
    caches = new_caches(model, sink_tokens=s)
    with torch.no_grad():
        cached, _ = model(seq[:, :30], caches=caches)               # a prompt of 4 chunks, then
        for t in range(30, 60):                                     # one token at a time
            expected, _ = wide(torch.cat([seq[:, :s], seq[:, t - w:t]], dim=1))
            assert torch.allclose(cached, expected, atol=1e-5, rtol=0), t
            cached, _ = model(seq[:, t:t + 1], caches=caches)
    assert len(caches[0]) == s + w - 1


def test_sink_tokens_change_nothing_until_the_window_leaves_them():
    """Until the text is s + w tokens long, no token has left the cache: with sinks the model
    attends causally to everything (the window of s + w), and up to w tokens the sinks are inside
    the window anyway, so the model is the plain windowed one."""
    torch.manual_seed(0)
    s, w = 4, 8
    model = SWAT(tiny_config(attn='softmax', window=w)).to(DEVICE).eval()
    wide = SWAT(tiny_config(attn='softmax', window=s + w)).to(DEVICE).eval()
    wide.load_state_dict(model.state_dict())
    seq = torch.randint(0, 101, (2, s + w), device=DEVICE)
    caches = new_caches(model, sink_tokens=s)
    with torch.no_grad():
        for t in range(1, s + w + 1):
            cached, _ = model(seq[:, t - 1:t], caches=caches)
            expected, _ = (model if t <= w else wide)(seq[:, :t])
            assert torch.allclose(cached, expected, atol=1e-5, rtol=0), t


def test_cache_stays_bounded():
    """After a long generation each layer holds s + w - 1 entries, never more; an unbounded cache
    holds every token and gives the same logits and tokens."""
    torch.manual_seed(0)
    s, w, P, N = 3, 8, 20, 150
    model = SWAT(tiny_config(attn='softmax', window=w)).to(DEVICE).eval()
    H, D = model.config.n_head, model.config.n_embd // model.config.n_head
    prompt = torch.randint(0, 101, (1, P), device=DEVICE)
    bounded, unbounded = new_caches(model, s), new_caches(model, s, bounded=False)
    with torch.no_grad():
        a, _ = model(prompt, caches=bounded)
        b, _ = model(prompt, caches=unbounded)
        for _ in range(N):
            assert all(len(cache) <= s + w for cache in bounded)
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
            token = a[:, -1].argmax(-1, keepdim=True)
            a, _ = model(token, caches=bounded)
            b, _ = model(token, caches=unbounded)
    for cache in bounded:
        assert cache.k.shape == cache.v.shape == (1, H, s + w - 1, D)
    assert all(len(cache) == P + N for cache in unbounded)
    tokens = [torch.cat(list(model.generate_tokens(prompt, 40, top_k=1, sink_tokens=s,
                                                   bounded=bounded)), dim=1)
              for bounded in (True, False)]
    assert torch.equal(*tokens)


def test_compiled_generation_gives_the_same_tokens():
    """sample.py --compile compiles forward_cached for dynamic shapes: the greedy tokens must be
    those of the eager model, through the prompt, the filling cache and the full one. (On the
    CPU through aot_eager: the graph capture is ours to get right, and no C compiler is needed.)"""
    torch.manual_seed(0)
    model = SWAT(tiny_config(window=8)).to(DEVICE).eval()
    prompt = torch.randint(0, 101, (1, 11), device=DEVICE)

    def greedy():
        return torch.cat(list(model.generate_tokens(prompt, 30, top_k=1)), dim=1)

    eager = greedy()
    backend = 'inductor' if DEVICE == 'cuda' else 'aot_eager'
    model.forward_cached = torch.compile(model.forward_cached, dynamic=True, backend=backend)
    assert torch.equal(greedy(), eager)


def test_rope_is_exact_far_out():
    """q at p and k at p - d score as q at d and k at 0, even at p = 2^24 + 7: rope_cos_sin
    computes the angles in float64. In float32, p itself is not representable any more."""
    torch.manual_seed(0)
    D, p = 64, 2 ** 24 + 7
    q, k = torch.randn(2, 1, D)

    def score(m, n, cos_sin):
        (cos_m, sin_m), (cos_n, sin_n) = cos_sin(m), cos_sin(n)
        return (apply_rope(q, cos_m, sin_m) * apply_rope(k, cos_n, sin_n)).sum().item()

    def float64_angles(position):
        return rope_cos_sin(torch.tensor([position]), D, 10000.0)

    def float32_angles(position):
        inv_freq = 10000.0 ** -(torch.arange(0, D, 2, dtype=torch.float32) / D)
        angles = torch.tensor([position], dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    for d in (0, 1, 7, 100):
        assert score(p, p - d, float64_angles) == pytest.approx(score(d, 0, float64_angles),
                                                                abs=1e-4)
    assert score(p, p - 1, float32_angles) != pytest.approx(score(1, 0, float32_angles), abs=1e-2)


def test_cached_positions_stay_inside_the_cache(monkeypatch):
    """However long the text, the cached path asks RoPE and ALiBi only for indices inside the
    cache, so 2^24 tokens in nothing is computed differently; and the logits after a long run
    equal those of the same context read from position 0."""
    torch.manual_seed(0)
    w = 8
    model = SWAT(tiny_config(window=w)).to(DEVICE).eval()
    largest = []                                        # the largest index each call asked for

    def spy(function, largest_index):
        def wrapper(*args):
            largest.append(largest_index(*args))
            return function(*args)
        return wrapper

    monkeypatch.setattr(swat, 'rope_cos_sin',
                        spy(rope_cos_sin, lambda positions, *_: positions.max().item()))
    monkeypatch.setattr(swat, 'window_bias', spy(window_bias, lambda m0, m1, *_: m1 - 1))
    seq = torch.randint(0, 101, (1, 400), device=DEVICE)
    with torch.no_grad():
        for sink_tokens in (2, 0):
            largest.clear()
            caches = new_caches(model, sink_tokens)
            model(seq[:, :30], caches=caches)                       # chunks of w: the largest L
            for t in range(30, 400):
                far, _ = model(seq[:, t:t + 1], caches=caches)
            assert max(largest) == sink_tokens + 2 * w - 2          # cache + one chunk, 0-based
        # no sinks in the last run: its last logits depend on the last receptive field alone
        near, _ = model(seq[:, -model.receptive_field:], caches=new_caches(model))
    assert torch.allclose(far, near, atol=1e-5, rtol=0)


def test_sample_streams_one_sample(trained):
    """num_samples=1 streams: the printed text is exactly the decoded prompt and sample, followed
    by the separator and tokens/s."""
    out, _ = trained
    proc = run('sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=200',
               '--device=cpu', '--start=ROMEO:')
    # the same sample in this process: same seed, same model, same draws
    torch.manual_seed(1337)
    checkpoint = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu')
    model = SWAT(SWATConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    model.eval()
    enc = gpt2_tokenizer()
    ids = model.generate(torch.tensor([enc.encode('ROMEO:')]), 200, temperature=0.8, top_k=200)
    printed, stats = proc.stdout.rsplit(SEPARATOR + '\n', 1)
    assert printed.endswith(enc.decode([i for i in ids[0].tolist() if i < enc.n_vocab]) + '\n')
    assert re.fullmatch(r'200 tokens in [\d.]+ s: [\d.]+ tokens/s\n', stats)


def tiny_softmax_checkpoint(out_dir):
    torch.manual_seed(0)
    config = SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, window=8, attn='softmax')
    torch.save({'model_args': asdict(config), 'model': SWAT(config).state_dict()},
               os.path.join(out_dir, 'ckpt.pt'))


def test_sample_streams_characters_split_across_tokens(tmp_path, monkeypatch, capsys):
    """GPT-2 splits '😀' into the tokens b'\\xf0\\x9f\\x98' and b'\\x80': the stream must hold the
    first bytes back until the character is complete, not print replacement characters."""
    tiny_softmax_checkpoint(tmp_path)
    enc = gpt2_tokenizer()
    sample = ' ¿qué? 😀 ok'
    ids = enc.encode(sample)
    assert any(not enc.decode_single_token_bytes(i).decode('utf-8', errors='ignore')
               for i in ids)                            # a token that holds no whole character

    def scripted(self, idx, max_new_tokens, **settings):      # the model "generates" ids
        for i in ids[:max_new_tokens]:
            yield torch.tensor([[i]])

    monkeypatch.setattr(SWAT, 'generate_tokens', scripted)
    # sample.py switches TF32 on for the whole process: switch it back after this test
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):
        monkeypatch.setattr(backend, 'allow_tf32', backend.allow_tf32)
    monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={tmp_path}', '--num_samples=1',
                                      f'--max_new_tokens={len(ids)}', '--device=cpu',
                                      '--start=ROMEO:'])
    runpy.run_path(os.path.join(ROOT, 'sample.py'), run_name='__main__')
    assert f'ROMEO:{sample}\n{SEPARATOR}\n' in capsys.readouterr().out


def test_sample_sink_tokens_on_a_softmax_model(tmp_path):
    tiny_softmax_checkpoint(tmp_path)
    for num_samples in (1, 2):
        proc = run('sample.py', f'--out_dir={tmp_path}', f'--num_samples={num_samples}',
                   '--max_new_tokens=40', '--device=cpu', '--sink_tokens=4', '--start=ROMEO:')
        lines = proc.stdout.splitlines()
        assert lines.count(SEPARATOR) == num_samples
        assert proc.stdout.count('\nROMEO:') == num_samples          # each sample, whole
        assert re.fullmatch(rf'{40 * num_samples} tokens in [\d.]+ s: [\d.]+ tokens/s', lines[-1])


# -----------------------------------------------------------------------------
# eval.py and the larger corpora's prepare scripts

EVAL = runpy.run_path(os.path.join(ROOT, 'eval.py'))    # its functions; main() does not run


def run_stdout(script, *args):
    """Run `python script args...` from the repo root; return its stdout."""
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def eval_table(stdout):
    """{row label: [loss or None, ...]} and the lengths, from eval.py's markdown table."""
    lines = [line for line in stdout.splitlines() if line.startswith('| ')]
    lengths = [int(c) for c in lines[0].strip('| ').split(' | ')[1:]]
    rows = {}
    for line in lines[1:]:
        label, *cells = line.strip('| ').split(' | ')
        rows[label] = [None if c == '-' else float(c) for c in cells]
    return lengths, rows


@pytest.fixture(scope='module')
def eval_checkpoint(tmp_path_factory):
    """The out_dir of a tiny sigmoid SWAT trained for 10 steps on Shakespeare (window 16)."""
    if not all(os.path.exists(os.path.join(DATA, f'{s}.bin')) for s in ('train', 'val')):
        run_stdout(os.path.join('data', 'shakespeare', 'prepare.py'))
    out = tmp_path_factory.mktemp('tiny')
    run_stdout('train.py', '--device=cpu', '--compile=False', '--dtype=float32', '--n_layer=2',
        '--n_head=2', '--n_embd=32', '--block_size=64', '--window=16', '--batch_size=4',
        '--max_iters=10', '--eval_iters=2', '--eval_interval=5', f'--out_dir={out}')
    return out


EVAL_ARGS = ['--device=cpu', '--dtype=float32', "--plot=", '--max_tokens_per_length=1024']


def test_eval_prints_a_finite_table(eval_checkpoint):
    out = run_stdout('eval.py', f'--checkpoints={eval_checkpoint},{eval_checkpoint}:window=-1',
              '--lengths=64,256,1024,65536', *EVAL_ARGS)
    lengths, rows = eval_table(out)
    assert lengths == [64, 256, 1024, 65536]
    name = os.path.basename(eval_checkpoint)
    assert list(rows) == [f'{name} (sigmoid, alibi balanced, rope, w=16)',
                          f'{name} (sigmoid, alibi balanced, rope, w=full (trained 16))']
    for losses in rows.values():
        # a 10-step model is close to uniform over the vocabulary: ln(50304) = 10.83
        assert all(math.isfinite(x) and 0 < x < 12 for x in losses[:3])
        assert losses[3] is None                # longer than every held-out play: skipped
    assert 'L=65536: skipped' in out


def test_eval_sink_tokens_on_a_softmax_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, window=8, attn='softmax')
    torch.save({'model_args': asdict(config), 'model': SWAT(config).state_dict()},
               os.path.join(tmp_path, 'ckpt.pt'))
    # --sink_tokens applies to every checkpoint; `:sinks=0` turns it off for one of them
    out = run_stdout('eval.py', f'--checkpoints={tmp_path},{tmp_path}:sinks=0', '--sink_tokens=2',
              '--lengths=8,64,512', *EVAL_ARGS)
    _, rows = eval_table(out)
    label = f'{os.path.basename(tmp_path)} (softmax, alibi balanced, rope, w=8)'
    assert list(rows) == [label + ' +2 sinks', label]
    with_sinks, without = rows.values()
    assert all(math.isfinite(x) for x in with_sinks + without)
    # up to w tokens nothing has left the window yet, so the sinks change nothing
    assert with_sinks[0] == without[0]


def test_checkpoint_options():
    parse = EVAL['parse_checkpoint']
    assert parse('out-swa', 0, 0) == ('out-swa', 0, 0)
    assert parse('out-swa:sinks=4', 0, 0) == ('out-swa', 0, 4)
    assert parse('out/ckpt.pt:window=-1:sinks=0', 0, 2) == ('out/ckpt.pt', -1, 0)
    for bad in ('out:sink=4', 'out:sinks=four', 'out:sinks'):
        with pytest.raises(SystemExit, match='bad option'):
            parse(bad, 0, 0)


def test_stretches_stay_inside_documents():
    # three documents of 10, 3 and 25 tokens, each followed by EOT (the last one is not)
    docs_lengths = [10, 3, 25]
    tokens = np.concatenate([np.r_[np.arange(1, n + 1), EOT] for n in docs_lengths])[:-1]
    docs = EVAL['documents'](tokens.astype(np.uint16))
    assert [e - s for s, e in docs] == docs_lengths
    for L in (1, 4, 9, 24):
        starts = EVAL['stretch_starts'](docs, L, max_tokens=0)        # all of them
        # each document of n tokens holds floor((n - 1) / L) stretches of L + 1 tokens, end to end
        assert len(starts) == sum((n - 1) // L for n in docs_lengths)
        for s in starts:
            assert EOT not in tokens[s:s + L + 1] and s + L + 1 <= len(tokens)
    assert EVAL['stretch_starts'](docs, 25, max_tokens=0) == []          # no document is long enough
    # with a budget, the stretches spread over all documents, first and last included
    starts = EVAL['stretch_starts'](docs, 2, max_tokens=8)
    all_starts = EVAL['stretch_starts'](docs, 2, max_tokens=0)
    assert len(starts) == 4 and starts[0] == all_starts[0] and starts[-1] == all_starts[-1]


def tiny_eval_model(**changes):
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, window=8, vocab_size=101)
    settings.update(changes)
    return SWATConfig(**settings)


@pytest.mark.parametrize('attn', ['sigmoid', 'softmax'])
def test_stretch_loss_is_the_full_forward_up_to_the_window(attn, monkeypatch):
    """T <= w: the window hides nothing, so eval's loss (windowed model, also through the
    KV-cache path with sinks) is the loss of a model with the same weights and no window."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)    # on a CPU, the reference: much faster
    torch.manual_seed(0)
    w, T = 16, 16
    model = SWAT(tiny_eval_model(attn=attn, window=w)).to(DEVICE).eval()
    full = SWAT(tiny_eval_model(attn=attn, window=1024)).to(DEVICE).eval()
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, 101, (3, T + 1), device=DEVICE)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    with torch.no_grad():
        _, expected = full(x, y)
    for sinks in (0, 3):
        assert abs(EVAL['stretch_loss'](model, x, y, sinks) - expected.item()) < 1e-5


@pytest.mark.parametrize('attn, alibi, rope', [('sigmoid', 'balanced', True),
                                               ('sigmoid', 'none', False),
                                               ('softmax', 'balanced', True),
                                               ('softmax', 'none', True)])
def test_stretch_loss_matches_full_attention_on_the_last_w_tokens(attn, alibi, rope, monkeypatch):
    """T > w, one layer. A one-layer windowed model predicts token t+1 from exactly the tokens
    t-w+1 .. t, and RoPE and ALiBi depend only on distances. So a model with the same weights and
    NO window (full causal attention: another code path, and for softmax without ALiBi PyTorch's
    fused SDPA), fed just those w tokens, must give the same prediction. Scoring every position
    that way, one short forward per position, is the naive O(T * w) evaluation; eval's single
    windowed forward over the whole stretch must agree with it."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    torch.manual_seed(0)
    w, T = 8, 40
    model = SWAT(tiny_eval_model(n_layer=1, attn=attn, alibi=alibi, rope=rope, window=w)).to(DEVICE).eval()
    full = SWAT(tiny_eval_model(n_layer=1, attn=attn, alibi=alibi, rope=rope, window=1024)).to(DEVICE).eval()
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, 101, (2, T + 1), device=DEVICE)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    with torch.no_grad():
        losses = []
        for t in range(T):
            logits, _ = full(x[:, max(0, t - w + 1):t + 1])       # (B, 1, V): the last position
            losses.append(F.cross_entropy(logits[:, -1], y[:, t], reduction='none'))
        naive = torch.stack(losses).mean().item()
        _, unwindowed = full(x, y)                                 # sanity: the window matters
    assert abs(EVAL['stretch_loss'](model, x, y) - naive) < 1e-5
    assert abs(unwindowed.item() - naive) > 1e-4


def test_plot(tmp_path):
    pytest.importorskip('matplotlib')
    path = tmp_path / 'eval.png'
    EVAL['plot_losses'](str(path), ['a', 'b'], [64, 256, 1024], [[5.0, 4.5, None], [5.0, 6.0, 7.0]],
                        [64, 64], 'test')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# -----------------------------------------------------------------------------
# the prepare scripts, on their shipped samples

def sample_rows(folder):
    with open(os.path.join(ROOT, 'data', folder, 'sample.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def read_bins(out_dir):
    return [np.fromfile(os.path.join(out_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')]


def test_prepare_pg19_sample(tmp_path):
    module = runpy.run_path(os.path.join(ROOT, 'data', 'pg19', 'prepare.py'))
    sample = os.path.join(ROOT, 'data', 'pg19', 'sample.jsonl')
    counts = module['prepare'](str(tmp_path), sample)
    train, val = read_bins(tmp_path)
    enc = gpt2_tokenizer()
    rows = sample_rows('pg19')
    # each book whole, followed by EOT, in the split the file gives it
    expected = {'train': [], 'val': []}
    for row in rows:
        split = 'val' if row['split'] == 'validation' else 'train'
        expected[split] += enc.encode_ordinary(row['text']) + [EOT]
    assert train.tolist() == expected['train'] and val.tolist() == expected['val']
    assert counts == {'train': (4, len(train)), 'val': (2, len(val))}
    assert (val == EOT).sum() == 2 and (train == EOT).sum() == 4
    assert not any(p.name.endswith('.tmp') for p in tmp_path.iterdir())
    # --max_docs caps each split; the command line writes where --out_dir says
    run_stdout(os.path.join('data', 'pg19', 'prepare.py'), f'--sample={sample}', '--max_docs=1',
        f'--out_dir={tmp_path}')
    train, val = read_bins(tmp_path)
    assert (train == EOT).sum() == 1 and (val == EOT).sum() == 1


def test_prepare_openwebtext_sample(tmp_path):
    module = runpy.run_path(os.path.join(ROOT, 'data', 'openwebtext', 'prepare.py'))
    sample = os.path.join(ROOT, 'data', 'openwebtext', 'sample.jsonl')
    counts = module['prepare'](str(tmp_path), sample)
    train, val = read_bins(tmp_path)
    enc = gpt2_tokenizer()
    docs = [enc.encode_ordinary(row['text']) + [EOT] for row in sample_rows('openwebtext')]
    # every VAL_EVERY-th document, starting with the first, is validation; here just the first
    assert val.tolist() == docs[0]
    assert train.tolist() == [t for d in docs[1:] for t in d]
    assert counts == {'train': (len(docs) - 1, len(train)), 'val': (1, len(val))}
    assert len(train) + len(val) == sum(len(d) for d in docs)
    counts = module['prepare'](str(tmp_path), sample, max_docs=3)
    assert counts['train'][0] + counts['val'][0] == 3
