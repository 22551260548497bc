"""
The tests: python -m pytest -q test_swat.py         (the fast tier: -m "not slow")

One section per subject, in the order of the project: the attention, the model, generation,
training, the scripts, the data. Shared helpers and fixtures are in conftest.py. Tests marked
`slow` launch a subprocess or compile.

Without a GPU the Triton kernels run in Triton's CPU interpreter at small shapes (float32 and
float16; the interpreter multiplies bfloat16 wrongly inside tl.dot). With a GPU the same tests
run on it, and the GPU-only cases add full sizes, bfloat16 and torch.compile.
"""

import ast
import contextlib
import dataclasses
import errno
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton

from conftest import (DATA, DEVICE, GPU, ROOT, SCRIPT_ENV, SEPARATOR, TINY, TOLERANCE, V,
                      assert_one_line, assert_same_weights, exit_message, file_hash, load_ckpt,
                      make_bad_checkpoint, needs_gpu, random_inputs, random_slopes,
                      rank_weights_script, relative_error, run, save_tiny_checkpoint,
                      tiny_config, tiny_model, torchrun)
import bench_generate
import configurator
import eval as eval_script
import kernel
import recall
import runtime
import sample
import swat
import tokenizer
import training
from configurator import apply_overrides
from kernel import (swat_attention, swat_attention_reference, swat_backward, swat_decode,
                    swat_forward)
from swat import (SWAT, CheckpointError, CUDAGraphStep, SWATConfig, alibi_slopes, apply_rope,
                  load_checkpoint, rope_cos_sin)
from recall import (FACT, KEY_BASE, MIN_DISTANCE, PRESETS, QUERY, TASKS, TRAININGS, VALUE_BASE,
                    answer_logits, band, band_distances, is_task_id, make_example, make_examples,
                    model_predictor, receptive_field, score)
from tokenizer import EOT, gpt2_tokenizer
from training import (StopFlag, changed_settings, check_mask_file, check_out_dir, check_settings,
                      check_token_file, get_batch, get_lr, load_for_resume, mask_path,
                      merge_model_args, micro_batches_per_process, most_scored_targets, non_finite,
                      out_of_memory_advice, prepare_dataset, prepare_optimizer,
                      restore_rng_state, rng_state, save_checkpoint_file)

slow = pytest.mark.slow


# =============================================================================
# The attention: the einsum reference and the fused kernels against Eq. 5
# naive_swat is the definition written out with a full T x T mask, independently of kernel.py.

def naive_swat(q, k, v, slopes, window, scale=None, bias=0.0):
    """Eq. 5 written out with a full T x T mask, independently of kernel.py; bias: the constant
    b inside the sigmoid (sigmoid_bias)."""
    T, D = q.shape[-2:]
    scale = 1 / math.sqrt(D) if scale is None else scale
    m = torch.arange(T, device=q.device)[:, None]
    n = torch.arange(T, device=q.device)[None, :]
    visible = (n <= m) & (m - n <= window - 1)
    logits = scale * q @ k.transpose(-1, -2) + slopes.view(-1, 1, 1) * (m - n) + bias
    return (torch.sigmoid(logits) * visible) @ v


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


@pytest.mark.parametrize('T, window', [(1, 1), (37, 1), (37, 5), (300, 64)])
@pytest.mark.parametrize('bias', [-math.log(64), 1.5], ids=['-log(64)', '+1.5'])
def test_reference_bias_argument(T, window, bias):
    """Eq. 5 with a constant b inside the sigmoid (sigmoid_bias): every visible key's weight is
    sigmoid(q . k / sqrt(D) + s_h (m - n) + b), the hidden ones still weigh exactly 0."""
    q, k, v = random_inputs(2, 3, T, 16)
    slopes = random_slopes(3).double()
    out = swat_attention_reference(q, k, v, slopes, window, bias=bias, chunk_size=64)
    assert relative_error(out, naive_swat(q, k, v, slopes, window, bias=bias)) < 1e-12


def test_reference_gradcheck():
    q, k, v = (x.requires_grad_() for x in random_inputs(1, 2, 9, 4, device='cpu'))
    slopes = torch.tensor([-0.5, 0.25], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: swat_attention_reference(q, k, v, slopes, 4, chunk_size=4), (q, k, v))


@pytest.mark.usefixtures('compiled_kernels')
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


def attention_args(**changes):
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE) for _ in range(3))
    args = dict(q=q, k=k, v=v, slopes=torch.tensor([-0.5, 0.5], device=DEVICE), window=4)
    args.update({name: x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type == 'cpu' else x
                 for name, x in changes.items()})
    return args


def qkv(*shape, dtype=torch.float32):
    """q, k and v of one shape and dtype, to replace the good ones."""
    return {name: torch.ones(*shape, dtype=dtype) for name in 'qkv'}


BAD_ATTENTION_INPUT = [
    (dict(window=0), 'window must be an integer >= 1'),
    (dict(window=-3), 'window must be an integer >= 1'),
    (dict(window=2.5), 'window must be an integer >= 1'),
    (dict(window=True), 'window must be an integer >= 1'),
    (dict(slopes=torch.zeros(3)), 'shape (H,) = (2,)'),
    (dict(slopes=torch.zeros(2, 1)), 'shape (H,) = (2,)'),
    (dict(slopes=[-0.5, 0.5]), 'got a list: pass torch.tensor(slopes'),
    (dict(slopes=(-0.5, 0.5)), 'got a tuple: pass torch.tensor(slopes'),
    (dict(slopes=torch.zeros(2, dtype=torch.int64)), 'slopes must be a float tensor of shape (H,)'),
    (dict(k=torch.randn(1, 2, 9, 16)), 'one shape (B, H, T, D)'),
    (qkv(2, 8, 16), 'one shape (B, H, T, D)'),
    (dict(v=torch.randn(1, 2, 8, 16, dtype=torch.float16)), 'one dtype'),
    (qkv(1, 2, 8, 16, dtype=torch.int64), 'float32, float16, bfloat16'),
    (dict(v=torch.randn(1, 2, 8, 16, device='meta')), 'one device'),
    (qkv(1, 2, 0, 16), 'q, k and v are empty'),
    (dict(q=[[0.0]]), 'must be torch tensors'),
    (dict(bias=float('nan')), 'bias must be a finite number'),
    (dict(bias=float('-inf')), 'bias must be a finite number'),
    (dict(bias='-4.8'), 'bias must be a finite number'),
    (dict(bias=True), 'bias must be a finite number'),
]


@pytest.mark.parametrize('attend', [swat_attention_reference, swat_attention], ids=['reference', 'kernel'])
@pytest.mark.parametrize('changes, message', BAD_ATTENTION_INPUT)
def test_attention_rejects_bad_input(attend, changes, message):
    """Both implementations share one check: the same bad input, the same message."""
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        attend(**attention_args(**changes))
    assert_one_line(e.value)


@pytest.mark.parametrize('D, dtype', [(24, torch.float32), (16, torch.float64)])
def test_reference_takes_what_only_the_kernel_refuses(D, dtype):
    """The kernel's limits (head sizes, no float64) are not the reference's: it takes them and
    computes Eq. 5, while swat_attention says what it supports."""
    q, k, v = (torch.randn(1, 2, 10, D, dtype=dtype) for _ in range(3))
    slopes = torch.tensor([-0.5, 0.25], dtype=dtype)
    out = swat_attention_reference(q, k, v, slopes, 3)
    assert out.dtype == dtype
    assert torch.allclose(out.double(), naive_swat(q.double(), k.double(), v.double(), slopes.double(), 3),
                          atol=1e-5)
    fix = 'head size D=24' if D == 24 else 'convert them with .float()'
    with pytest.raises(ValueError, match=fix):
        swat_attention(q, k, v, slopes, 3)


def test_reference_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match='chunk_size=0 must be an integer >= 1'):
        swat_attention_reference(**attention_args(), chunk_size=0)


# (B, H, T, D, window): T below one block, T not a multiple of the blocks, w = 1, w not a
# multiple of the blocks, w = T, w > T, every head size, B * H > 1
CPU_SHAPES = [(1, 2, 1, 16, 1), (1, 2, 20, 16, 4), (1, 3, 50, 32, 1), (1, 2, 45, 16, 45),
              (1, 2, 50, 64, 200), (1, 2, 70, 128, 33), (2, 2, 60, 32, 17)]
GPU_SHAPES = [(2, 4, 1000, 64, 128), (1, 3, 2049, 128, 300), (2, 2, 513, 32, 1),
              (1, 2, 3000, 16, 5000), (1, 4, 4096, 128, 2048), (3, 2, 777, 64, 100)]
SHAPES = CPU_SHAPES + (GPU_SHAPES if GPU else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


def check_against_ground_truth(B, H, T, D, window, dtype, sign, bias=0.0):
    """The kernel's output and gradients against Eq. 5 in float64, of the very inputs the kernel
    gets: rounding the inputs to 16 bits is not the kernel's error, and alone it moves dq by more
    than 1e-2 in about 4% of the bfloat16 draws at T = 1 (dq is then do . v times k, and do . v
    can be close to 0). bias: the constant b inside the sigmoid."""
    q, k, v = (x.to(dtype) for x in random_inputs(B, H, T, D))
    do = torch.randn_like(q)
    slopes = random_slopes(H, sign)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = swat_attention(*inputs, slopes, window, bias=bias)
    out.backward(do)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    truth = naive_swat(*exact, slopes.double(), window, bias=bias)
    truth.backward(do.double())
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, truth) < tolerance
    for name, x, x_exact in zip('qkv', inputs, exact):
        assert relative_error(x.grad, x_exact.grad) < tolerance, f'd{name}'
    reference = swat_attention_reference(*(x.detach() for x in inputs), slopes, window, bias=bias)
    assert relative_error(out, reference) < tolerance


# One shape for every fast configuration (T not a multiple of any block, masked and interior runs)
CANDIDATE_SHAPE = (2, 3, 1000, 64, 300)


def compile_kernels(D, dtype, config, backward):
    """Launch the forward kernel, or the two backward ones, once for head size D, dtype and
    config: the first launch compiles them."""
    q, k, v, do = (torch.randn(1, 2, 16, D, dtype=dtype, device=DEVICE) for _ in range(4))
    slopes, scale = random_slopes(2), D ** -0.5
    if backward:
        swat_backward(do, q, k, v, slopes, 8, scale, 0.0, *(torch.empty_like(q) for _ in range(3)),
                      config)
    else:
        swat_forward(q, k, v, slopes, 8, scale, 0.0, torch.empty_like(q), config)


@pytest.fixture(scope='module')
def compiled_kernels():
    """On a GPU, compile every kernel the attention tests launch before the first of them runs,
    all at once on every core: Triton's compiler releases the GIL for most of its work, so they
    take a fraction of their sum. Each kernel is one compile per head size, dtype and
    configuration: conftest pins one configuration, and one test runs every candidate."""
    if not GPU:
        return                          # the interpreter compiles nothing
    kernels = {(D, dtype, kernel.PINNED) for *_, D, _ in SHAPES for dtype in DTYPES}
    kernels |= {(CANDIDATE_SHAPE[3], torch.bfloat16, i) for i in range(kernel.FAST_CONFIGS)}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        jobs = [pool.submit(compile_kernels, *k, backward) for k in kernels
                for backward in (False, True)]
        for job in jobs:
            job.result()                # re-raises a failure


@pytest.mark.usefixtures('compiled_kernels')
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('B, H, T, D, window', SHAPES)
def test_kernel_matches_ground_truth(B, H, T, D, window, dtype):
    check_against_ground_truth(B, H, T, D, window, dtype, 'mixed')


@needs_gpu
@pytest.mark.usefixtures('compiled_kernels')
@pytest.mark.parametrize('config', range(kernel.FAST_CONFIGS))
def test_every_autotuner_candidate_matches_ground_truth(config, monkeypatch):
    """The other tests pin one configuration (kernel.PINNED); in real use the autotuner may pick
    any of the fast ones, so each computes Eq. 5 and its gradients, in bfloat16 as in training."""
    monkeypatch.setattr(kernel, 'PINNED', config)
    check_against_ground_truth(*CANDIDATE_SHAPE, torch.bfloat16, 'mixed')


@slow                                           # compiles every candidate of each kernel
@needs_gpu
def test_autotuning_compiles_every_candidate_at_once_then_picks_one(monkeypatch):
    """Unpinned, as in train.py: the first call at a new head size and window compiles every
    candidate of each kernel, all at once, before the autotuner times them; the one it keeps
    computes Eq. 5 and its gradients, and later calls launch it without the autotuner."""
    monkeypatch.setattr(kernel, 'PINNED', None)
    check_against_ground_truth(1, 2, 300, 64, 77, torch.bfloat16, 'mixed')
    for launcher in (kernel._forward, kernel._dkdv, kernel._dq):
        chosen = launcher.chosen[(torch.bfloat16, 64, 77)]
        assert chosen in [config.all_kwargs() for config in launcher.autotuned.configs]
        monkeypatch.setattr(launcher.autotuned, 'run', None)     # a call to it would fail
    check_against_ground_truth(1, 2, 300, 64, 77, torch.bfloat16, 'mixed')


@pytest.mark.usefixtures('compiled_kernels')
@pytest.mark.parametrize('sign', ['positive', 'negative'])
def test_kernel_slope_signs(sign):
    check_against_ground_truth(1, 2, 64, 32, 24, torch.float32, sign)


# (B, H, T, D, window): T odd and not a multiple of the blocks, masked and interior runs; w = 1
BIAS_SHAPES = [(1, 2, 45, 16, 9), (1, 3, 37, 32, 1)] + (GPU_SHAPES[:1] if GPU else [])


@pytest.mark.usefixtures('compiled_kernels')
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('bias', [-math.log(128), 1.5], ids=['-log(128)', '+1.5'])
@pytest.mark.parametrize('B, H, T, D, window', BIAS_SHAPES)
def test_kernel_with_a_bias_matches_ground_truth(B, H, T, D, window, bias, dtype):
    """sigmoid_bias: the constant inside the sigmoid, in the forward and in both backward
    kernels (the default model's -log(w) for w = 128, and a positive one)."""
    check_against_ground_truth(B, H, T, D, window, dtype, 'mixed', bias)


@pytest.mark.usefixtures('compiled_kernels')
def test_kernel_non_contiguous_inputs():
    """q, k, v as the model makes them: views into one (B, T, 3 * H * D) projection."""
    B, T, H, D, w = 2, 45, 2, 16, 9
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE)
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))
    slopes = random_slopes(H)
    out = swat_attention(q, k, v, slopes, w)
    assert relative_error(out, naive_swat(q.double(), k.double(), v.double(), slopes.double(), w)) < 1e-5


@pytest.mark.usefixtures('compiled_kernels')
def test_kernel_writes_every_element():
    """Poisoned (NaN) output and gradient buffers come back fully overwritten."""
    B, H, T, D, w = 2, 3, 40, 32, 13
    q, k, v = random_inputs(B, H, T, D, dtype=torch.float32)
    do = torch.randn_like(q)
    slopes = random_slopes(H)
    out = swat_forward(q, k, v, slopes, w, D ** -0.5, 0.0, torch.full_like(q, float('nan')))
    grads = swat_backward(do, q, k, v, slopes, w, D ** -0.5, 0.0,
                          *(torch.full_like(q, float('nan')) for _ in range(3)))
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    truth = naive_swat(*exact, slopes.double(), w)
    truth.backward(do.double())
    assert relative_error(out, truth) < 1e-5
    for g, x in zip(grads, exact):
        assert relative_error(g, x.grad) < 1e-5


@slow                                           # Triton hashes half a gigabyte of files
def test_warm_up_triton_in_background_leaves_tritons_key_computed():
    """The thread computes the hash that Triton's first launch would, and Triton keeps it: the
    process's next call returns it at once."""
    triton_key = kernel.triton_key_function()
    triton_key.cache_clear()
    thread = kernel.warm_up_triton_in_background()
    thread.join(timeout=60)
    assert not thread.is_alive() and triton_key.cache_info().currsize == 1
    t0 = time.perf_counter()
    key = triton_key()
    assert time.perf_counter() - t0 < 0.01 and triton_key.cache_info().hits == 1
    assert key.startswith(triton.__version__)


@slow                                           # a fresh interpreter, hashing Triton
def test_warm_up_triton_imports_gluon_only_when_asked():
    """With imports=True the thread also imports what Triton's first launch would (its Gluon
    language), in a fresh process where nothing had imported it; without, it does not."""
    code = ("import sys, kernel\n"
            "for imports in (False, True):\n"
            "    kernel.warm_up_triton_in_background(imports=imports).join()\n"
            "    print('triton.experimental.gluon' in sys.modules)")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['False', 'True']


# (B, H, S, D): the cache's S slots below one block of the decode kernel (64), not a multiple of
# it, a multiple; every head size; on a GPU the default model's cache at batch 64, a long window
DECODE_SHAPES = [(1, 2, 1, 16), (2, 3, 37, 32), (1, 2, 64, 64), (2, 2, 130, 128)] + (
    [(64, 6, 128, 64), (1, 4, 2052, 128)] if GPU else [])


@pytest.mark.parametrize('rope', [True, False], ids=['rope', 'no-rope'])
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('B, H, S, D', DECODE_SHAPES)
def test_decode_kernel_is_eq5_for_one_query(B, H, S, D, dtype, rope):
    """The decode kernel (on a CPU in the interpreter) against Eq. 5 in float64 written with
    absolute positions: the query at position p rotated by p, each slot's key by its token's
    position p - d, the weights of empty slots 0. The slots hold the distances in any order. The
    new token's key and value are written into its slot (distance 0) first, in place, and
    nothing else of the cache changes."""
    torch.manual_seed(0)
    p, scale, bias = 10 ** 6, D ** -0.5, -math.log(S + 1)
    q, k, v = (torch.randn(B, H, 1, D).to(dtype).to(DEVICE) for _ in range(3))
    keys, values = (torch.randn(B, H, S, D).to(dtype).to(DEVICE) for _ in range(2))
    distance = torch.randperm(S, device=DEVICE)                 # slot -> distance back
    visible = (torch.rand(S, device=DEVICE) < 0.8) | (distance == 0)
    slot = (distance == 0).nonzero()[0]                         # the new token's, (1,)
    written_keys, written_values = keys.clone(), values.clone()
    written_keys[:, :, slot], written_values[:, :, slot] = k, v
    slopes = random_slopes(H).to(dtype)                 # as a model converted to dtype holds them
    cos, sin = rope_cos_sin(distance, D, 10000.0)
    out = swat_decode(q, k, v, keys, values, slot, distance, visible,
                      (cos, -sin) if rope else None, slopes, bias)
    assert torch.equal(keys, written_keys) and torch.equal(values, written_values)
    q, keys, values = (x.double() for x in (q, written_keys, written_values))
    if rope:
        q = apply_rope(q, *rope_cos_sin(torch.tensor([p], device=DEVICE), D, 10000.0,
                                        torch.float64))
        keys = apply_rope(keys, *rope_cos_sin(p - distance, D, 10000.0, torch.float64))
    logits = scale * (q * keys).sum(-1) + slopes.double()[:, None] * distance + bias  # (B, H, S)
    expected = (torch.sigmoid(logits) * visible)[..., None].mul(values).sum(-2)       # (B, H, D)
    assert out.shape == (B, H, D) and out.dtype == dtype
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.skipif(not (GPU or kernel.INTERPRET), reason='the check is on the kernel path')
def test_decode_refuses_a_cache_it_cannot_write_in_place():
    """A cache whose last dimension is strided would be written through a copy and the write
    lost: one line that says what to pass instead."""
    q, k, v = (torch.randn(1, 2, 1, 16, device=DEVICE) for _ in range(3))
    keys = torch.randn(1, 2, 16, 8, device=DEVICE).transpose(2, 3)     # (1, 2, 8, 16), stride 8
    distance, visible = torch.arange(8, device=DEVICE), torch.ones(8, dtype=torch.bool,
                                                                   device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="stride 1 in their last dimension .* the cache's own"):
        swat_decode(q, k, v, keys, keys.clone(), slot, distance, visible, None, random_slopes(2))


# (rows, N, K) and what the layer adds to its matmul: up to a block of rows (4), a depth beyond
# one block (2048), more rows than a block (further columns of programs, the last one cut); N
# and K cut inside a block; on a GPU the default model's four linear layers at batch 1, 3 and 4.
# Each case is one compile of the kernel per dtype on a GPU, so each shape takes one variant.
TOKEN_LINEAR_CASES = [((1, 40, 24), 'norm'), ((3, 130, 200), 'norm-gelu'), ((2, 9, 2100), 'add'),
                      ((4, 24, 600), 'all'), ((9, 33, 40), 'plain'), ((9, 33, 40), 'norm')] + (
    [((1, 1152, 384), 'norm'), ((3, 384, 1536), 'add'), ((4, 384, 384), 'add'),
     ((4, 1536, 384), 'norm-gelu')] if GPU else [])
TOKEN_LINEAR_PARTS = {'norm': (True, False, False), 'add': (False, False, True),
                      'norm-gelu': (True, True, False), 'plain': (False, False, False),
                      'all': (True, True, True)}          # norm, gelu, residual


@pytest.mark.skipif(not (GPU or kernel.INTERPRET), reason='the kernel itself')
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape, parts', TOKEN_LINEAR_CASES)
def test_token_linear_kernel_is_norm_matmul_gelu_and_add(shape, parts, dtype):
    """The decode step's linear-layer kernel (on a CPU in the interpreter) against float64:
    residual + gelu(x / sqrt(mean(x^2) + eps) * g @ W^T), for rows of x small enough that eps
    weighs (eps as torch.nn.RMSNorm's default for the dtype) and rows of ordinary size."""
    (R, N, K), (norm, gelu, residual) = shape, TOKEN_LINEAR_PARTS[parts]
    torch.manual_seed(0)
    scales = torch.where(torch.arange(R) % 2 == 0, 0.05, 1.0)[:, None, None]     # (R, 1, 1)
    x = (torch.randn(R, 1, K) * scales).to(dtype).to(DEVICE)
    weight = (torch.randn(N, K) * K ** -0.5).to(dtype).to(DEVICE)
    gain = (1 + 0.1 * torch.randn(K)).to(dtype).to(DEVICE) if norm else None
    add = torch.randn(R, 1, N).to(dtype).to(DEVICE) if residual else None
    eps = torch.finfo(dtype).eps
    out = torch.ops.nanoswat.token_linear(x, weight, gain, eps, gelu, add)
    expected = x.double()
    if norm:
        expected = expected * torch.rsqrt(expected.pow(2).mean(-1, keepdim=True) + eps) \
            * gain.double()
    expected = expected @ weight.double().t()
    expected = F.gelu(expected) if gelu else expected
    expected = expected if add is None else expected + add.double()
    assert out.shape == (R, 1, N) and out.dtype == dtype
    assert relative_error(out, expected) < TOLERANCE[dtype]


@needs_gpu
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
def test_token_linear_on_a_gpu_is_the_modules(dtype):
    """token_linear with the model's modules: on a GPU, for up to TOKEN_LINEAR_ROWS rows, the
    kernel gives what the modules give (nn.RMSNorm with its default eps, the dtype's, nn.Linear,
    F.gelu, the add), to the dtype's rounding; for more rows, and under autocast with float32
    weights for 16-bit rows, it is the modules."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(64).cuda().to(dtype)
    linear = torch.nn.Linear(64, 96, bias=False).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    rows = kernel.TOKEN_LINEAR_ROWS
    x = (torch.randn(rows + 1, 1, 64, device='cuda') * 0.05).to(dtype)     # eps weighs in the norm
    add = torch.randn(rows + 1, 1, 96, device='cuda').to(dtype)
    with torch.no_grad():
        out = kernel.token_linear(x[:rows], linear, norm=norm, gelu=True, residual=add[:rows])
        normed = F.rms_norm(x[:rows].double(), (64,), norm.weight.double(), torch.finfo(dtype).eps)
        expected = add[:rows].double() + F.gelu(normed @ linear.weight.double().t())
        assert out.dtype == dtype and relative_error(out, expected) < TOLERANCE[dtype]
        assert torch.equal(kernel.token_linear(x, linear, norm=norm, gelu=True, residual=add),
                           add + F.gelu(linear(norm(x))))
        wide = torch.nn.Linear(64, 96, bias=False).cuda()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            halves = x.to(torch.bfloat16)
            assert torch.equal(kernel.token_linear(halves, wide), wide(halves))


def test_torch_compile_traces_the_attention_as_one_operator():
    """Eager code calls the kernels through an autograd.Function, torch.compile through the
    registered operator: one call of it in each traced graph, forward and backward, and the same
    output and gradients as eager. The graphs run as traced (no code generated), so on a CPU the
    interpreter's kernels run inside them."""
    torch.manual_seed(0)
    q, k, v = random_inputs(1, 2, 40, 16, torch.float32)
    slopes = random_slopes(2)

    def loss(q, k, v):
        return swat_attention(q, k, v, slopes, 12).square().sum()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []                                     # the forward and the backward, as traced

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, backend=backend, fullgraph=True)(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    forward, backward = ([node.target for node in graph.graph.nodes] for graph in graphs)
    assert forward.count(torch.ops.nanoswat.swat_attention.default) == 1
    assert backward.count(torch.ops.nanoswat.swat_attention_backward.default) == 1
    assert relative_error(compiled, eager) < 1e-6
    for got, expected in zip(compiled_grads, eager_grads):
        assert relative_error(got, expected) < 1e-6


@slow
@needs_gpu
@pytest.mark.usefixtures('compiled_kernels')
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
@pytest.mark.usefixtures('compiled_kernels')
def test_kernel_memory_is_linear_in_length():
    """No (T x T) or (T x w) buffer: peak extra memory of forward+backward is O(T * D)."""
    B, H, T, D, w = 1, 8, 16384, 64, 2048
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in random_inputs(B, H, T, D))
    do = torch.randn_like(q)
    slopes = alibi_slopes(H).cuda()
    swat_attention(q, k, v, slopes, w).backward(do)        # warm up: a first call compiles
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    swat_attention(q, k, v, slopes, w).backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_tensor = q.numel() * q.element_size()
    assert extra <= 5 * one_tensor            # out, dq, dk, dv and slack; T x w would be 32x



# =============================================================================
# The model: slopes, config, forward, what each position sees, the FLOP count

def test_alibi_slopes():
    assert alibi_slopes(12).tolist() == [-2.0 ** -k for k in range(1, 7)] + [2.0 ** -k for k in range(1, 7)]
    assert torch.allclose(alibi_slopes(8, 'negative'), -(2.0 ** (-torch.arange(1, 9.0))))
    assert torch.equal(alibi_slopes(8, 'positive'), -alibi_slopes(8, 'negative'))
    assert torch.equal(alibi_slopes(4, 'none'), torch.zeros(4))
    assert alibi_slopes(6).dtype == torch.float32
    # gentle: Eq. 4's negative half, then positive slopes 2^-5 .. 2^-(4+H/2)
    assert alibi_slopes(12, 'balanced_gentle').tolist() == ([-2.0 ** -k for k in range(1, 7)] +
                                                            [2.0 ** -k for k in range(5, 11)])
    assert alibi_slopes(2, 'balanced_gentle').tolist() == [-0.5, 2.0 ** -5]
    assert alibi_slopes(6, 'balanced_gentle').dtype == torch.float32
    for mode in ('balanced', 'balanced_paper_code', 'balanced_gentle'):
        with pytest.raises(ValueError, match=f"alibi='{mode}' splits the heads .*even n_head"):
            alibi_slopes(5, mode)
    with pytest.raises(ValueError, match='balanced'):
        alibi_slopes(4, 'sideways')


@pytest.mark.parametrize('changes, message', [
    (dict(rope_base=0.0), 'rope_base=0.0 must be a finite number > 0'),
    (dict(rope_base=-10000.0), 'rope_base=-10000.0 must be a finite number > 0'),
    (dict(rope_base=float('nan')), 'rope_base=nan must be a finite number > 0'),
    (dict(rope_base=float('inf')), 'rope_base=inf must be a finite number > 0'),
    (dict(rope_base='10000'), "rope_base='10000' must be a finite number > 0"),
    (dict(rope='yes'), "rope='yes' must be True or False"),
    (dict(rope=1), 'rope=1 must be True or False'),
    (dict(sigmoid_bias='yes'), "sigmoid_bias='yes' must be True or False"),
    (dict(sigmoid_bias=1), 'sigmoid_bias=1 must be True or False'),
    (dict(sigmoid_bias=True, attn='softmax'),
     "sigmoid_bias=True needs attn='sigmoid', got attn='softmax' .*changes nothing"),
    (dict(n_layer=True), 'n_layer=True must be a positive integer'),
    (dict(n_head=2.0), 'n_head=2.0 must be a positive integer'),
    (dict(window=True), 'window=True must be a positive integer'),
    (dict(vocab_size=0), 'vocab_size=0 must be a positive integer'),
    (dict(block_size='64'), "block_size='64' must be a positive integer"),
    (dict(dropout='0.1'), r"dropout='0.1' must be a number in \[0, 1\)"),
    (dict(dropout=None), r'dropout=None must be a number in \[0, 1\)'),
    (dict(dropout=1.0), r'dropout=1.0 must be a number in \[0, 1\)'),
    (dict(dropout=-0.1), r'dropout=-0.1 must be a number in \[0, 1\)'),
    (dict(n_embd=30, n_head=4), 'n_embd=30 must be divisible by n_head=4'),
    (dict(window=0), 'window=0 must be a positive integer'),
    (dict(attn='linear'), "attn='linear' is unknown"),
    (dict(n_head=3, n_embd=48), 'use an even n_head or another alibi mode'),
    (dict(alibi='left'), "alibi='left' is unknown; choose one of"),
    (dict(n_head=2, n_embd=48), 'n_embd=48 / n_head=2 gives head size 24; change n_embd or n_head'),
])
def test_config_rejects_bad_fields(changes, message):
    with pytest.raises(ValueError, match=message) as e:
        tiny_config(**changes)
    assert_one_line(e.value)


def test_config_takes_what_is_valid():
    """The checks refuse only what cannot work: the softmax baseline takes any head size, an
    odd n_head works without balanced ALiBi, an int is a number."""
    assert tiny_config(attn='softmax', n_head=2, n_embd=48).n_embd == 48
    assert tiny_config(n_head=3, n_embd=48, alibi='negative').n_head == 3
    assert tiny_config(rope_base=500, dropout=0, rope=False).rope_base == 500
    assert tiny_config(sigmoid_bias=True).sigmoid_bias is True
    assert tiny_config(attn='softmax', sigmoid_bias=False).attn == 'softmax'

@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('attn', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('alibi', ['balanced', 'balanced_gentle', 'negative', 'positive', 'none'])
def test_model_forward_backward(attn, alibi):
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn, alibi=alibi)).to(DEVICE)
    idx, targets = torch.randint(0, 101, (2, 2, 50), device=DEVICE)   # longer than block_size
    logits, loss = model(idx, targets)
    assert logits is None                                         # the loss holds no logits
    assert abs(loss.item() - math.log(101)) < 0.5                 # about uniform at init
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 101) and loss is None


@pytest.mark.parametrize('N, chunk_size', [(37, 8), (37, 37), (37, 1000), (64, 16)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chunked_cross_entropy_is_the_plain_loss(N, chunk_size, dtype):
    """Values and gradients (of x and of the output weight) equal F.cross_entropy on the full
    logits, with ignored targets (-1), for chunks that divide N, do not, and exceed it; and
    without gradients (evaluation) the same value. The logits are computed in float32 in both,
    so float32 agrees to float32 rounding and float64 to the float32 logits' rounding."""
    torch.manual_seed(0)
    x = torch.randn(N, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(101, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 101, (N,))
    targets[::5] = -1
    expected = F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)
    grads = torch.autograd.grad(3.0 * expected, (x, weight))
    loss = swat.chunked_cross_entropy(x, weight, targets, chunk_size)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(3.0 * loss, (x, weight)), grads):
        assert got.dtype == want.dtype and relative_error(got, want) < 1e-6
    with torch.no_grad():
        assert swat.chunked_cross_entropy(x, weight, targets, chunk_size).item() == \
            pytest.approx(expected.item(), rel=1e-6)


def test_the_loss_tail_as_compiled_is_the_eager_tail():
    """The chunk's tail as torch.compile traces it (the one-hot a comparison with each column;
    the aot_eager backend runs the traced graph without a compiler) and the eager tail (the
    one-hot a scatter) give F.cross_entropy's loss and gradient, rows without a target included."""
    torch.manual_seed(0)
    logits = torch.randn(37, 101)
    targets = torch.randint(0, 101, (37,))
    targets[::5] = -1
    weights = (targets != -1) / (targets != -1).sum()
    leaf = logits.clone().requires_grad_()
    expected = F.cross_entropy(leaf, targets, ignore_index=-1)
    grad, = torch.autograd.grad(expected, leaf)
    traced = torch.compile(swat.chunk_loss_and_grad_, backend='aot_eager', fullgraph=True)
    for tail in (swat.chunk_loss_and_grad_, traced):
        loss, got = tail(logits.clone(), targets, weights)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert relative_error(got, grad) < 1e-6
        # 16-bit logits: computed in float32, the gradient written over them, rounded once
        half = logits.bfloat16()
        expected_half = F.cross_entropy(half.float(), targets, ignore_index=-1)
        loss, got = tail(half, targets, weights)
        assert got.data_ptr() == half.data_ptr() and got.dtype == torch.bfloat16
        assert loss.item() == pytest.approx(expected_half.item(), rel=1e-6)
        assert relative_error(got, grad) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize('bound', ['exact', 'loose'])
def test_the_loss_builds_logits_for_the_scored_rows_alone(monkeypatch, bound):
    """With max_targets, a bound on the scored targets, the loss and both gradients are still
    those of F.cross_entropy on the full logits (in float32, as the loss computes them, to its
    rounding), with and without gradients; and the output layer sees that many rows only, the
    scored ones among them."""
    monkeypatch.setattr(swat, 'FUSED_LOSS', False)     # the plain function, here to be watched
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.full((300,), -1)
    targets[torch.randperm(300)[:37]] = torch.randint(0, 101, (37,))
    max_targets = 37 if bound == 'exact' else 130
    expected = F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)
    grads = torch.autograd.grad(expected, (x, weight))
    seen, plain = [], swat.chunk_loss_and_grad_

    def watched(logits, targets, weights):          # each chunk's targets, as the loss sees them
        seen.append(targets)
        return plain(logits, targets, weights)
    monkeypatch.setattr(swat, 'chunk_loss_and_grad_', watched)
    loss = swat.chunked_cross_entropy(x, weight, targets, chunk_size=64, max_targets=max_targets)
    rows = torch.cat(seen)
    assert len(rows) == max_targets and (rows != -1).sum() == 37
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (x, weight)), grads):
        assert relative_error(got, want) < 1e-6
    with torch.no_grad():
        assert swat.chunked_cross_entropy(x, weight, targets, 64, max_targets).item() == \
            pytest.approx(expected.item(), rel=1e-6)


@slow
@needs_gpu
def test_fused_loss_is_the_plain_loss():
    """On a GPU each chunk's loss and gradient run compiled (swat.FUSED_LOSS): the same values
    and gradients as F.cross_entropy on the full logits, with a last chunk of another size (in
    float64, so that no matmul precision setting of another test can differ between the two)."""
    assert swat.FUSED_LOSS
    torch.manual_seed(0)
    x = torch.randn(300, 16, device='cuda', dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, device='cuda', dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (300,), device='cuda')
    targets[::5] = -1
    expected = F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)
    loss = swat.chunked_cross_entropy(x, weight, targets, chunk_size=128)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (x, weight)),
                         torch.autograd.grad(expected, (x, weight))):
        assert relative_error(got, want) < 1e-6


@slow
@needs_gpu
def test_the_loss_in_bfloat16_is_as_close_as_the_full_logits():
    """Under bfloat16 autocast (training on a GPU) the chunked loss's gradients are as close to
    the float64 truth as those of F.cross_entropy on the full bfloat16 logits: the output
    weight's gradient, a sum over every chunk, is added up in float32, not chunk by chunk in
    16 bits."""
    torch.manual_seed(0)
    x = torch.randn(8192, 384, device='cuda')
    weight = torch.randn(4096, 384, device='cuda') * 0.05
    targets = torch.randint(0, 4096, (8192,), device='cuda')
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    truth = torch.autograd.grad(F.cross_entropy(x64 @ w64.t(), targets), (x64, w64))
    errors = {}
    for name, loss_of in (('full', lambda x, w: F.cross_entropy((x @ w.t()).float(), targets)),
                          ('chunked', lambda x, w: swat.chunked_cross_entropy(x, w, targets,
                                                                              chunk_size=256))):
        x_, weight_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = loss_of(x_, weight_)
        got = torch.autograd.grad(loss, (x_, weight_))
        errors[name] = [relative_error(g, w) for g, w in zip(got, truth)]
    for full, chunked in zip(errors['full'], errors['chunked']):
        assert chunked < 1.5 * full, errors


@pytest.mark.usefixtures('reference_attention')
def test_model_loss_is_the_loss_of_its_logits():
    """SWAT.forward's loss is the cross-entropy of lm_head(hidden_states), the logits it never
    builds in full; targets of -1 are not scored."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn='softmax')).to(DEVICE)
    idx, targets = torch.randint(0, 101, (2, 2, 40), device=DEVICE)
    targets[0, :7] = -1
    _, loss = model(idx, targets)
    logits = model.lm_head(model.hidden_states(idx))                    # (B, T, V)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


IDS = torch.tensor([[1, 2, 3]])



@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('idx, targets, message', [
    (torch.zeros(5, dtype=torch.long), None,
     'idx must be (B, T) token ids; got shape (5,): add a batch dimension, idx[None]'),
    (torch.zeros(1, 2, 3, dtype=torch.long), None, 'idx must be (B, T) token ids; got shape (1, 2, 3)'),
    ([[1, 2, 3]], None, 'idx must be (B, T) token ids, a tensor; got a list: pass torch.tensor(idx)'),
    (torch.zeros(1, 5), None, 'got torch.float32: convert with idx.long()'),
    (torch.zeros(1, 0, dtype=torch.long), None, 'idx is empty, (B, T) = (1, 0)'),
    (torch.tensor([[1, V, 2]]), None, 'idx holds ids from 1 to 101; expected 0 .. 100 (vocab_size=101)'),
    (torch.tensor([[1, -1, 2]]), None, 'idx holds ids from -1 to 2; expected 0 .. 100'),
    (IDS, torch.tensor([[1, 2]]), 'targets must have the shape of idx, (1, 3); got (1, 2)'),
    (IDS, torch.tensor([1, 2, 3]), 'add a batch dimension, targets[None]'),
    (IDS, IDS.int(), 'got torch.int32: convert with targets.long()'),
    (IDS, torch.tensor([[1, V, 3]]), 'expected 0 .. 100, or -1 to ignore a position'),
    (IDS, torch.tensor([[1, -2, 3]]), 'expected 0 .. 100, or -1 to ignore a position'),
])
def test_forward_rejects_bad_token_ids(idx, targets, message):
    model = tiny_model(attn='softmax')
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        model(idx, targets)
    assert_one_line(e.value)



@pytest.mark.parametrize('rope', [True, False])
def test_model_single_layer_sees_only_its_window(rope):
    torch.manual_seed(0)
    w, T, changed = 5, 30, 11
    model = SWAT(tiny_config(n_layer=1, window=w, rope=rope)).to(DEVICE).eval()
    idx = torch.randint(0, 101, (1, T), device=DEVICE)
    idx2 = idx.clone()
    idx2[0, changed] = (idx[0, changed] + 1) % 101
    with torch.no_grad():
        a, b = model.hidden_states(idx), model.hidden_states(idx2)
    # position `changed` itself changes through its own embedding; look at everything else
    same = (a - b).abs().amax(dim=(0, 2)) == 0
    m = torch.arange(T, device=same.device)
    expected = (m < changed) | (m >= changed + w)
    assert torch.equal(same, expected)


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('n_layer, window', [(1, 5), (3, 4)])
def test_model_receptive_field_grows_with_depth(n_layer, window):
    """Changing the token exactly receptive_field - 1 positions before the last changes the last
    logits (each layer relays it w - 1 positions further); one position further back does not."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(n_layer=n_layer, window=window)).to(DEVICE).eval()
    T = model.receptive_field + 5
    idx = torch.randint(0, 101, (1, T), device=DEVICE)

    def last_logits_change(back):
        changed = idx.clone()
        changed[0, T - 1 - back] = (idx[0, T - 1 - back] + 1) % 101
        with torch.no_grad():
            return not torch.equal(model(idx)[0], model(changed)[0])

    assert last_logits_change(model.receptive_field - 1)
    assert not last_logits_change(model.receptive_field)


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



# (kind, the function that must refuse it, a fragment of the message that names the fix)
BAD_CHECKPOINTS = [
    ('missing', 'load', 'no checkpoint at .*ckpt.pt: train a model first'),
    ('directory', 'load', 'ckpt.pt is not a file: move it away'),
    ('empty', 'load', 'ckpt.pt is empty .*restore it from a copy'),
    ('garbage', 'load', 'cannot read the checkpoint .*ckpt.pt.*restore it from a copy'),
    ('truncated', 'load', 'cannot read the checkpoint .*ckpt.pt.*truncated'),
    ('foreign', 'load', r"ckpt.pt lacks \['model', 'model_args'\].*train again"),
    ('not a dict', 'load', r"ckpt.pt lacks \['model', 'model_args'\]"),
    ('unknown field', 'model', "model_args do not make a model .*n_experts.*train again"),
    ('refused value', 'model', "model_args do not make a model .*even n_head"),
    ('wrong shape', 'model', 'do not fit .*size mismatch for lm_head.weight.*train again'),
    ('missing weight', 'model', 'do not fit .*transformer.h.1.mlp.c_fc.weight'),
]


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('kind, refused_by, message', BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_clearly(tmp_path, kind, refused_by, message):
    out_dir = str(tmp_path / 'out')
    os.makedirs(out_dir)
    make_bad_checkpoint(out_dir, kind)
    # the model needs the file readable and complete, the model_args valid and the weights fitting
    calls = [lambda: SWAT.from_checkpoint(out_dir)]
    if refused_by == 'load':
        calls.append(lambda: load_checkpoint(out_dir))
    for call in calls:
        with pytest.raises(CheckpointError, match=message) as e:
            call()
        assert os.path.join(out_dir, 'ckpt.pt') in str(e.value)
        assert_one_line(e.value)
    assert issubclass(CheckpointError, ValueError)


def test_load_checkpoint_requires_what_the_caller_names(tmp_path):
    save_tiny_checkpoint(tmp_path)
    assert set(load_checkpoint(tmp_path)) == {'model', 'model_args'}
    with pytest.raises(CheckpointError, match=r"lacks \['iter_num'\]"):
        load_checkpoint(tmp_path, required=('model', 'iter_num'))


@pytest.mark.usefixtures('reference_attention')
def test_checkpoint_round_trip(tmp_path):
    model = save_tiny_checkpoint(tmp_path)
    idx = torch.randint(0, V, (2, 12))
    # an out_dir or the file itself
    for path in (tmp_path, tmp_path / 'ckpt.pt'):
        loaded, checkpoint = SWAT.from_checkpoint(str(path))
        assert not loaded.training and checkpoint['model_args'] == asdict(model.config)
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    # an override of a field the weights do not depend on
    wider, _ = SWAT.from_checkpoint(str(tmp_path), window=16)
    assert wider.config.window == 16 and wider.config.n_embd == model.config.n_embd


@pytest.mark.usefixtures('reference_attention')
def test_a_checkpoint_from_before_sigmoid_bias_loads_without_it(tmp_path):
    """model_args written before SWATConfig had sigmoid_bias: the model loads with the default,
    no bias, which is what it was trained with."""
    model = tiny_model()                                            # a sigmoid model
    old_args = {k: v for k, v in asdict(model.config).items() if k != 'sigmoid_bias'}
    torch.save({'model': model.state_dict(), 'model_args': old_args}, tmp_path / 'ckpt.pt')
    loaded, checkpoint = SWAT.from_checkpoint(str(tmp_path))
    assert 'sigmoid_bias' not in checkpoint['model_args'] and loaded.config.sigmoid_bias is False
    idx = torch.randint(0, V, (2, 12))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


# =============================================================================
# Generation: the constant-size KV cache is the full windowed forward

@pytest.mark.usefixtures('reference_attention')
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


PROMPT = torch.tensor([[3, 1, 4, 1, 5]])


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('changes, message', [
    (dict(temperature=-1.0), 'temperature=-1.0 must be a finite number >= 0'),
    (dict(temperature=float('nan')), 'temperature=nan must be a finite number >= 0'),
    (dict(temperature='hot'), "temperature='hot' must be a finite number >= 0"),
    (dict(max_new_tokens=-1), 'max_new_tokens=-1 must be an integer >= 0'),
    (dict(max_new_tokens=2.0), 'max_new_tokens=2.0 must be an integer >= 0'),
    (dict(top_k=0), 'top_k=0 must be an integer >= 1.*top_k=None samples from all tokens'),
    (dict(top_k=-5), 'top_k=-5 must be an integer >= 1'),
    (dict(top_k=2.5), 'top_k=2.5 must be an integer >= 1'),
    (dict(top_k=True), 'top_k=True must be an integer >= 1'),
    (dict(sink_tokens=-1), 'sink_tokens=-1 must be an integer >= 0'),
    (dict(sink_tokens=1.5), 'sink_tokens=1.5 must be an integer >= 0'),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), r'idx is empty, \(B, T\) = \(1, 0\)'),
    (dict(idx=torch.tensor([3, 1, 4])), r'got shape \(3,\): add a batch dimension, idx\[None\]'),
    (dict(idx=torch.tensor([[3, 1000, 4]])), 'idx holds ids from 3 to 1000; expected 0 .. 100'),
])
@pytest.mark.parametrize('method', ['generate', 'generate_tokens'])
def test_generate_rejects_bad_arguments(method, changes, message):
    model = tiny_model(attn='softmax')
    args = dict(idx=PROMPT, max_new_tokens=3)
    args.update(changes)
    with pytest.raises(ValueError, match=message) as e:
        list(getattr(model, method)(**args))          # generate_tokens checks at its first step
    assert_one_line(e.value)


@pytest.mark.usefixtures('reference_attention')
def test_generate_temperature_zero_is_greedy():
    model = tiny_model()
    greedy = model.generate(PROMPT, 6, temperature=0)
    assert greedy.shape == (1, 11) and torch.equal(greedy[:, :5], PROMPT)
    # top_k=1 keeps only the most likely token too: the same tokens, through the sampling path
    assert torch.equal(model.generate(PROMPT, 6, top_k=1), greedy)
    # and the first one is the argmax of the full forward
    assert greedy[0, 5] == model(PROMPT)[0][0, -1].argmax()
    # a temperature too small for logits / temperature to fit a float32 is greedy too
    assert torch.equal(model.generate(PROMPT, 6, temperature=1e-45), greedy)


@pytest.mark.usefixtures('reference_attention')
def test_generate_zero_new_tokens_returns_the_prompt():
    model = tiny_model(attn='softmax')
    assert torch.equal(model.generate(PROMPT, 0), PROMPT)
    assert list(model.generate_tokens(PROMPT, 0)) == []


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('prompt_by_steps', [False, True])
@pytest.mark.parametrize('attn, sinks, sigmoid_bias', [
    ('sigmoid', 0, False), ('softmax', 0, False), ('softmax', 3, False), ('sigmoid', 2, False),
    ('sigmoid', 0, True), ('sigmoid', 2, True)])
def test_generation_is_the_full_forward(attn, sinks, sigmoid_bias, prompt_by_steps, monkeypatch):
    """Greedy tokens and logits of the ring cache are those of the full windowed forward (with the
    same sinks) over the whole text: a prompt longer than the window, then 6x the window and 3x
    block_size of tokens, in float32, to float32 rounding. The full forward is causal, so one
    pass over the whole text gives at each position what it gives over the text up to there.
    With sigmoid_bias, the decode step and the sinks add the forward's b = -log(w). The prompt
    read by prefill, or by the decode step a token at a time (a short prompt's way)."""
    monkeypatch.setattr(swat, 'SHORT_PROMPT', 10 ** 6 if prompt_by_steps else 0)
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn, block_size=16,                          # window 8
                             sigmoid_bias=sigmoid_bias)).to(DEVICE).eval()
    assert model.transformer.h[0].attn.logit_bias == (-math.log(8) if sigmoid_bias else 0.0)
    P, N = 21, 50
    prompt = torch.randint(0, 101, (2, P), device=DEVICE)
    out = model.generate(prompt, N, temperature=0, sink_tokens=sinks)
    assert out.shape == (2, P + N) and torch.equal(out[:, :P], prompt)
    cache = model.new_cache(2, sinks)
    with torch.no_grad():
        full = model.lm_head(model.hidden_states(out, sink_tokens=sinks))   # (B, P + N, V)
        logits = model.prefill(prompt, cache)
        for t in range(P, P + N):
            assert torch.allclose(logits, full[:, t - 1], atol=1e-4, rtol=0), t
            assert torch.equal(out[:, t], full[:, t - 1].argmax(-1)), t
            logits = model.decode(out[:, t:t + 1], cache)


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('prompt_length', [1, 7, 8, 9, 40])
def test_prompts_of_any_length_fill_the_ring(prompt_length):
    """Prompts shorter than, as long as and longer than the window (8), and longer than
    block_size (32): the next token's logits after prefill + one decode step are the full
    forward's. Window 1 (a ring of one slot: the token itself) too."""
    torch.manual_seed(0)
    for window in (8, 1):
        model = SWAT(tiny_config(window=window)).to(DEVICE).eval()
        text = torch.randint(0, 101, (1, prompt_length + 1), device=DEVICE)
        cache = model.new_cache(1)
        with torch.no_grad():
            model.prefill(text[:, :-1], cache)
            logits = model.decode(text[:, -1:], cache)
            full, _ = model(text)
        assert torch.allclose(logits, full[:, -1], atol=1e-5, rtol=0), (window, prompt_length)


@pytest.mark.usefixtures('reference_attention')
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
    cache = model.new_cache(2, sink_tokens=s)
    with torch.no_grad():
        reread = model.lm_head(model.hidden_states(seq, sink_tokens=s))    # the dense path
        logits = model.prefill(seq[:, :30], cache)
        for t in range(30, 60):
            expected, _ = wide(torch.cat([seq[:, :s], seq[:, t - w:t]], dim=1))
            assert torch.allclose(logits, expected[:, -1], atol=1e-5, rtol=0), t
            assert torch.allclose(reread[:, t - 1], expected[:, -1], atol=1e-5, rtol=0), t
            logits = model.decode(seq[:, t:t + 1], cache)


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('attn, sigmoid_bias', [('softmax', False), ('sigmoid', True)])
def test_sink_tokens_change_nothing_until_the_window_leaves_them(attn, sigmoid_bias):
    """Up to w tokens the sinks are inside the window anyway: the model is the plain windowed
    one; up to s + w tokens no token has left the view, so it is the model with window s + w.
    (With sigmoid_bias the wide model keeps the narrow one's b = -log(w): b follows the window,
    and only the view should differ.)"""
    torch.manual_seed(0)
    s, w = 4, 8
    model = SWAT(tiny_config(attn=attn, window=w, sigmoid_bias=sigmoid_bias)).to(DEVICE).eval()
    wide = SWAT(tiny_config(attn=attn, window=s + w, sigmoid_bias=sigmoid_bias)).to(DEVICE).eval()
    wide.load_state_dict(model.state_dict())
    for narrow, block in zip(model.transformer.h, wide.transformer.h):
        block.attn.logit_bias = narrow.attn.logit_bias
    seq = torch.randint(0, 101, (2, s + w), device=DEVICE)
    with torch.no_grad():
        for t in range(1, s + w + 1):
            with_sinks, _ = model(seq[:, :t], sink_tokens=s)
            expected, _ = (model if t <= w else wide)(seq[:, :t])
            assert torch.allclose(with_sinks, expected, atol=1e-5, rtol=0), t


@pytest.mark.usefixtures('reference_attention')
def test_the_decode_step_reads_the_model_without_dropout():
    """A model with dropout, in training mode, decodes a text token by token as it does in
    evaluation mode: generation's step applies no dropout."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(dropout=0.5)).to(DEVICE)
    text = torch.randint(0, 101, (2, 12), device=DEVICE)
    runs = []
    with torch.no_grad():
        for training in (True, False):
            model.train(training)
            cache = model.new_cache(2)
            runs.append(torch.stack([model.decode(text[:, t:t + 1], cache) for t in range(12)]))
    assert torch.equal(*runs)
    model.train()
    assert not torch.equal(model(text)[0], model(text)[0])      # (dropout is on in forward)


@pytest.mark.usefixtures('reference_attention')
def test_the_cache_never_moves_or_grows():
    """The cache is sink_tokens + window slots from the first step on, and stays the same
    storage: the decode step's shapes and buffers never change (what a CUDA graph needs)."""
    torch.manual_seed(0)
    s, w = 2, 8
    model = SWAT(tiny_config(attn='softmax', window=w)).to(DEVICE).eval()
    H, D = model.config.n_head, model.config.n_embd // model.config.n_head
    cache = model.new_cache(3, s)
    buffers = [*cache.k, *cache.v, cache.slot_position, cache.position]
    where = [(x.data_ptr(), x.shape) for x in buffers]
    assert len(cache.k) == len(cache.v) == 2
    assert all(x.shape == (3, H, s + w, D) for x in cache.k + cache.v)
    token = torch.randint(0, 101, (3, 1), device=DEVICE)
    with torch.no_grad():
        model.prefill(torch.randint(0, 101, (3, 5), device=DEVICE), cache)
        for _ in range(3 * w):
            model.decode(token, cache)
            assert [(x.data_ptr(), x.shape) for x in buffers] == where
    assert cache.position.item() == 5 + 3 * w


@pytest.mark.usefixtures('reference_attention')
def test_far_positions_give_the_logits_of_near_ones():
    """Nothing depends on the absolute position: the same context past position 2^31 (the
    cache's positions moved there by a whole number of turns of the ring, so each token keeps
    its slot) gives the logits it gives at the start, to float32 rounding."""
    torch.manual_seed(0)
    model = SWAT(tiny_config()).to(DEVICE).eval()
    text = torch.randint(0, 101, (2, 30), device=DEVICE)
    near, far = model.new_cache(2), model.new_cache(2)
    with torch.no_grad():
        model.prefill(text[:, :20], near)
        model.prefill(text[:, :20], far)
        shift = far.window * (2 ** 31 // far.window + 1)   # the ring has window slots
        far.position += shift
        far.slot_position[far.slot_position >= 0] += shift
        for t in range(20, 30):
            a, b = model.decode(text[:, t:t + 1], near), model.decode(text[:, t:t + 1], far)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), t


@pytest.mark.usefixtures('reference_attention')
def test_sampling_draws_from_the_distribution():
    """sample() with the Gumbel-max trick: greedy at temperature 0, only the top_k tokens with
    top_k, and frequencies of softmax(logits / temperature) (within 5 standard deviations)."""
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]]).repeat(20000, 1)
    assert torch.equal(swat.sample(logits, 0, None), torch.ones(20000, 1, dtype=torch.long))
    assert set(swat.sample(logits, 1.0, 2).flatten().tolist()) == {1, 3}
    for temperature in (0.5, 1.0, 2.0, 1e39):  # (1e39: inf as a float32; uniform, its limit)
        for top_k in (None, 2, 3, 4):           # top_k: softmax over the k largest alone
            kept = logits[0] >= logits[0].topk(top_k or 4).values.min()
            p = F.softmax((logits[0] / temperature).masked_fill(~kept, float('-inf')), dim=-1)
            counts = torch.bincount(swat.sample(logits, temperature, top_k).flatten(), minlength=4)
            assert ((counts / 20000 - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt()).all(), \
                (temperature, top_k, counts)


@pytest.mark.parametrize('temperature', [1e-45, 1e-38, 1e-30])
def test_tiny_temperatures_are_greedy(temperature):
    """However small the temperature, nothing overflows (100 / 1e-38 is inf in float32, and so
    are the logits of several tokens): it picks the most likely token, as temperature 0 does."""
    torch.manual_seed(0)
    logits = torch.tensor([[50.0, 30.0, 100.0, -100.0]]).repeat(1000, 1)
    assert torch.equal(swat.sample(logits, temperature, None), torch.full((1000, 1), 2))
    assert torch.equal(swat.sample(logits, temperature, 2), torch.full((1000, 1), 2))


@pytest.mark.usefixtures('reference_attention')
def test_a_seed_reproduces_a_sample():
    torch.manual_seed(0)
    model = SWAT(tiny_config()).to(DEVICE).eval()
    prompt = torch.randint(0, 101, (2, 5), device=DEVICE)
    samples = []
    for _ in range(2):
        torch.manual_seed(1234)
        samples.append(model.generate(prompt, 20, temperature=1.0, top_k=50))
    assert torch.equal(*samples)


@pytest.mark.usefixtures('reference_attention')
@needs_gpu
@pytest.mark.parametrize('attn, sinks', [('sigmoid', 0), ('softmax', 4)])
def test_cuda_graph_generation_is_the_eager_generation(attn, sinks):
    """The recorded-and-replayed decode step gives the eager step's tokens, greedy and sampled
    with one seed, in float32."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn)).cuda().eval()
    prompt = torch.randint(0, 101, (4, 13), device='cuda')
    for temperature in (0, 1.0):
        runs = []
        for cuda_graph in (True, False):
            torch.manual_seed(7)
            runs.append(torch.cat(list(model.generate_tokens(
                prompt, 50, temperature=temperature, sink_tokens=sinks, cuda_graph=cuda_graph)), 1))
        assert torch.equal(*runs), temperature


@pytest.mark.usefixtures('reference_attention')
@needs_gpu
def test_a_compiled_decode_step_gives_the_eager_tokens():
    """compile=True (the step compiled, then recorded) gives the eager step's tokens, greedy and
    sampled with one seed, in float32, over more than 3 windows; and a second generation, with
    a new cache and another prompt, reuses the compiled step."""
    torch.manual_seed(0)
    model = SWAT(tiny_config()).cuda().eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for temperature, prompt_length in ((0, 13), (1.0, 5)):
        prompt = torch.randint(0, 101, (4, prompt_length), device='cuda')
        runs = []
        for compile in (True, False):
            torch.manual_seed(7)
            runs.append(torch.cat(list(model.generate_tokens(
                prompt, 50, temperature=temperature, compile=compile)), 1))
        assert torch.equal(*runs), temperature
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


@pytest.mark.usefixtures('reference_attention')
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


# =============================================================================
# Training: train.py, checkpoints, resume, DDP, signals, divergence

SETTINGS = dict(init_from='scratch', batch_size=4, gradient_accumulation_steps=1, eval_iters=2,
                eval_interval=250, log_interval=10, max_iters=2000, warmup_iters=100,
                lr_decay_iters=2000, learning_rate=1e-3, min_lr=1e-4, weight_decay=0.1,
                grad_clip=1.0, beta1=0.9, beta2=0.95, seed=1337)


@pytest.mark.parametrize('changes', [
    {}, {'init_from': 'resume'}, {'max_iters': 0}, {'grad_clip': 0.0}, {'weight_decay': 0.0},
    {'warmup_iters': 0}, {'learning_rate': 0.0, 'min_lr': 0.0}, {'beta1': 0.0, 'beta2': 0.0},
    {'lr_decay_iters': 50},                 # < warmup_iters: get_lr goes straight to min_lr
])
def test_check_settings_accepts_what_works(changes):
    check_settings({**SETTINGS, **changes})


@pytest.mark.parametrize('key, value, expected', [
    ('init_from', 'gpt2', "'scratch' or 'resume'"),
    *[(key, value, '1 or more') for key in ('batch_size', 'gradient_accumulation_steps',
                                            'eval_iters', 'eval_interval', 'log_interval')
      for value in (0, -1)],
    *[(key, -1, '0 or more') for key in ('max_iters', 'warmup_iters', 'lr_decay_iters')],
    *[(key, -1e-3, '0 or more') for key in ('learning_rate', 'min_lr', 'weight_decay')],
    ('grad_clip', -1.0, '0 (no clipping)'),
    *[(key, value, '[0, 1)') for key in ('beta1', 'beta2') for value in (-0.1, 1.0, 1.5)],
    *[('seed', value, 'an integer from 0 to 2**63 - 1') for value in (-1, 2 ** 64)],
])
def test_check_settings_rejects_what_breaks(key, value, expected):
    message = exit_message(check_settings, {**SETTINGS, key: value})
    assert message.startswith(f'--{key}={value}: expected') and expected in message


@pytest.mark.parametrize('total, world_size, expected', [
    (1, 1, (1, 1)), (5, 1, (5, 5)), (1, 2, (2, 1)), (2, 2, (2, 1)), (3, 2, (4, 2)),
    (1, 8, (8, 1)), (8, 8, (8, 1)), (12, 8, (16, 2)), (40, 8, (40, 5)),
])
def test_micro_batches_round_up_to_a_multiple_of_the_processes(total, world_size, expected):
    assert micro_batches_per_process(total, world_size) == expected


def write_checkpoint(out_dir):
    path = os.path.join(out_dir, 'ckpt.pt')
    torch.save({'iter_num': 5, 'model': {'w': torch.arange(4.0)}}, path)
    return path


def test_check_out_dir_makes_a_writable_folder(tmp_path):
    out = tmp_path / 'a' / 'b'
    check_out_dir(str(out), 'scratch')
    assert out.is_dir() and list(out.iterdir()) == []   # the probe file is gone again
    write_checkpoint(out)
    check_out_dir(str(out), 'resume')                   # resuming may use the checkpoint
    assert os.listdir(out) == ['ckpt.pt']


def test_check_out_dir_refuses_to_overwrite_a_checkpoint_from_scratch(tmp_path):
    ckpt = write_checkpoint(tmp_path)
    before = file_hash(ckpt)
    message = exit_message(check_out_dir, str(tmp_path), 'scratch')
    assert ckpt in message and '--init_from=resume' in message and '--out_dir' in message
    assert file_hash(ckpt) == before


def test_check_out_dir_refuses_what_cannot_hold_a_checkpoint(tmp_path):
    a_file = tmp_path / 'file'
    a_file.write_text('not a folder')
    assert 'is a file' in exit_message(check_out_dir, str(a_file), 'scratch')
    assert 'cannot write' in exit_message(check_out_dir, str(a_file / 'out'), 'scratch')
    (tmp_path / 'dir' / 'ckpt.pt').mkdir(parents=True)
    for init_from in ('scratch', 'resume'):
        message = exit_message(check_out_dir, str(tmp_path / 'dir'), init_from)
        assert 'ckpt.pt is not a file' in message and '--out_dir' in message


def test_check_out_dir_refuses_a_read_only_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, 'NamedTemporaryFile', read_only)
    message = exit_message(check_out_dir, str(tmp_path), 'scratch')
    assert 'Read-only file system' in message and '--out_dir' in message


def test_the_checkpoint_writer_saves_the_state_of_the_moment_it_was_given(tmp_path, monkeypatch):
    """train.py's checkpoints are written by a thread while training goes on: the file holds
    the state as it was at write(), whatever the tensors hold by the time the disk gets it, and
    is complete after finish(); a second write waits for the first."""
    disk_ready, save = threading.Event(), training.save_checkpoint_file
    def slow_disk(checkpoint, path):
        disk_ready.wait(10)
        save(checkpoint, path)
    monkeypatch.setattr(training, 'save_checkpoint_file', slow_disk)
    first, second = str(tmp_path / 'first.pt'), str(tmp_path / 'second.pt')
    weights = torch.arange(1_000_000.0)
    state = {'model': {'w': weights}, 'rng_states': [torch.tensor([1, 2])], 'iter_num': 3}
    writer = training.CheckpointWriter()
    writer.write(state, first)
    weights.add_(1)                         # the next steps, while the file is being written
    disk_ready.set()
    writer.write({**state, 'iter_num': 4}, second)
    assert os.path.exists(first)            # the first was finished before the second began
    writer.finish()
    saved = torch.load(first)
    assert saved['iter_num'] == 3 and torch.equal(saved['model']['w'], torch.arange(1_000_000.0))
    assert torch.equal(saved['rng_states'][0], torch.tensor([1, 2]))
    assert torch.equal(torch.load(second)['model']['w'], weights)
    writer.finish()                         # nothing in flight: returns at once


def test_a_failed_background_write_is_raised_by_the_next_call(tmp_path, monkeypatch):
    def full_disk(checkpoint, path):
        raise SystemExit(f"cannot save the checkpoint {path} (disk full)")
    monkeypatch.setattr(training, 'save_checkpoint_file', full_disk)
    writer = training.CheckpointWriter()
    writer.write({'iter_num': 1}, str(tmp_path / 'ckpt.pt'))
    with pytest.raises(SystemExit, match='disk full'):
        writer.finish()
    writer.finish()                         # raised once


def test_save_checkpoint_file_replaces_the_old_one(tmp_path):
    path = write_checkpoint(tmp_path)
    save_checkpoint_file({'iter_num': 10}, path)
    assert torch.load(path) == {'iter_num': 10}
    assert os.listdir(tmp_path) == ['ckpt.pt']


@pytest.mark.parametrize('error, reason', [
    (errno.ENOSPC, 'disk full'), (errno.EIO, os.strerror(errno.EIO)),
])
def test_save_checkpoint_file_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch,
                                                                 error, reason):
    path = write_checkpoint(tmp_path)
    before = file_hash(path)

    def half_a_save(obj, f):                # what a full disk does: part written, then an error
        f.write(b'x' * 1_000_000)
        f.flush()
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(torch, 'save', half_a_save)
    message = exit_message(save_checkpoint_file, {'iter_num': 10}, path)
    assert reason in message and path in message and '--init_from=resume' in message
    assert os.listdir(tmp_path) == ['ckpt.pt']          # no ckpt.pt.tmp left behind
    assert file_hash(path) == before


class FullDisk(io.FileIO):
    """A file on a disk with room for `room` bytes: a write beyond them fails, as a full disk's."""
    room = 100_000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_save_checkpoint_file_when_torch_finds_the_disk_full(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError (raised while handling the OSError),
    not as an OSError: the same one line, and nothing left behind."""
    path = write_checkpoint(tmp_path)
    before = file_hash(path)
    monkeypatch.setattr(training, 'open', FullDisk, raising=False)  # save_checkpoint_file's open
    message = exit_message(save_checkpoint_file, {'model': {'w': torch.zeros(100_000)}}, path)
    assert 'disk full' in message and path in message and '--init_from=resume' in message
    assert os.listdir(tmp_path) == ['ckpt.pt'] and file_hash(path) == before


@pytest.mark.parametrize('state, name', [
    ({'model': {'a': torch.ones(3), 'b': torch.tensor([1.0, float('nan')])}}, 'model.b'),
    ({'optimizer': {'state': {0: {'step': torch.tensor(3.0), 'exp_avg_sq': torch.tensor(
        [float('inf')])}}, 'param_groups': [{'lr': 0.1, 'params': [0]}]}},
     'optimizer.state.0.exp_avg_sq'),
    ({'model': {'ids': torch.arange(3), 'w': torch.ones(2, dtype=torch.bfloat16)}}, None),
])
def test_non_finite_names_the_first_broken_tensor(state, name):
    assert non_finite(state) == name


class SignalledAtOnce:
    """A StopFlag that has had a SIGTERM already: train.py saves at its first log step."""
    signum = signal.SIGTERM


@pytest.mark.usefixtures('script_state')
def test_a_stop_signal_never_saves_broken_weights(shakespeare, tmp_path, monkeypatch):
    """A stop signal saves at the next log step with no evaluation first. With a learning rate
    of 1e30 the second step breaks the weights after its loss was computed (still finite):
    train.py stops as diverged and the checkpoint of step 0 stays. In this process, tiny."""
    monkeypatch.setattr(training, 'StopFlag', SignalledAtOnce)
    monkeypatch.setattr(sys, 'argv', ['train.py', *TINY, f'--out_dir={tmp_path}',
                                      '--learning_rate=1e30', '--grad_clip=0.0',
                                      '--warmup_iters=0', '--log_interval=2'])
    message = exit_message(runpy.run_path, os.path.join(ROOT, 'train.py'), None, '__main__')
    assert 'holds NaN or inf at iter 2: training diverged' in message, message
    assert 'still holds the last good state' in message
    ckpt = load_ckpt(tmp_path)
    assert ckpt['iter_num'] == 0 and non_finite(ckpt) is None


def token_file(tmp_path, tokens=None, raw=None):
    path = tmp_path / 'train.bin'
    path.write_bytes(raw if raw is not None else np.array(tokens, dtype=np.uint16).tobytes())
    return str(path)


def test_check_token_file_accepts_just_enough_tokens(tmp_path):
    path = token_file(tmp_path, range(65))
    assert check_token_file(path, 64, 65) == 65


@pytest.mark.parametrize('tokens, raw, expected', [
    (None, b'', '0 bytes'),                             # empty
    (None, b'\x01\x00\x02', '3 bytes'),                 # odd-sized: not uint16
    (range(64), None, 'block_size=64 is too large'),    # one short of a sequence + its targets
    ([0] * 64 + [50304], None, 'token id 50304'),       # >= vocab_size: another tokenizer
])
def test_check_token_file_rejects_bad_data(tmp_path, tokens, raw, expected):
    path = token_file(tmp_path, tokens, raw)
    message = exit_message(check_token_file, path, 64, 50304)
    assert expected in message and path in message


def test_check_token_file_rejects_a_folder(tmp_path):
    assert 'is not a file' in exit_message(check_token_file, str(tmp_path), 64, 50304)


def assert_one_line_error(proc, *expected):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and all(text in error[0] for text in expected), proc.stderr


@slow
def test_train_refuses_bad_input_before_any_work(shakespeare, tmp_path):
    """End to end, one launch per place a check lives (the messages themselves are tested in
    process above): one line, exit 1 (2 for the command line), no traceback, nothing written."""
    out = f'--out_dir={tmp_path / "out"}'
    (tmp_path / 'a_file').write_text('not a folder')
    for args, code, expected in [
        (['--no_such_option=1'], 2, 'unknown option --no_such_option'),         # configurator
        (['--eval_iters=-1', out], 1, '--eval_iters=-1: expected 1 or more'),   # check_settings
        (['--device=foo', out], 1, "device='foo'"),                             # runtime
        ([f'--out_dir={tmp_path / "a_file"}'], 1, 'is a file'),                 # check_out_dir
        (['--dataset=no_such_dataset', out], 1, 'no_such_dataset'),             # the data
    ]:
        proc = run('train.py', *TINY, *args, check=False)
        assert proc.returncode == code, proc.stdout + proc.stderr
        error = proc.stderr.strip().splitlines()
        assert 'Traceback' not in proc.stderr and expected in error[-1], proc.stderr
        assert code == 2 or len(error) == 1, proc.stderr
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')

@slow
def test_train_from_scratch_never_overwrites_a_checkpoint(trained, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(trained[0], out)
    before = file_hash(out / 'ckpt.pt')
    proc = run('train.py', *TINY, f'--out_dir={out}', '--max_iters=0', check=False)
    assert_one_line_error(proc, str(out / 'ckpt.pt'), '--init_from=resume', '--out_dir')
    assert file_hash(out / 'ckpt.pt') == before


def test_get_lr_warms_up_peaks_decays_and_stays_at_the_floor():
    lr = lambda it: get_lr(it, 1e-3, 10, 110, 1e-4)    # noqa: E731
    assert lr(0) == pytest.approx(1e-3 / 11)            # the first step does not start at 0
    assert lr(9) == pytest.approx(1e-3 * 10 / 11)
    warmup = [lr(it) for it in range(11)]
    assert warmup == sorted(warmup)                     # climbs linearly ...
    assert lr(10) == pytest.approx(1e-3)                # ... to the peak at warmup_iters
    assert lr(60) == pytest.approx((1e-3 + 1e-4) / 2)   # cosine: half way at the midpoint
    decay = [lr(it) for it in range(10, 111)]
    assert decay == sorted(decay, reverse=True)
    assert lr(110) == lr(10_000) == 1e-4                # the floor, from lr_decay_iters on


def test_get_lr_edge_cases():
    assert get_lr(0, 1e-3, 0, 100, 1e-4) == pytest.approx(1e-3)     # no warmup: the peak at once
    assert get_lr(50, 1e-3, 100, 50, 1e-4) == pytest.approx(1e-3 * 51 / 101)  # still warming
    assert get_lr(100, 1e-3, 100, 50, 1e-4) == 1e-4     # decay ends before warmup: the floor
    assert get_lr(5, 0.0, 2, 10, 0.0) == 0.0


def test_rng_state_round_trip_gives_the_same_draws():
    torch.manual_seed(123)
    state = rng_state('cpu', 'cpu')
    assert state['cuda'] is None
    first = torch.rand(8)
    dropped = F.dropout(torch.ones(64), 0.5)            # the dropout masks come from this state
    assert restore_rng_state([state], 0, 1, 'cpu', 'cpu')
    assert torch.equal(torch.rand(8), first)
    assert torch.equal(F.dropout(torch.ones(64), 0.5), dropped)


def test_restore_rng_state_takes_this_ranks_state():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state('cpu', 'cpu'))
    torch.manual_seed(2)
    expected = torch.rand(4)
    assert restore_rng_state(states, 1, 2, 'cpu', 'cpu')
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize('states', [None, 'one state, two processes'])
def test_restore_rng_state_without_a_state_changes_nothing(states):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    if states is not None:
        states = [rng_state('cpu', 'cpu')]
        torch.rand(3)                                   # move on from the saved state
        before = torch.get_rng_state()
    assert not restore_rng_state(states, 0, 2, 'cpu', 'cpu')
    assert torch.equal(torch.get_rng_state(), before)


def wait_for(condition, seconds=5.0):
    """Python runs a signal handler between bytecodes, soon after the signal: wait for it."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_flag_remembers_the_signal_and_lets_a_second_one_kill(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    flag = StopFlag()
    try:
        assert flag.signum == 0
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == flag.handle
        os.kill(os.getpid(), signum)                    # what Ctrl-C or a cluster sends
        assert wait_for(lambda: flag.signum == signum)
        assert signal.getsignal(signum) == signal.SIG_DFL   # the next one kills, as usual
        other = signal.SIGINT if signum == signal.SIGTERM else signal.SIGTERM
        assert signal.getsignal(other) == flag.handle
    finally:
        flag.restore()
    assert {s: signal.getsignal(s) for s in before} == before


SAVED = asdict(SWATConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, window=16))


def test_merge_model_args_the_checkpoints_shape_wins_dropout_may_change():
    given = dict(SAVED, n_layer=3, window=32, dropout=0.1, attn='softmax')
    args, messages = merge_model_args(SAVED, given)
    assert args == dict(SAVED, dropout=0.1)
    assert messages == ["window=16 from the checkpoint (ignoring window=32)",   # field order
                        "n_layer=2 from the checkpoint (ignoring n_layer=3)",
                        "attn='sigmoid' from the checkpoint (ignoring attn='softmax')"]
    SWATConfig(**args)
    assert merge_model_args(SAVED, dict(SAVED)) == (SAVED, [])   # nothing to overrule: silent
    args, messages = merge_model_args(SAVED, dict(SAVED, dropout=0.1), changeable=())
    assert args['dropout'] == 0.0 and messages[0].startswith('dropout=0.0 from the checkpoint')


def test_merge_model_args_older_and_foreign_checkpoints():
    older = {k: v for k, v in SAVED.items() if k != 'rope_base'}  # saved before rope_base was
    args, messages = merge_model_args(older, dict(SAVED, rope_base=500000.0))
    assert args['rope_base'] == 500000.0 and messages == []
    older = {k: v for k, v in SAVED.items() if k != 'sigmoid_bias'}  # before sigmoid_bias was
    args, messages = merge_model_args(older, SAVED)
    assert args['sigmoid_bias'] is False and messages == []
    # a setting this SWATConfig does not know stays, for SWATConfig to refuse by name
    args, _ = merge_model_args(dict(SAVED, n_experts=8), SAVED)
    with pytest.raises(TypeError, match='n_experts'):
        SWATConfig(**args)


def test_every_model_field_is_a_setting_of_train_py():
    """train.py takes its model settings from SWATConfig's fields by name: each needs a global
    (the two added for that start at SWATConfig's defaults)."""
    with open(os.path.join(ROOT, 'train.py')) as f:
        tree = ast.parse(f.read())
    settings = {node.targets[0].id: node.value for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    for field in fields(SWATConfig):
        assert field.name in settings, field.name
        if field.name in ('rope_base', 'vocab_size'):
            assert ast.literal_eval(settings[field.name]) == field.default, field.name


def test_changed_settings():
    saved = {'init_from': 'scratch', 'learning_rate': 1e-3, 'batch_size': 4, 'gone': 1}
    config = {'init_from': 'resume', 'learning_rate': 1e-3, 'batch_size': 8}
    assert changed_settings(saved, config) == ['batch_size 4 -> 8']


def test_out_of_memory_advice():
    assert '--batch_size=8 --gradient_accumulation_steps=4' in out_of_memory_advice(16, 512, 2)
    assert 'block_size=512' in out_of_memory_advice(1, 512, 2)


def full_checkpoint():
    return {'model': {'w': torch.arange(3.0)}, 'model_args': SAVED, 'optimizer': {},
            'iter_num': 5, 'best_val_loss': 2.0}


def test_load_for_resume_reads_a_good_checkpoint(tmp_path):
    torch.save(full_checkpoint(), tmp_path / 'ckpt.pt')
    checkpoint = load_for_resume(str(tmp_path / 'ckpt.pt'), 'cpu')
    assert checkpoint['iter_num'] == 5 and torch.equal(checkpoint['model']['w'], torch.arange(3.0))


@pytest.mark.parametrize('content, expected', [
    (None, 'no checkpoint at'),
    (b'', 'is empty'),
    ('truncated', 'truncated'),
    (b'not a checkpoint', 'cannot read the checkpoint'),
    ({'state_dict': {}}, "lacks ['best_val_loss'"),                     # another program's
    ({k: v for k, v in full_checkpoint().items() if k != 'optimizer'}, "lacks ['optimizer']"),
])
def test_load_for_resume_names_the_file_of_a_broken_checkpoint(tmp_path, content, expected):
    path = tmp_path / 'ckpt.pt'
    if isinstance(content, dict):
        torch.save(content, path)
    elif content == 'truncated':
        torch.save(full_checkpoint(), path)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    message = exit_message(load_for_resume, str(path), 'cpu')
    assert expected in message and str(path) in message


def dataset(tmp_path, n=200, masks=None):
    """tmp_path/data with train.bin and val.bin holding 0, 1, ..., n - 1 (so a token's id is its
    position), and {split}_mask.bin from masks[split] if given."""
    data_dir = tmp_path / 'data'
    data_dir.mkdir(exist_ok=True)
    for split in ('train', 'val'):
        np.arange(n, dtype=np.uint16).tofile(data_dir / f'{split}.bin')
        if masks and split in masks:
            np.asarray(masks[split], dtype=np.uint8).tofile(data_dir / f'{split}_mask.bin')
    return str(data_dir)


def test_get_batch_reads_windows_and_their_next_tokens(tmp_path):
    data_dir = dataset(tmp_path)
    x, y = get_batch(data_dir, 'train', 3, 1337, 16, 4)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)                        # the targets: the next tokens
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # windows
    assert int(y.max()) <= 199


@pytest.mark.parametrize('example_length', [0, 17])
def test_get_batch_is_a_function_of_seed_split_and_key(tmp_path, example_length):
    """At any offset (example_length 0) or at the start of an example of 17 tokens."""
    data_dir = dataset(tmp_path, n=200 * 17)
    batch = lambda split, key, seed: get_batch(data_dir, split, key, seed, 16, 4,  # noqa: E731
                                               example_length=example_length)[0]
    assert torch.equal(batch('train', 3, 1337), batch('train', 3, 1337))
    torch.manual_seed(0)                                # the global random state plays no part
    assert torch.equal(batch('train', 3, 1337), batch('train', 3, 1337))
    assert not torch.equal(batch('train', 3, 1337), batch('train', 4, 1337))
    assert not torch.equal(batch('train', 3, 1337), batch('train', 3, 1338))
    assert not torch.equal(batch('train', ('eval', 0), 1337), batch('val', ('eval', 0), 1337))


@pytest.mark.parametrize('example_length', [0, 17])
def test_get_batch_micro_batches_share_out_one_batch(tmp_path, example_length):
    data_dir = dataset(tmp_path, n=50 * 17)
    whole = get_batch(data_dir, 'train', 7, 1, 16, 6, example_length=example_length)[0]
    parts = [get_batch(data_dir, 'train', 7, 1, 16, 2, micro_step, 3,
                       example_length=example_length)[0] for micro_step in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_get_batch_reopens_the_file_every_time(tmp_path):
    data_dir = dataset(tmp_path)
    before = get_batch(data_dir, 'train', 0, 1, 16, 4)[0]
    (np.arange(200, dtype=np.uint16)[::-1]).tofile(os.path.join(data_dir, 'train.bin'))
    assert torch.equal(get_batch(data_dir, 'train', 0, 1, 16, 4)[0], 199 - before)


def test_get_batch_masks_the_unscored_targets(tmp_path):
    scored = np.random.default_rng(0).random(200) < 0.3
    data_dir = dataset(tmp_path, masks={'train': scored})
    x, y = get_batch(data_dir, 'train', 3, 1337, 16, 8)
    plain = x + 1                                       # the targets without a mask
    assert torch.equal(y, torch.where(torch.from_numpy(scored)[plain], plain, -1))
    assert (y == -1).any() and (y != -1).any()
    assert torch.equal(get_batch(data_dir, 'train', 3, 1337, 16, 8)[0], x)  # x is not masked
    _, y_val = get_batch(data_dir, 'val', 3, 1337, 16, 8)   # val has no mask: all scored
    assert (y_val != -1).all()


def test_the_models_loss_scores_only_the_masked_targets(tmp_path):
    """The loss of a masked batch is the mean of the losses of its scored targets alone."""
    scored = np.random.default_rng(1).random(100) < 0.3
    data_dir = dataset(tmp_path, n=100, masks={'train': scored})
    x, y = get_batch(data_dir, 'train', 0, 1, 32, 2)
    torch.manual_seed(0)
    # (softmax attention: the plain PyTorch path, not the Triton kernel's CPU interpreter)
    model = SWAT(tiny_config(attn='softmax')).eval()   # vocab_size 101 > the ids 0..99
    singles = []
    with torch.no_grad():
        _, loss = model(x, y)
        for b, t in (y != -1).nonzero().tolist():      # each scored target on its own
            only = torch.full_like(y, -1)
            only[b, t] = y[b, t]
            singles.append(model(x, only)[1])
    assert len(singles) < y.numel()
    assert torch.allclose(loss, torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('example_length', [0, 20])
@pytest.mark.parametrize('chunk', [7, 1 << 24])
def test_most_scored_targets_is_the_most_of_any_sequence(tmp_path, example_length, chunk):
    """The bound train.py gives the loss: the largest count of scored targets among every
    sequence get_batch may read (any offset, or whole examples), by brute force; without a mask,
    None (every target scored). Chunks of 7 bytes carry sequences across their edges."""
    rng = np.random.default_rng(0)
    block = 16
    mask = (rng.random(400) < rng.random(400) ** 2).astype(np.uint8)   # dense and sparse runs
    token_path = mask_file(tmp_path, mask)
    if example_length:
        starts = range(0, len(mask), example_length)
    else:
        starts = range(len(mask) - block)
    expected = max(int(mask[i + 1:i + 1 + block].sum()) for i in starts)
    assert most_scored_targets(token_path, block, example_length, chunk) == expected
    assert most_scored_targets(str(tmp_path / 'val.bin'), block, example_length) is None


def mask_file_accepted(*args, **kwargs):
    """Whether check_mask_file(*args, **kwargs) lets training start (it stops with SystemExit)."""
    try:
        check_mask_file(*args, **kwargs)
    except SystemExit:
        return False
    return True


def mask_file(tmp_path, mask):
    token_path = str(tmp_path / 'train.bin')
    np.asarray(mask, dtype=np.uint8).tofile(mask_path(token_path))
    return token_path


def test_check_mask_file_without_a_mask_does_nothing(tmp_path):
    assert check_mask_file(str(tmp_path / 'train.bin'), 100, 16) is None


@pytest.mark.parametrize('mask, expected', [
    ([1] * 99, '99 bytes, but'),                        # one byte short
    ([1] * 101, '101 bytes, but'),
    ([1] * 50 + [2] + [1] * 49, 'holds the byte 2'),    # not 0 or 1
    ([0] * 100, 'scores no target in 99 tokens'),       # nothing scored
    ([1] * 50 + [0] * 16 + [1] * 34, 'block_size=16 may score none'),  # a gap as long as a block
])
def test_check_mask_file_rejects_bad_masks(tmp_path, mask, expected):
    token_path = mask_file(tmp_path, mask)
    message = exit_message(check_mask_file, token_path, 100, 16)
    assert expected in message and mask_path(token_path) in message


def test_check_mask_file_rejects_a_folder(tmp_path):
    os.mkdir(tmp_path / 'train_mask.bin')
    assert 'not a file' in exit_message(check_mask_file, str(tmp_path / 'train.bin'), 100, 16)


@pytest.mark.parametrize('chunk', [1 << 24, 3])
def test_check_mask_file_refuses_exactly_the_masks_a_batch_could_score_nothing_of(tmp_path,
                                                                                  chunk):
    """Brute force: a batch's targets are tokens i + 1 .. i + block_size, i < n - block_size;
    the check passes if and only if each such window scores a token."""
    rng = np.random.default_rng(0)
    n, block_size = 40, 6
    outcomes = set()
    for trial in range(300):
        mask = rng.random(n) < rng.choice([0.1, 0.2, 0.4, 0.8])
        token_path = mask_file(tmp_path, mask)
        fine = all(mask[i + 1:i + 1 + block_size].any() for i in range(n - block_size))
        passed = mask_file_accepted(token_path, n, block_size, chunk=chunk)
        assert passed == fine, mask.astype(int)
        outcomes.add(passed)
    assert outcomes == {True, False}


def test_prepare_dataset(tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / 'tiny'
    data_dir.mkdir()
    message = exit_message(prepare_dataset, str(data_dir), False)
    assert "dataset 'tiny'" in message and 'prepare.py' in message
    assert 'train.bin and ' in message and 'val.bin' in message
    (data_dir / 'train.bin').write_bytes(b'ab')             # one of the two: that one is named
    message = exit_message(prepare_dataset, str(data_dir), False)
    assert 'val.bin' in message and 'train.bin' not in message
    (data_dir / 'train.bin').unlink()
    (data_dir / 'prepare.py').write_text(
        "import os, sys\n"
        "assert sys.argv == [__file__], sys.argv\n"         # not train.py's --key=value options
        "for split in ('train', 'val'):\n"
        "    open(os.path.join(os.path.dirname(__file__), split + '.bin'), 'wb').write(b'ab')\n")
    message = exit_message(prepare_dataset, str(data_dir), True)   # not N processes at once
    assert 'run python' in message and not (data_dir / 'train.bin').exists()
    monkeypatch.setattr('sys.argv', ['train.py', '--batch_size=2'])
    prepare_dataset(str(data_dir), False)
    assert (data_dir / 'train.bin').read_bytes() == b'ab' and 'running' in capsys.readouterr().out
    assert sys.argv == ['train.py', '--batch_size=2']
    prepare_dataset(str(data_dir), False)               # there already: nothing to do
    assert 'running' not in capsys.readouterr().out



# corpora of whole examples (--example_length, data/recall)

E, BLOCK = 17, 16                       # examples of block_size + 1 tokens, as data/recall's


@pytest.mark.parametrize('example_length', [E, E + 5])
def test_every_sequence_starts_at_an_example(tmp_path, example_length):
    data_dir = dataset(tmp_path, n=10 * example_length)
    starts = set()
    for key in range(40):
        x, y = get_batch(data_dir, 'train', key, 1337, BLOCK, 8, example_length=example_length)
        assert x.shape == y.shape == (8, BLOCK)
        assert (x[:, 0] % example_length == 0).all()    # token i sits at position i
        assert torch.equal(y, x + 1)                    # within one example: no cut
        assert torch.equal(x, x[:, :1] + torch.arange(BLOCK))
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(0, 10 * example_length, example_length))   # and every one of them


def test_example_length_0_reads_exactly_the_batches_of_before(tmp_path):
    """The random offsets of before, written out here: the same generator, the same draw."""
    data_dir = dataset(tmp_path, n=30 * E)
    data = np.fromfile(os.path.join(data_dir, 'train.bin'), dtype=np.uint16).astype(np.int64)
    for seed, key, micro_step, micro_batches in ((1337, 3, 0, 1), (1, ('eval', 4), 2, 3)):
        digest = hashlib.sha256(repr((seed, 'train', key)).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little'))
        ix = torch.randint(len(data) - BLOCK, (micro_batches * 4,), generator=generator)
        ix = ix[micro_step * 4:(micro_step + 1) * 4]
        expected = torch.stack([torch.from_numpy(data[i:i + BLOCK]) for i in ix])
        for kwargs in ({}, {'example_length': 0}):
            x, y = get_batch(data_dir, 'train', key, seed, BLOCK, 4, micro_step, micro_batches,
                             **kwargs)
            assert torch.equal(x, expected) and torch.equal(y, expected + 1)
    assert (x[:, 0] % E != 0).any()                     # offsets anywhere, as before


def test_example_batches_are_masked(tmp_path):
    scored = np.random.default_rng(0).random(10 * E) < 0.3
    data_dir = dataset(tmp_path, n=10 * E, masks={'train': scored})
    x, y = get_batch(data_dir, 'train', 3, 1337, BLOCK, 8, example_length=E)
    plain = x + 1
    assert torch.equal(y, torch.where(torch.from_numpy(scored)[plain], plain, -1))


@pytest.mark.parametrize('example_length', [1, BLOCK, -E])
def test_check_token_file_refuses_examples_too_short_for_a_sequence(tmp_path, example_length):
    path = os.path.join(dataset(tmp_path, n=10 * E), 'train.bin')
    message = exit_message(check_token_file, path, BLOCK, 101, example_length)
    assert f'--example_length={example_length}: expected 0' in message
    assert f'at least block_size + 1 = {BLOCK + 1}' in message


@pytest.mark.parametrize('example_length', [0, E, 2 * E, 5 * E])
def test_check_token_file_accepts_whole_examples(tmp_path, example_length):
    path = os.path.join(dataset(tmp_path, n=10 * E), 'train.bin')   # 170 tokens: 10 x 17, 5 x 34, 2 x 85
    assert check_token_file(path, BLOCK, 1000, example_length) == 10 * E


@pytest.mark.parametrize('split', ['train', 'val'])
def test_check_token_file_refuses_a_corpus_of_partial_examples(tmp_path, split):
    data_dir = dataset(tmp_path, n=10 * E)
    np.arange(10 * E + 3, dtype=np.uint16).tofile(os.path.join(data_dir, f'{split}.bin'))
    message = exit_message(check_token_file, os.path.join(data_dir, f'{split}.bin'), BLOCK, 1000,
                           E)
    assert f'{split}.bin holds {10 * E + 3} tokens, not a whole number of examples' in message
    assert f'--example_length={E} (3 left over)' in message and '--example_length=0' in message
    other = 'val' if split == 'train' else 'train'      # the other split is fine
    assert check_token_file(os.path.join(data_dir, f'{other}.bin'), BLOCK, 1000, E) == 10 * E


def recall_like_mask(rng, n_examples, example_length=E):
    """One answer per example, anywhere among its targets (positions 1 .. BLOCK)."""
    mask = np.zeros((n_examples, example_length), dtype=np.uint8)
    mask[np.arange(n_examples), rng.integers(1, BLOCK + 1, n_examples)] = 1
    return mask.ravel()


def test_check_mask_file_accepts_long_gaps_between_examples(tmp_path):
    mask = np.zeros((3, E), dtype=np.uint8)
    mask[0, 1] = mask[1, BLOCK] = mask[2, 1] = 1       # gaps of 31 tokens: longer than a block
    token_path = mask_file(tmp_path, mask.ravel())
    assert check_mask_file(token_path, 3 * E, BLOCK, E) is None
    # at random offsets the same mask could give a sequence nothing to score: refused
    assert 'scores no target in' in exit_message(check_mask_file, token_path, 3 * E, BLOCK)
    mask = recall_like_mask(np.random.default_rng(0), 200)
    assert check_mask_file(mask_file(tmp_path, mask), 200 * E, BLOCK, E) is None


@pytest.mark.parametrize('example_length, scored, expected', [
    (E, [], 'example 4 (tokens 69..84'),                # nothing scored at all
    (E, [0], 'example 4 (tokens 69..84'),               # position 0 is an input, never a target
    (E + 3, [BLOCK + 1, E + 2], 'example 4 (tokens 81..96'),    # after the sequence: not read
])
def test_check_mask_file_refuses_an_example_that_scores_nothing(tmp_path, example_length, scored,
                                                                expected):
    mask = recall_like_mask(np.random.default_rng(1), 8, example_length).reshape(8, -1)
    mask[4] = 0
    mask[4, scored] = 1
    token_path = mask_file(tmp_path, mask.ravel())
    message = exit_message(functools.partial(check_mask_file, example_length=example_length),
                           token_path, 8 * example_length, BLOCK)
    assert expected in message and mask_path(token_path) in message and 'NaN' in message


def test_check_mask_file_refuses_bytes_other_than_0_and_1_in_examples(tmp_path):
    mask = recall_like_mask(np.random.default_rng(2), 6)
    mask[0] = 2                                         # position 0 too: every byte is checked
    message = exit_message(check_mask_file, mask_file(tmp_path, mask), 6 * E, BLOCK, E)
    assert 'holds the byte 2' in message


@pytest.mark.parametrize('chunk', [1 << 24, 3, 2 * E + 1])
def test_check_mask_file_refuses_exactly_the_masks_with_an_empty_example(tmp_path, chunk):
    """Brute force: example k's sequence targets tokens k E + 1 .. k E + block_size; the check
    passes if and only if each of them scores a token."""
    rng = np.random.default_rng(0)
    n, example_length = 9, E + 2
    outcomes = set()
    for trial in range(200):
        mask = rng.random(n * example_length) < rng.choice([0.02, 0.05, 0.1, 0.3])
        token_path = mask_file(tmp_path, mask)
        fine = all(mask[k * example_length + 1:k * example_length + 1 + BLOCK].any()
                   for k in range(n))
        passed = mask_file_accepted(token_path, n * example_length, BLOCK, example_length,
                                    chunk=chunk)
        assert passed == fine, mask.astype(int)
        outcomes.add(passed)
    assert outcomes == {True, False}


def eval_losses(stdout):
    """[(step, train loss, val loss), ...] from train.py's evaluation lines."""
    return [(int(s), float(t), float(v)) for s, t, v in
            re.findall(r'step (\d+): train loss ([\d.]+), val loss ([\d.]+)', stdout)]


@slow
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


@slow
def test_checkpoint_contents(trained):
    out, proc = trained
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu')
    assert set(ckpt) >= {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}
    assert ckpt['iter_num'] == 10
    assert ckpt['model_args']['n_layer'] == 2 and ckpt['model_args']['window'] == 16
    assert ckpt['config']['batch_size'] == 4 and ckpt['config']['max_iters'] == 10
    assert ckpt['best_val_loss'] == pytest.approx(min(v for _, _, v in eval_losses(proc.stdout)),
                                                abs=1e-4)


@slow
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
    proc = run(repo / 'train.py', *TINY, '--max_iters=0', f'--out_dir={tmp_path / "out"}',
               cwd=tmp_path)
    assert 'running' in proc.stdout and 'prepare.py' in proc.stdout
    for split in ('train', 'val'):
        assert os.path.getsize(repo / 'data' / 'shakespeare' / f'{split}.bin') > 100_000
    assert [s for s, _, _ in eval_losses(proc.stdout)] == [0]
    assert os.path.exists(tmp_path / 'out' / 'ckpt.pt')


@slow
def test_resume_equals_an_uninterrupted_run(shakespeare, tmp_path):
    """6 steps in one go == 3 steps, stop, resume, 3 steps: bit for bit (same batches, same
    optimizer state, same dropout masks; the model's shape from the checkpoint, whatever the
    command line says). Identical by construction: every run is the same command on the same
    machine, so the same thread count orders every float32 sum alike."""
    args = [*TINY, '--dropout=0.1', '--eval_interval=3', '--always_save_checkpoint=True',
            '--warmup_iters=2', '--lr_decay_iters=6', '--learning_rate=1e-2',
            '--gradient_accumulation_steps=2']
    whole, half = tmp_path / 'whole', tmp_path / 'half'
    run('train.py', *args, f'--out_dir={whole}', '--max_iters=6')
    run('train.py', *args, f'--out_dir={half}', '--max_iters=3')
    assert load_ckpt(half)['iter_num'] == 3
    proc = run('train.py', *args, '--n_layer=3', f'--out_dir={half}', '--max_iters=6',
               '--init_from=resume')
    assert 'continuing from iter 3' in proc.stdout and 'no random state' not in proc.stdout
    assert 'n_layer=2 from the checkpoint (ignoring n_layer=3)' in proc.stdout
    assert [step for step, _, _ in eval_losses(proc.stdout)] == [3, 6]
    assert 'evaluating: 2 batches of train and val' in proc.stdout
    a, b = load_ckpt(whole), load_ckpt(half)
    assert a['iter_num'] == b['iter_num'] == 6
    assert_same_weights(a['model'], b['model'])
    assert a['best_val_loss'] == b['best_val_loss']
    assert a['rng_states'][0]['torch'].equal(b['rng_states'][0]['torch'])


@needs_gpu
@slow
def test_the_recorded_training_step_is_the_eager_step(shakespeare, tmp_path):
    """train.py with its step recorded as a CUDA graph and replayed trains as the eager step
    does: the same losses and weights, with the learning rate changing every step (warmup, then
    decay) and gradient clipping. A graph that replayed stale inputs or learning rates, added up
    its gradients, or reset the optimizer's state would be far off."""
    args = [*TINY, '--device=cuda', '--max_iters=12', '--log_interval=3', '--eval_interval=6',
            '--always_save_checkpoint=True', '--warmup_iters=4', '--lr_decay_iters=12',
            '--learning_rate=1e-2', '--grad_clip=0.5']
    logs, checkpoints = [], []
    for graph in (True, False):
        out_dir = tmp_path / f'graph-{graph}'
        proc = run('train.py', *args, f'--cuda_graph={graph}', f'--out_dir={out_dir}')
        logs.append(re.findall(r'iter (\d+): loss ([\d.]+)', proc.stdout))
        checkpoints.append(load_ckpt(out_dir))
    assert len(logs[0]) == 4 and [i for i, _ in logs[0]] == [i for i, _ in logs[1]]
    for (_, a), (_, b) in zip(*logs):
        assert abs(float(a) - float(b)) < 1e-4
    for name, weight in checkpoints[1]['model'].items():
        torch.testing.assert_close(checkpoints[0]['model'][name], weight, atol=1e-4, rtol=1e-3)


@slow
def test_a_cuda_graph_it_cannot_record_is_said_and_the_step_runs_eagerly(shakespeare, tmp_path):
    proc = run('train.py', *TINY, '--cuda_graph=True', '--gradient_accumulation_steps=2',
               '--max_iters=2', f'--out_dir={tmp_path}')
    assert ('cuda_graph: off, the step runs eagerly (a graph of it needs a GPU, '
            'gradient_accumulation_steps=1)') in proc.stdout
    assert load_ckpt(tmp_path)['iter_num'] == 2


@needs_gpu
def test_a_recorded_step_over_masked_targets_is_the_eager_step():
    """A training step recorded as a CUDA graph whose loss reads the scored rows alone
    (max_targets: a sort and a gather inside the graph) trains as the same step run eagerly:
    the same losses and weights over batches that score different positions, and how many."""
    torch.manual_seed(0)
    models = [SWAT(tiny_config()).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cuda') for model in models]
    prepare_optimizer(optimizers[0], True, 'cuda')

    def step_of(model, optimizer):
        def step(x, y):
            _, loss = model(x, y, max_targets=24)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return step
    recorded = CUDAGraphStep(step_of(models[0], optimizers[0]))
    eager = step_of(models[1], optimizers[1])
    for scored in (20, 24, 7, 24, 13):
        x = torch.randint(0, V, (4, 32), device='cuda')
        y = torch.full_like(x, -1)
        y.view(-1)[torch.randperm(x.numel(), device='cuda')[:scored]] = \
            torch.randint(0, V, (scored,), device='cuda')
        assert recorded(x, y).item() == pytest.approx(eager(x, y).item(), rel=1e-5), scored
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@slow
def test_ddp_two_processes_equal_one(shakespeare, tmp_path):
    """torchrun with 2 processes and no --gradient_accumulation_steps (the default 1 is rounded
    up to 2, one micro-batch each) == 1 process of 2 micro-batches: the same global batch. The
    ranks read different micro-batches and average their gradients, so both end with the weights
    rank 0 saved, and those are the single process's.

    Identical by construction, so compared bit for bit: every process runs one thread (torchrun
    gives its workers OMP_NUM_THREADS=1; the single run gets the same), so each micro-batch's
    gradient is the same float32 sum in both runs, and (g1 + g2) / 2 from the all-reduce equals
    g1 / 2 + g2 / 2 from accumulation exactly (halving is exact in binary floating point). The
    evaluation losses are summed in another order across the ranks: those agree to 1e-6."""
    args = [*TINY, '--max_iters=4', '--eval_interval=2', '--always_save_checkpoint=True',
            '--learning_rate=1e-2', '--warmup_iters=1']
    # the single process runs beside the two, so that the test takes the time of the longer
    single = subprocess.Popen([sys.executable, 'train.py', *args, '--gradient_accumulation_steps=2',
                               f'--out_dir={tmp_path / "single"}'], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**SCRIPT_ENV, 'OMP_NUM_THREADS': '1'})
    try:
        proc = torchrun(*args, f'--out_dir={tmp_path / "ddp"}', script=rank_weights_script(tmp_path))
        single_stdout, _ = single.communicate(timeout=300)
    finally:
        single.kill()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert single.returncode == 0, single_stdout
    assert 'gradient_accumulation_steps=1 rounded up to 2, a multiple of the 2 processes' \
        in proc.stdout
    assert '2 process(es) x 1 micro-batch(es)' in proc.stdout
    # the master alone logs: one evaluation line per evaluation, one 'done'
    assert [s for s, _, _ in eval_losses(proc.stdout)] == [0, 2, 4]
    assert proc.stdout.count('done: final train loss') == 1
    a = load_ckpt(tmp_path / 'ddp')
    for rank in (0, 1):
        assert_same_weights(torch.load(tmp_path / f'rank{rank}.pt'), a['model'])

    b = load_ckpt(tmp_path / 'single')
    assert a['iter_num'] == b['iter_num'] == 4 and len(a['rng_states']) == 2
    assert_same_weights(a['model'], b['model'])
    assert a['best_val_loss'] == pytest.approx(b['best_val_loss'], rel=1e-6)
    # printed with 4 decimals: equal up to one unit of the last digit
    for (_, t1, v1), (_, t2, v2) in zip(eval_losses(proc.stdout), eval_losses(single_stdout)):
        assert t1 == pytest.approx(t2, abs=1.5e-4) and v1 == pytest.approx(v2, abs=1.5e-4)


LOOPBACK = '127.0.0.1'


DEADLINE = 120      # seconds for all three runs together; they take 20-35 s on 2 busy cores


ENV = {**SCRIPT_ENV, 'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo'}


def free_port():
    """A TCP port of the loopback address that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def node_command(node_rank, port, run_id, script, args):
    """The README's command for node node_rank of 2, one process each, on the loopback."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
            f'--node_rank={node_rank}', '--rdzv_backend=c10d',
            f'--rdzv_endpoint={LOOPBACK}:{port}', f'--rdzv_id={run_id}',
            f'--local_addr={LOOPBACK}', str(script), *args]


def start(command, log_path):
    """Popen(command) with its output going to log_path."""
    with open(log_path, 'w') as log:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs, deadline):
    """Wait until all have exited, one has failed, or time.monotonic() passes deadline."""
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(c not in (None, 0) for c in codes):
            return
        time.sleep(0.1)


def pids_running(marker):
    """The processes (other than this one) whose command line holds marker."""
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:                 # gone meanwhile, or not ours to read
                pass
    return pids


def kill_all(procs, marker):
    """Kill procs (the launchers and the single run), then their workers: torchrun starts each
    worker in a session of its own, so neither killing a launcher nor its process group ends
    them, and a killed launcher's workers would wait for their peers for many minutes. They
    are found by marker, the path of this test's own script, on their command lines."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()                         # a dead launcher starts no more workers
    workers = pids_running(marker)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10        # not our children: wait until they are gone
    while workers and time.monotonic() < deadline:
        workers = [pid for pid in workers if os.path.exists(f'/proc/{pid}')]
        time.sleep(0.05)


@slow
def test_two_nodes_equal_one_process(shakespeare, tmp_path):
    """Two nodes of one process each (gradient_accumulation_steps 1 rounds up to 2, one
    micro-batch per rank) == one process of 2 micro-batches, bit for bit: every process runs
    one thread, so it is the same arithmetic as in test_ddp_two_processes_equal_one, with the
    ranks started by two launchers that find each other through the rendezvous. The single run
    goes at the same time as the nodes (it needs none of their results): less wall time."""
    args = [*TINY, '--max_iters=4', '--eval_interval=2', '--always_save_checkpoint=True',
            '--learning_rate=1e-2', '--warmup_iters=1']
    script = rank_weights_script(tmp_path)      # saves tmp_path/rank{RANK}.pt at the end
    port, run_id = free_port(), f'nanoswat-test-{uuid.uuid4().hex[:8]}'
    names = ['node 0', 'node 1', 'single process']
    logs = [tmp_path / f'{name.replace(" ", "_")}.log' for name in names]
    commands = [node_command(n, port, run_id, script, [*args, f'--out_dir={tmp_path / "nodes"}'])
                for n in (0, 1)]
    commands.append([sys.executable, 'train.py', *args, '--gradient_accumulation_steps=2',
                     f'--out_dir={tmp_path / "single"}'])
    procs = []
    t0 = time.monotonic()
    try:
        for command, log in zip(commands, logs):
            procs.append(start(command, log))
        wait_all(procs, t0 + DEADLINE)
    finally:
        kill_all(procs, marker=str(script))     # nothing is left running, whatever happened
    elapsed = time.monotonic() - t0
    outputs = [log.read_text() for log in logs]
    report = '\n'.join(f'--- {name}: exit {proc.returncode} ---\n{out}'
                       for name, proc, out in zip(names, procs, outputs))
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0, 0], (f'exit codes {codes} (-9: killed by the test, after another '
                                f'failed or at the deadline of {DEADLINE}s) after '
                                f'{elapsed:.1f}s:\n{report}')

    nodes = outputs[0] + outputs[1]
    assert '2 process(es) x 1 micro-batch(es)' in nodes, report
    assert nodes.count('done: final train loss') == 1, report    # the master alone logs
    a, b = load_ckpt(tmp_path / 'nodes'), load_ckpt(tmp_path / 'single')
    for rank in (0, 1):                         # every rank ends with the weights it saved
        assert_same_weights(torch.load(tmp_path / f'rank{rank}.pt'), a['model'])
    assert a['iter_num'] == b['iter_num'] == 4 and len(a['rng_states']) == 2
    assert_same_weights(a['model'], b['model'])                 # zero tolerance
    print(f'two nodes and the single process: {elapsed:.1f}s')



@slow
def test_signal_saves_a_checkpoint_and_resume_works(shakespeare, tmp_path):
    """SIGTERM (what a cluster sends before it preempts a job): a checkpoint at the next log
    step, and the resumed run ends bit for bit as one never stopped (identical by construction:
    same command, same machine, same threads). Ctrl-C takes the same path: StopFlag handles both
    signals alike, tested in process with each."""
    signum = signal.SIGTERM
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


@slow
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


@slow
def test_nan_loss_stops_and_keeps_the_good_checkpoint(trained, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(trained[0], out)
    ckpt = out / 'ckpt.pt'
    before = file_hash(ckpt), os.path.getmtime(ckpt)
    # A learning rate of 1e30 without clipping sends the weights to infinity in a few steps.
    # No evaluation before the end (eval_interval): that would save the state it measures.
    proc = run('train.py', *TINY, f'--out_dir={out}', '--init_from=resume',
               '--max_iters=20', '--eval_interval=100', '--always_save_checkpoint=True',
               '--learning_rate=1e30', '--grad_clip=0.0', '--warmup_iters=0', check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr
    assert re.search(r'the (evaluation )?loss is .*(nan|inf).* at iter \d+: training diverged',
                     proc.stderr), proc.stderr
    assert 'learning_rate' in proc.stderr
    assert (file_hash(ckpt), os.path.getmtime(ckpt)) == before
    ckpt_data = load_ckpt(out)
    assert ckpt_data['iter_num'] == 10
    assert all(torch.isfinite(t).all() for t in ckpt_data['model'].values())


@slow
def test_incompatible_checkpoint_is_refused_clearly(trained, tmp_path):
    """Resuming from a checkpoint whose weights do not fit its model_args, or whose model_args
    SWATConfig refuses: one line naming the file and the cause. (A missing, empty, truncated or
    foreign file is load_for_resume's to refuse: tested in process.)"""
    ckpt = load_ckpt(trained[0])
    for name, tampered, expected in [
        ('shape', dict(ckpt, model={**ckpt['model'], 'lm_head.weight': torch.zeros(50304, 48)}),
         ['do not fit', 'lm_head.weight', 'size mismatch']),
        ('args', dict(ckpt, model_args={**ckpt['model_args'], 'n_experts': 8}), ['n_experts']),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        torch.save(tampered, bad / 'ckpt.pt')
        proc = run('train.py', *TINY, f'--out_dir={bad}', '--init_from=resume', check=False)
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
        assert str(bad / 'ckpt.pt') in proc.stderr and all(e in proc.stderr for e in expected)


# =============================================================================
# The scripts: the configurator, sample.py, eval.py

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
    assert message in configurator_error([arg], capsys)


def configurator_error(args, capsys):
    """The one line apply_overrides(defaults(), ..., args) prints before it exits with status 2,
    changing nothing."""
    cfg = defaults()
    with pytest.raises(SystemExit) as e:
        apply_overrides(cfg, list(cfg), args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert cfg == defaults()                    # nothing half-applied
    return err.strip()


def write_file(path, text):
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_configurator_runs_config_files_in_turn_then_the_overrides(tmp_path, capsys):
    """Each file runs with the settings so far in scope; a file's values are checked as the
    command line's are (an int is fine for a float); the --key=value options come last."""
    cfg = defaults()
    first = write_file(tmp_path / 'a.py', '"""A recipe."""\nbatch_size = 32\nlearning_rate = 1\n')
    second = write_file(tmp_path / 'b.py', "batch_size = 2 * batch_size\ndevice = 'cuda'\n")
    overrides = apply_overrides(cfg, list(cfg), [first, second, '--device=cpu'])
    assert cfg == {**defaults(), 'batch_size': 64, 'learning_rate': 1.0, 'device': 'cpu'}
    assert isinstance(cfg['learning_rate'], float)
    assert overrides == {'batch_size': 64, 'learning_rate': 1.0, 'device': 'cpu'}
    assert capsys.readouterr().out.splitlines() == [
        f"{first}: batch_size = 32", f"{first}: learning_rate = 1.0",
        f"{second}: batch_size = 64", f"{second}: device = 'cuda'", "override: device = 'cpu'"]


@pytest.mark.parametrize('text, message', [
    ('batch_size = 8\nbach_size = 8\n',           # a typo: the line, and what there is
     ":2: unknown setting 'bach_size'; valid keys: batch_size, learning_rate, compile"),
    ('batch_size = 1.5\n', ":1: batch_size = 1.5: expected a value of type int (default 16)"),
    ('compile = 1\n', ":1: compile = 1: expected True or False"),
    ('device = 0\n', ":1: device = 0: expected a value of type str (default 'cpu'), got int"),
    ('\nbatch_size = = 8\n', ":2: invalid syntax"),
    ('import os\n', ":1: expected an assignment to a setting, like batch_size = 32"),
    ("batch_size, device = 8, 'cpu'\n", ":1: expected an assignment to a setting"),
    ('batch_size = 8 // 0\n', ":1: ZeroDivisionError: integer division or modulo by zero"),
    ('batch_size = size\n', ":1: NameError: name 'size' is not defined"),
])
def test_configurator_names_the_file_and_line_of_a_bad_setting(tmp_path, capsys, text, message):
    path = write_file(tmp_path / 'recipe.py', text)
    assert configurator_error([path], capsys).startswith(path + message)


def test_configurator_refuses_a_config_file_it_cannot_use(tmp_path, capsys):
    missing = str(tmp_path / 'missing.py')
    assert configurator_error([missing], capsys).startswith(
        f"config file {missing}: no such file; give the path of a Python file of settings")
    assert configurator_error([str(tmp_path)], capsys).startswith(
        f"config file {tmp_path}: cannot read it (Is a directory)")
    latin1 = tmp_path / 'latin1.py'
    latin1.write_bytes("device = 'caf\xe9'\n".encode('latin-1'))
    assert configurator_error([str(latin1)], capsys) == (
        f"config file {latin1} is not UTF-8 text: save it as UTF-8")
    recipe = write_file(tmp_path / 'recipe.py', 'batch_size = 8\n')
    assert configurator_error(['--batch_size=4', recipe], capsys) == (
        f"config file {recipe} after --key=value options: name the config files first, then "
        f"the options that override them")


HELP_SCRIPTS = ['train.py', 'sample.py', 'eval.py', 'recall.py', 'bench_generate.py',
                *sorted(os.path.relpath(path, ROOT)
                        for path in glob.glob(os.path.join(ROOT, 'data', '*', 'prepare.py')))]


@pytest.mark.parametrize('script', HELP_SCRIPTS)
def test_help_says_what_each_setting_does(script, monkeypatch, capsys):
    """--help: the usage, config files included, then every setting with the default this
    machine gets and the comment beside it in the script."""
    monkeypatch.setattr(sys, 'argv', [script, '--help'])
    monkeypatch.setattr(sys, 'path', list(sys.path))    # the prepare scripts add the repo root
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python {script} [CONFIG_FILE ...] [--key=value ...]\n")
    for line in out.split('settings, with their defaults:\n')[1].splitlines():
        option, _, description = line.strip().partition('  ')
        assert option.startswith('--') and description.strip(), f"{option}: no description"
    if script == 'train.py' and not GPU:        # what a CPU gets, not what a GPU would
        assert '--compile=False ' in out and "--backend='gloo' " in out


# =============================================================================
# The recipes in config/: each loads, passes train.py's checks, and trains

RECIPES = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))


class Settings(Exception):
    """Raised by the stand-in for apply_overrides: the settings of a script and their defaults."""


def script_defaults(script, monkeypatch):
    """{setting: default} of a script that calls apply_overrides, as it defines them on this
    machine: the script runs up to that call, and no further."""
    def stop(config, keys, args=None):
        raise Settings({key: config[key] for key in keys})

    with monkeypatch.context() as m:
        m.setattr(configurator, 'apply_overrides', stop)
        with pytest.raises(Settings) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    return e.value.args[0]


def train_in_process(args, monkeypatch):
    """Run `python train.py args` in this process; return its globals. On a CPU the attention
    runs the einsum reference; the signal handlers, random state and matmul precision train.py
    sets are put back afterwards."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    monkeypatch.setattr(sys, 'argv', ['train.py', *args])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    precision = torch.get_float32_matmul_precision()
    try:
        with torch.random.fork_rng():
            return runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_passes_the_checks(recipe, monkeypatch):
    """Two comment lines on top (what, where, how long, to what loss); values of the types of
    train.py's settings that pass its checks and make a valid model; a dataset with a prepare
    script; on 8 GPUs, a whole number of micro-batches per GPU."""
    with open(recipe, encoding='utf-8') as f:
        text = f.read()
    head = text.splitlines()[:2]
    assert all(line.startswith('# ') for line in head) and 'loss' in head[1]
    assert 'measured' in head[1] or head[1].startswith('# Not run here: ')
    defaults = script_defaults('train.py', monkeypatch)
    settings = dict(defaults)
    assigned = apply_overrides(settings, list(settings), [recipe])
    check_settings(settings)
    SWATConfig(**{f.name: settings[f.name] for f in fields(SWATConfig)})
    assert os.path.isfile(os.path.join(ROOT, 'data', settings['dataset'], 'prepare.py'))
    if '--nproc_per_node=8' in text:
        assert settings['gradient_accumulation_steps'] % 8 == 0
    if os.path.basename(recipe) == 'train_shakespeare.py':     # the defaults, written out
        assert {k: v for k, v in defaults.items() if k in assigned} == assigned
        missing = set(defaults) - set(assigned) - {'device', 'dtype', 'compile', 'cuda_graph',
                                                    'backend'}
        assert not missing, f"train.py settings not written out: {missing}"


@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_trains_two_steps(recipe, shakespeare, tmp_path, monkeypatch):
    """Each recipe, its model and batches shrunk by overrides after it, trains 2 steps (on
    Shakespeare)."""
    run = train_in_process([recipe, *TINY, '--block_size=32', '--batch_size=2', '--eval_iters=1',
                            '--max_iters=2', '--log_interval=1', '--gradient_accumulation_steps=1',
                            '--dataset=shakespeare', f'--out_dir={tmp_path}'], monkeypatch)
    assert run['iter_num'] == 2 and math.isfinite(run['losses']['val'])
    assert os.path.isfile(tmp_path / 'ckpt.pt')


def test_train_refuses_a_bad_config_file(tmp_path, monkeypatch, capsys):
    recipe = write_file(tmp_path / 'recipe.py', 'n_layer = 4\nn_layers = 8\n')
    with pytest.raises(SystemExit) as e:
        train_in_process([recipe, f'--out_dir={tmp_path / "out"}'], monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{recipe}:2: unknown setting 'n_layers'; valid keys: out_dir, ")
    assert len(err.splitlines()) == 1 and not os.path.exists(tmp_path / 'out')   # before any work


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('num_samples, sinks', [(3, 0), (1, 4), (2, 4)])
def test_sample_prints_each_sample_whole(softmax_checkpoint, tmp_path, capsys, num_samples, sinks):
    """Each sample whole, the prompt (here from a file) first, then the separator; the tokens/s
    line last; with and without sinks, streamed (one sample) and batched."""
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('ROMEO:', encoding='utf-8')
    sample.main([f'--out_dir={softmax_checkpoint}', f'--num_samples={num_samples}', '--device=cpu',
                 '--max_new_tokens=40', f'--sink_tokens={sinks}', f'--start=FILE:{prompt}'])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines.count(SEPARATOR) == num_samples
    assert out.count('\nROMEO:') == num_samples            # each sample, whole
    assert re.fullmatch(rf'{40 * num_samples} tokens in [\d.]+ s: [\d.]+ tokens/s '
                        rf'\(the first after [\d.]+ s\)', lines[-1])

@slow
def test_sample_errors(tmp_path):
    """End to end: no checkpoint names the file and train.py; a mistyped option lists the valid
    ones (exit 2). The settings' and prompts' messages are tested in process above."""
    proc = run('sample.py', f'--out_dir={tmp_path}', '--device=cpu', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert os.path.join(str(tmp_path), 'ckpt.pt') in proc.stderr and 'train.py' in proc.stderr
    proc = run('sample.py', '--windw=3', check=False)
    assert proc.returncode == 2 and 'valid keys:' in proc.stderr and 'num_samples' in proc.stderr

def test_decode_stream_holds_back_characters_split_across_tokens():
    """GPT-2 splits ' 😀' into the tokens b' \\xf0\\x9f\\x98' and b'\\x80' (and ' ¿' into b' \\xc2'
    and b'\\xbf'): the stream must hold the incomplete bytes back until the character is
    complete, not print replacement characters."""
    enc = gpt2_tokenizer()
    text = ' ¿qué? 😀 ok'
    ids = enc.encode(text)
    assert any(not enc.decode_single_token_bytes(i).decode('utf-8', errors='ignore')
               for i in ids)                            # a token that holds no whole character
    pieces = list(sample.decode_stream(enc, iter(ids)))
    assert ''.join(pieces) == text and '\ufffd' not in ''.join(pieces)
    # padding ids (>= 50257, never in the data) are dropped, as sample.decode drops them
    assert ''.join(sample.decode_stream(enc, [ids[0], 50300, *ids[1:]])) == text
    # a character still incomplete when the tokens end comes out as one replacement character
    assert enc.decode_single_token_bytes(ids[5]) == b' \xf0\x9f\x98'
    assert ''.join(sample.decode_stream(enc, ids[:6])) == ' ¿qué? \ufffd'


@pytest.mark.usefixtures('script_state')
def test_sample_streams_what_generate_samples(tmp_path, capsys):
    """num_samples=1 streams: the printed text is exactly the decoded prompt and sample of
    model.generate, then the separator and the tokens/s. Numerically identical by construction:
    the same process, the same seed, the same order of random draws (building the model draws
    its initial weights before the checkpoint's replace them) and the same settings."""
    save_tiny_checkpoint(tmp_path)
    out_dir = tmp_path
    sample.main([f'--out_dir={out_dir}', '--num_samples=1', '--max_new_tokens=64',
                 '--device=cpu', '--dtype=float32', '--start=ROMEO:'])
    printed, stats = capsys.readouterr().out.rsplit(SEPARATOR + '\n', 1)

    torch.manual_seed(sample.seed)
    model, _ = SWAT.from_checkpoint(out_dir, 'cpu')
    enc = gpt2_tokenizer()
    ids = model.generate(torch.tensor([enc.encode('ROMEO:')]), 64,
                         temperature=sample.temperature, top_k=sample.top_k)
    assert printed.endswith('\n' + sample.decode(enc, ids[0].tolist()) + '\n')
    assert re.fullmatch(r'64 tokens in [\d.]+ s: [\d.]+ tokens/s \(the first after [\d.]+ s\)\n',
                        stats)


@pytest.mark.usefixtures('script_state')
def test_sample_temperature_zero_is_greedy(tmp_path, capsys):
    """temperature=0 picks the most likely token at every step: every sample is the same, and
    it is what repeated argmaxes of the plain forward (no cache) give."""
    save_tiny_checkpoint(tmp_path)
    out_dir = tmp_path
    sample.main([f'--out_dir={out_dir}', '--num_samples=2', '--max_new_tokens=8', '--device=cpu',
                 '--dtype=float32', '--start=ROMEO:', '--temperature=0'])
    samples = capsys.readouterr().out.split(SEPARATOR + '\n')[:2]

    model, _ = SWAT.from_checkpoint(out_dir, 'cpu')
    enc = gpt2_tokenizer()
    idx = torch.tensor([enc.encode('ROMEO:')])
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(idx)                      # the last position's logits
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = sample.decode(enc, idx[0].tolist()) + '\n'
    assert samples[0].endswith('\n' + greedy) and samples[1] == greedy


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('arg, message', [
    ('--num_samples=0', 'num_samples=0: expected 1 or more'),
    ('--num_samples=-2', 'num_samples=-2: expected 1 or more'),
    ('--max_new_tokens=-1', 'max_new_tokens=-1: expected 0 or more'),
    ('--temperature=-0.5', 'temperature=-0.5: expected a finite number >= 0'),
    ('--temperature=1e999', 'temperature=inf: expected a finite number >= 0'),
    ('--top_k=-1', 'top_k=-1: expected a number of tokens >= 1, or 0 for all tokens'),
    ('--sink_tokens=-1', 'sink_tokens=-1: expected 0 or more'),
    ('--seed=18446744073709551616', 'seed=18446744073709551616: expected an integer from 0'),
])
def test_sample_rejects_bad_settings_before_loading(tmp_path, arg, message):
    """Checked before anything is loaded: the checkpoint here is corrupt, and it is the setting
    that the message names."""
    make_bad_checkpoint(tmp_path, 'garbage')
    assert message in exit_message(sample.main, [f'--out_dir={tmp_path}', '--device=cpu', arg])


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('prompt, message', [
    ('missing.txt', 'no such file'),
    ('folder', 'is a directory'),
    ('latin1.txt', 'is not UTF-8 text: save the prompt as UTF-8'),
    ('empty.txt', 'the prompt is empty'),
])
def test_sample_prompt_file_errors(tmp_path, prompt, message):
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'latin1.txt').write_bytes('caf\u00e9 au lait'.encode('latin-1'))
    (tmp_path / 'empty.txt').write_bytes(b'')
    save_tiny_checkpoint(tmp_path)
    path = tmp_path / prompt
    got = exit_message(sample.main, [f'--out_dir={tmp_path}', '--device=cpu',
                                     f'--start=FILE:{path}'])
    assert message in got and (prompt == 'empty.txt' or str(path) in got)


@pytest.mark.usefixtures('script_state')
def test_sample_refuses_a_prompt_beyond_the_models_vocabulary(tmp_path):
    save_small_vocabulary_checkpoint(tmp_path)  # vocab_size=V: 'ROMEO:' encodes to larger ids
    message = exit_message(sample.main, [f'--out_dir={tmp_path}', '--device=cpu',
                                         '--start=ROMEO:'])
    assert f'vocab_size={V}' in message and str(tmp_path / 'ckpt.pt') in message


@pytest.mark.usefixtures('script_state')
def test_sample_checks_the_device_before_the_checkpoint(tmp_path):
    """There is no GPU cuda:99 on any machine: the message says so (not a torch.load hint about
    map_location), before the (corrupt) checkpoint is read."""
    make_bad_checkpoint(tmp_path, 'garbage')
    message = exit_message(sample.main, [f'--out_dir={tmp_path}', '--device=cuda:99'])
    assert "device='cuda:99'" in message and 'GPU' in message and 'ckpt.pt' not in message


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('kind', ['missing', 'empty', 'truncated', 'garbage', 'foreign',
                                  'directory'])
@pytest.mark.parametrize('script', ['sample', 'eval'])
def test_scripts_refuse_bad_checkpoints_in_one_line(tmp_path, kind, script):
    """sample.py and eval.py read checkpoints through SWAT.from_checkpoint, and print its
    one-line CheckpointError (which names the file) instead of a traceback."""
    path = make_bad_checkpoint(tmp_path, kind)
    if script == 'sample':
        message = exit_message(sample.main, [f'--out_dir={tmp_path}', '--device=cpu'])
    else:
        message = exit_message(eval_script.load_model, str(tmp_path), 0, 1024, 'cpu')
    assert str(path) in message
    if kind in ('missing', 'directory'):        # the fix names the script's own option
        option, other = (('--out_dir', '--checkpoints') if script == 'sample' else
                         ('--checkpoints', '--out_dir'))
        assert option in message and other not in message, message


EVAL = runpy.run_path(os.path.join(ROOT, 'eval.py'))    # its functions; main() does not run


def eval_table(stdout):
    """{row label: [loss or None, ...]} and the lengths, from eval.py's markdown table; a seed
    group's cell, mean ± std, is the pair (mean, std)."""
    lines = [line for line in stdout.splitlines() if line.startswith('| ')]
    lengths = [int(c) for c in lines[0].strip('| ').split(' | ')[1:]]
    rows = {}
    for line in lines[1:]:
        label, *cells = line.strip('| ').split(' | ')
        rows[label] = [None if c == '-' else tuple(map(float, c.split(' ± '))) if ' ± ' in c
                       else float(c) for c in cells]
    return lengths, rows


EVAL_ARGS = ['--device=cpu', '--dtype=float32', "--plot=", '--max_tokens_per_length=1024']


@slow
@pytest.mark.usefixtures('script_state')
def test_eval_prints_a_finite_table(trained, capsys):
    out_dir, _ = trained
    eval_script.main([f'--checkpoints={out_dir},{out_dir}:window=-1',
                      '--lengths=64,256,1024,65536', *EVAL_ARGS])
    out = capsys.readouterr().out
    lengths, rows = eval_table(out)
    assert lengths == [64, 256, 1024, 65536]
    name = os.path.basename(out_dir)
    assert list(rows) == [f'{name} (sigmoid, alibi balanced, rope, w=16)',
                          f'{name} (sigmoid, alibi balanced, rope, w=full (trained 16))']
    for losses in rows.values():
        # a 10-step model is close to uniform over the vocabulary: ln(50304) = 10.83
        assert all(math.isfinite(x) and 0 < x < 12 for x in losses[:3])
        assert losses[3] is None                # longer than every held-out play: skipped
    assert 'L=65536: skipped' in out


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_labels_say_the_sigmoid_bias(tmp_path, capsys):
    # a model with b = -log w inside its sigmoid is not the plain SWAT of the same settings
    plain, biased = str(tmp_path / 'plain'), str(tmp_path / 'biased')
    for out_dir, bias in ((plain, False), (biased, True)):
        model = tiny_model(attn='sigmoid', sigmoid_bias=bias, vocab_size=50304)
        os.makedirs(out_dir)
        torch.save(dict(model=model.state_dict(), model_args=asdict(model.config)),
                   os.path.join(out_dir, 'ckpt.pt'))
    eval_script.main([f'--checkpoints={plain},{biased}', '--lengths=8', *EVAL_ARGS,
                      '--max_tokens_per_length=64'])
    _, rows = eval_table(capsys.readouterr().out)
    assert list(rows) == ['plain (sigmoid, alibi balanced, rope, w=8)',
                          'biased (sigmoid + b=-log w, alibi balanced, rope, w=8)']
    assert rows['plain (sigmoid, alibi balanced, rope, w=8)'] != \
        rows['biased (sigmoid + b=-log w, alibi balanced, rope, w=8)']


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_sink_tokens_on_a_softmax_checkpoint(softmax_checkpoint, capsys):
    # --sink_tokens applies to every checkpoint; `:sinks=0` turns it off for one of them
    eval_script.main([f'--checkpoints={softmax_checkpoint},{softmax_checkpoint}:sinks=0',
                      '--sink_tokens=2', '--lengths=8,64,256', *EVAL_ARGS,
                      '--max_tokens_per_length=256'])
    out = capsys.readouterr().out
    _, rows = eval_table(out)
    label = f'{os.path.basename(softmax_checkpoint)} (softmax, alibi balanced, rope, w=8)'
    assert list(rows) == [label + ' +2 sinks', label]
    with_sinks, without = rows.values()
    assert all(math.isfinite(x) for x in with_sinks + without)
    # up to w tokens nothing has left the window yet, so the sinks change nothing
    assert with_sinks[0] == without[0]


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_probes_the_heads(softmax_checkpoint, tmp_path, capsys):
    """--heads: after the losses, each head's weights and output norm, a table and a plot."""
    plot = tmp_path / 'heads.png'
    eval_script.main([f'--checkpoints={softmax_checkpoint}', '--lengths=64', *EVAL_ARGS,
                      f'--heads={plot}'])
    out = capsys.readouterr().out
    assert out.count('| layer | head | slope |') == 1 and '| 1 | 1 |' in out
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# eval.py's seed groups: out-s1+out-s2+out-s3, one row of mean ± std

@pytest.fixture
def seed_checkpoints(tmp_path):
    """out_dirs out-s1, out-s2, out-s3 of one tiny softmax model (window 8) from three seeds; the
    output embedding scaled by the seed, so that their losses are far apart."""
    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = SWAT(tiny_config(attn='softmax', vocab_size=50304))
        with torch.no_grad():
            model.lm_head.weight.mul_(10 * seed)
        paths.append(str(tmp_path / f'out-s{seed}'))
        save_tiny_checkpoint(paths[-1], model=model.state_dict())
    return paths


SEED_LABEL = ' (softmax, alibi balanced, rope, w=8)'       # each seed_checkpoints' kind, read as is


def test_seed_group_cells_and_labels():
    """The mean and the sample std (ddof=1) of the members' losses, numpy's; a group of one its
    plain loss; the table's cells; the labels: the names with what differs in braces."""
    mean_std, label = EVAL['mean_std'], EVAL['group_label']
    losses = [4.7, 4.75, 4.9]
    assert mean_std(losses) == (np.mean(losses), np.std(losses, ddof=1))
    assert mean_std([4.7]) == (4.7, None) and mean_std([None, None]) == (None, None)
    table = EVAL['format_table'](['a', 'b'], [8, 64], [[4.7351, None], [5.0, 6.0]],
                                 [[0.0123, None], [None, None]])
    assert table.splitlines()[2:] == ['| a | 4.735 ± 0.012 | - |', '| b | 5.000 | 6.000 |']
    for names, expected in [(['out-swat-s1', 'out-swat-s2', 'out-swat-s3'], 'out-swat-s{1,2,3}'),
                            (['out-s1', 'out-s12'], 'out-s{1,12}'),          # a number stays whole
                            (['run1-swat', 'run2-swat'], 'run{1,2}-swat'),
                            (['swat-a', 'swa-b'], 'swa{t-a,-b}'),
                            (['out-swat'], 'out-swat'),                      # a group of one
                            (['out-swat', 'out-swat'], 'out-swat+out-swat')]:  # in two folders
        paths = [os.path.join(f'run{i}', name, 'ckpt.pt') for i, name in enumerate(names)]
        assert label(paths, [name + ' (kind)' for name in names]) == expected + ' (kind)'


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_seed_group_is_the_mean_and_std_of_its_members(seed_checkpoints, capsys):
    """The members evaluated alone, and as a group: its row is numpy's mean and sample std over
    their rows (to the table's 3 decimals), '-' where the length was skipped; a group of one
    (the plain entry) and a group of one checkpoint twice are that checkpoint's row."""
    a, b, c = seed_checkpoints
    eval_script.main([f'--checkpoints={a},{b},{c},{a}+{b}+{c},{a}+{a}',
                      '--lengths=8,64,256,100000', *EVAL_ARGS, '--max_tokens_per_length=256'])
    _, rows = eval_table(capsys.readouterr().out)
    singles = [rows[f'out-s{seed}' + SEED_LABEL] for seed in (1, 2, 3)]
    assert all(isinstance(loss, float) for loss in singles[0][:3])   # no ± for a plain entry
    group = rows['out-s{1,2,3}' + SEED_LABEL]
    for length, (cell, losses) in enumerate(zip(group[:3], zip(*singles))):
        mean, std = cell
        assert mean == pytest.approx(np.mean(losses), abs=1.5e-3), length
        assert std == pytest.approx(np.std(losses, ddof=1), abs=1.5e-3), length
        assert std > 1                      # the members are far apart: a real spread
    assert group[3] is None and all(row[3] is None for row in singles)
    assert rows['out-s1+out-s1' + SEED_LABEL][:3] == [(loss, 0.0) for loss in singles[0][:3]]


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_seed_group_options_apply_to_every_member(seed_checkpoints, capsys):
    """`:sinks=2` after a group reads every member with 2 sinks: the group's row is the mean of
    the members' rows with sinks, not without."""
    a, b, _ = seed_checkpoints
    eval_script.main([f'--checkpoints={a}:sinks=2,{b}:sinks=2,{a}+{b}:sinks=2,{a}+{b}',
                      '--lengths=8,256', *EVAL_ARGS, '--max_tokens_per_length=256'])
    out = capsys.readouterr().out
    _, rows = eval_table(out)
    sinks = [rows[f'out-s{seed}{SEED_LABEL} +2 sinks'] for seed in (1, 2)]
    without = rows['out-s{1,2}' + SEED_LABEL]
    with_sinks = rows['out-s{1,2}' + SEED_LABEL + ' +2 sinks']
    for cell, losses in zip(with_sinks, zip(*sinks)):
        assert cell[0] == pytest.approx(np.mean(losses), abs=1e-3)
    assert with_sinks[0] == without[0]          # up to w tokens the sinks change nothing ...
    assert with_sinks[1] != without[1]          # ... past it they do
    # each member's own lines say it read with the sinks
    assert out.count(f'out-s2{SEED_LABEL} +2 sinks  L=256:') == 2


@pytest.mark.usefixtures('script_state', 'shakespeare')
def test_eval_seed_group_refuses_different_kinds_in_one_line(seed_checkpoints, tmp_path):
    """Members trained as different models: one line naming the two and what differs. A member
    that does not exist: the line a missing checkpoint gives alone. An empty member: the spec."""
    a, b, _ = seed_checkpoints
    sigmoid, wide = str(tmp_path / 'sigmoid'), str(tmp_path / 'wide')
    for path, config in ((sigmoid, tiny_config(vocab_size=50304)),
                         (wide, tiny_config(attn='softmax', vocab_size=50304, window=16))):
        save_tiny_checkpoint(path, model=SWAT(config).state_dict(), model_args=asdict(config))
    message = exit_message(eval_script.main, [f'--checkpoints={a}+{b}+{sigmoid}', *EVAL_ARGS])
    assert f"{a} and {sigmoid} are not the same kind of model (attn='softmax' vs 'sigmoid')" \
        in message
    message = exit_message(eval_script.main, [f'--checkpoints={a}+{wide}:window=-1', *EVAL_ARGS])
    assert f"{a} and {wide} are not the same kind of model (window=8 vs 16)" in message
    missing = str(tmp_path / 'nosuch')
    assert exit_message(eval_script.main, [f'--checkpoints={a}+{missing}', *EVAL_ARGS]) == \
        exit_message(eval_script.main, [f'--checkpoints={missing}', *EVAL_ARGS])
    for spec in (f'{a}++{b}', f'{a}+:sinks=2', ':sinks=2'):
        assert 'an out_dir is missing' in exit_message(eval_script.main,
                                                       [f'--checkpoints={spec}', *EVAL_ARGS])


def test_plot_draws_a_band_for_seed_groups(tmp_path):
    paths = [tmp_path / 'plain.png', tmp_path / 'band.png']
    for path, spreads in zip(paths, (None, [[0.3, 0.2, None]])):
        EVAL['plot_losses'](str(path), ['a'], [64, 256, 1024], [[5.0, 4.5, None]], [64], 'test',
                            spreads)
    assert paths[1].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert paths[0].read_bytes() != paths[1].read_bytes()


def test_checkpoint_options():
    parse = EVAL['parse_checkpoint']
    assert parse('out-swa', 0, 0) == ('out-swa', 0, 0)
    assert parse('out-swa:sinks=4', 0, 0) == ('out-swa', 0, 4)
    assert parse('out/ckpt.pt:window=-1:sinks=0', 0, 2) == ('out/ckpt.pt', -1, 0)
    for bad in ('out:sink=4', 'out:sinks=four', 'out:sinks'):
        with pytest.raises(SystemExit, match='bad option'):
            parse(bad, 0, 0)


@pytest.mark.usefixtures('script_state')
def test_eval_checks_for_matplotlib_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)     # `import matplotlib` now fails
    message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--dataset=nosuch',
                                              '--plot=eval.png', '--device=cpu'])
    assert "plot='eval.png' needs matplotlib" in message
    assert 'pip install matplotlib' in message and "--plot=''" in message
    # without a plot, matplotlib is not needed: the next problem is the dataset
    message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--dataset=nosuch',
                                              *EVAL_ARGS])
    assert 'matplotlib' not in message and "dataset='nosuch'" in message


@pytest.mark.parametrize('spec, message', [
    ('out:window=--3', "bad option 'window=--3'"),
    ('out:window=+3', "bad option 'window=+3'"),
    ('out:window=', "bad option 'window='"),
    ('out:window=-3', "checkpoint 'out:window=-3' would read with window=-3; expected a window "
                      "W >= 1, 0 (the model's own) or -1 (full attention)"),
    ('out:sinks=-1', "checkpoint 'out:sinks=-1' would read with sinks=-1; expected 0 or more"),
])
def test_checkpoint_spec_rejects_bad_numbers(spec, message):
    assert message in exit_message(eval_script.parse_checkpoint, spec, 0, 0)


def test_checkpoint_spec_checks_the_defaults_too():
    """--window and --sink_tokens are each checkpoint's defaults: checked like its options."""
    assert 'window=-2' in exit_message(eval_script.parse_checkpoint, 'out', -2, 0)
    assert 'sinks=-1' in exit_message(eval_script.parse_checkpoint, 'out', 0, -1)
    assert eval_script.parse_checkpoint('out:window=5', -2, 0) == ('out', 5, 0)


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('arg, message', [
    ('--batch_size=0', 'batch_size=0: expected 1 or more'),
    ('--batch_size=-1', 'batch_size=-1: expected 1 or more'),
    ('--max_batch_tokens=0', 'max_batch_tokens=0: expected 1 or more'),
    ('--max_tokens_per_length=-1', 'max_tokens_per_length=-1: expected 0 (all tokens) or more'),
    ('--checkpoints=out:window=--3', "bad option 'window=--3'"),
])
def test_eval_rejects_bad_settings_before_any_work(arg, message):
    """Before any work: the checkpoint and the dataset here do not exist, and it is the setting
    that the message names."""
    got = exit_message(eval_script.main, ['--checkpoints=nosuch', '--dataset=nosuch', *EVAL_ARGS,
                                          arg])
    assert message in got


@pytest.mark.usefixtures('script_state')
def test_eval_names_the_datasets_that_exist(tmp_path, monkeypatch):
    message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--dataset=nosuch',
                                              *EVAL_ARGS])
    datasets = sorted(name for name in os.listdir(os.path.join(ROOT, 'data'))
                      if os.path.exists(os.path.join(ROOT, 'data', name, 'prepare.py')))
    assert f"the datasets are {', '.join(datasets)}" in message
    assert 'run python' not in message             # there is no prepare script to run
    # a dataset with a prepare.py but no val.bin yet: run its prepare script
    (tmp_path / 'mini').mkdir()
    (tmp_path / 'mini' / 'prepare.py').write_text('')
    monkeypatch.setattr(eval_script, 'DATA_DIR', str(tmp_path))
    message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--dataset=mini',
                                              *EVAL_ARGS])
    assert 'run python data/mini/prepare.py first' in message


def save_small_vocabulary_checkpoint(out_dir):
    """out_dir/ckpt.pt of an untrained tiny softmax model with vocab_size=V."""
    model = tiny_model(attn='softmax')
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config)},
               os.path.join(out_dir, 'ckpt.pt'))


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('content, expected', [
    (b'', 'has 0 bytes'),                               # what an old prepare could leave
    (b'\x01\x00\x02', 'has 3 bytes'),                    # not uint16
    (np.array([1, 2, V, 3], dtype=np.uint16).tobytes(), f'token id {V}, but the model has '
                                                        f'vocab_size={V}'),
], ids=['empty', 'odd-sized', 'beyond the vocabulary'])
def test_eval_checks_the_data_as_train_py_does(tmp_path, monkeypatch, content, expected):
    """training.check_token_file, before any evaluation, against the checkpoints' vocabulary."""
    (tmp_path / 'mini').mkdir()
    (tmp_path / 'mini' / 'prepare.py').write_text('')
    (tmp_path / 'mini' / 'val.bin').write_bytes(content)
    monkeypatch.setattr(eval_script, 'DATA_DIR', str(tmp_path))
    save_small_vocabulary_checkpoint(tmp_path)
    message = exit_message(eval_script.main, [f'--checkpoints={tmp_path}', '--dataset=mini',
                                              *EVAL_ARGS])
    assert expected in message and os.path.join('mini', 'prepare.py') in message, message


@pytest.mark.usefixtures('script_state')
def test_eval_checks_the_plot_before_any_work(shakespeare, tmp_path):
    """Before the checkpoint (missing here) is read: a format matplotlib needs other software
    for, a folder that is a file; a folder that is missing is made."""
    (tmp_path / 'a_file').write_text('')
    for plot, expected in [('eval.jpg', "plot='eval.jpg': expected a file name ending in .png"),
                           (tmp_path / 'a_file' / 'eval.png', 'is a file, not a folder')]:
        message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--device=cpu',
                                                  f'--plot={plot}'])
        assert expected in message and '--plot' in message, message
    plot = tmp_path / 'new' / 'eval.svg'
    message = exit_message(eval_script.main, ['--checkpoints=nosuch', '--device=cpu',
                                              f'--plot={plot}'])
    assert 'no checkpoint' in message and plot.parent.is_dir()


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


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('attn', ['sigmoid', 'softmax'])
def test_stretch_loss_is_the_full_forward_up_to_the_window(attn):
    """T <= w: the window hides nothing, so eval's loss (windowed model, also through the
    KV-cache path with sinks) is the loss of a model with the same weights and no window."""
    torch.manual_seed(0)
    w, T = 16, 16
    model = SWAT(tiny_config(attn=attn, window=w)).to(DEVICE).eval()
    full = SWAT(tiny_config(attn=attn, window=1024)).to(DEVICE).eval()
    full.load_state_dict(model.state_dict())
    idx = torch.randint(0, 101, (3, T + 1), device=DEVICE)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    with torch.no_grad():
        _, expected = full(x, y)
    for sinks in (0, 3):
        assert abs(EVAL['stretch_loss'](model, x, y, sinks) - expected.item()) < 1e-5


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('attn, alibi, rope', [('sigmoid', 'balanced', True),
                                               ('sigmoid', 'none', False),
                                               ('softmax', 'balanced', True),
                                               ('softmax', 'none', True)])
def test_stretch_loss_matches_full_attention_on_the_last_w_tokens(attn, alibi, rope):
    """T > w, one layer. A one-layer windowed model predicts token t+1 from exactly the tokens
    t-w+1 .. t, and RoPE and ALiBi depend only on distances. So a model with the same weights and
    NO window (full causal attention: another code path, and for softmax without ALiBi PyTorch's
    fused SDPA), fed just those w tokens, must give the same prediction. Scoring every position
    that way, one short forward per position, is the naive O(T * w) evaluation; eval's single
    windowed forward over the whole stretch must agree with it."""
    torch.manual_seed(0)
    w, T = 8, 40
    model = SWAT(tiny_config(n_layer=1, attn=attn, alibi=alibi, rope=rope, window=w)).to(DEVICE).eval()
    full = SWAT(tiny_config(n_layer=1, attn=attn, alibi=alibi, rope=rope, window=1024)).to(DEVICE).eval()
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


@pytest.mark.usefixtures('reference_attention')
@pytest.mark.parametrize('attn, sigmoid_bias', [('sigmoid', False), ('softmax', False),
                                                ('sigmoid', True)])
def test_head_statistics_are_each_heads_attention(attn, sigmoid_bias):
    """eval.py --heads: a head's mean weight at distance d is its formula's, key by key (brute
    force, layer 0), and the norm of its output is that of the model's own attention path (the
    input of c_proj, every layer). With sigmoid_bias the formula holds b = -log(w)."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn, sigmoid_bias=sigmoid_bias)).eval()   # 2 layers, 2 heads,
    bias = -math.log(8) if sigmoid_bias else 0.0                             # w = 8
    x = torch.randint(0, V, (2, 20))
    weight_at, norm = EVAL['head_statistics'](model, x)
    assert weight_at.shape == (2, 2, 8) and norm.shape == (2, 2)
    block, H, D = model.transformer.h[0], 2, 16
    with torch.no_grad():
        q, k, _ = block.attn.c_attn(block.ln_1(model.transformer.wte(x))).split(32, dim=2)
        cos, sin = rope_cos_sin(torch.arange(20), D, 10000.0)
        q, k = (apply_rope(t.view(2, 20, H, D).transpose(1, 2), cos, sin) for t in (q, k))
    slopes = block.attn.slopes
    for h in range(H):
        for d in range(8):
            weights = []
            for b in range(2):
                for m in range(d, 20):
                    keys = range(max(0, m - 7), m + 1)          # the query's window
                    logits = torch.tensor([float(q[b, h, m] @ k[b, h, n]) / 4 + slopes[h] * (m - n)
                                           for n in keys])
                    p = torch.sigmoid(logits + bias) if attn == 'sigmoid' else logits.softmax(0)
                    weights.append(p[list(keys).index(m - d)])
            assert weight_at[0, h, d].item() == pytest.approx(torch.stack(weights).mean().item(),
                                                              rel=1e-4)
    outputs = []
    hooks = [b.attn.c_proj.register_forward_pre_hook(lambda _, args: outputs.append(args[0]))
             for b in model.transformer.h]
    with torch.no_grad():
        model.hidden_states(x)
    for hook in hooks:
        hook.remove()
    for layer, y in enumerate(outputs):
        torch.testing.assert_close(norm[layer], y.view(2, 20, H, D).norm(dim=-1).mean(dim=(0, 1)),
                                   rtol=1e-4, atol=1e-6)


def test_heads_plot(tmp_path):
    path = tmp_path / 'heads.png'
    EVAL['plot_heads'](str(path), ['a', 'b'], [[-0.5, 0.5], [0.0, 0.0]],
                       [torch.rand(2, 2, 8), torch.rand(1, 2, 8)], [torch.rand(2, 2)] * 2)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = EVAL['format_heads']('a', [-0.5, 0.5], torch.full((1, 2, 8), 0.25), torch.ones(1, 2))
    assert '| 0 | 1 | +0.5 | 0.25 | 0.25 | 0.25 | 2 | 1 |' in table


def test_plot(tmp_path):
    path = tmp_path / 'eval.png'
    EVAL['plot_losses'](str(path), ['a', 'b'], [64, 256, 1024], [[5.0, 4.5, None], [5.0, 6.0, 7.0]],
                        [64, 64], 'test')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('case, expected', [('disk full', 'disk full'),
                                            ('folder gone', os.strerror(errno.ENOENT))])
def test_a_result_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, case, expected):
    """A plot or table written after the evaluation (eval.py, recall.py): a disk that refuses
    it gives one line that names the file and says the numbers are above, and no half a file."""
    path = str(tmp_path / 'eval.png')
    if case == 'disk full':
        def write(path):                    # part written, then the disk is full
            with open(path, 'wb') as f:
                f.write(b'x' * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        path = str(tmp_path / 'removed' / 'eval.png')
        def write(path):
            EVAL['plot_losses'](path, ['a'], [64, 256], [[5.0, 4.5]], [64], 'test')
    message = exit_message(EVAL['write_result'], path, write)
    assert expected in message and path in message and 'the table above' in message
    assert os.listdir(tmp_path) == []


def test_a_failure_that_is_not_the_disk_keeps_its_traceback(tmp_path):
    def write(path):
        raise ValueError('a bug')
    with pytest.raises(ValueError, match='a bug'):
        EVAL['write_result'](str(tmp_path / 'eval.png'), write)



# recall.py: the recall benchmark (its generator, scoring, commands, table and plot)

RECALL_TINY = PRESETS['tiny']


RECALL_DEFAULT = PRESETS['default']


@pytest.fixture(scope='module')
def filler_text():
    """Text filler: the held-out plays (tokenized first if need be)."""
    return recall.shakespeare_tokens('val')


@pytest.fixture
def recall_settings(monkeypatch):
    """recall.main sets the module's settings: put them back after the test."""
    for key in recall.config_keys:
        monkeypatch.setattr(recall, key, getattr(recall, key))


def is_key(tokens, p):
    return (tokens >= KEY_BASE) & (tokens < KEY_BASE + p.n_keys)


def is_value(tokens, p):
    return (tokens >= VALUE_BASE) & (tokens < VALUE_BASE + p.n_values)


@pytest.mark.parametrize('window, n_layer', [(64, 4), (8, 2), (128, 6), (4, 3)])
def test_band_distances_cover_the_three_bands(window, n_layer):
    rf = receptive_field(window, n_layer)
    assert rf == SWAT(tiny_config(window=window, n_layer=n_layer)).receptive_field
    max_distance = 2 * rf
    distances = band_distances(window, n_layer, max_distance, per_band=4)
    bands = [band(d, window, n_layer) for d in distances]
    assert bands == sorted(bands, key=['inside the window', 'inside the receptive field',
                                       'beyond the receptive field'].index)
    assert set(bands) == {'inside the window', 'inside the receptive field',
                          'beyond the receptive field'}
    for d in distances:                          # the definitions, straight from the geometry
        assert (band(d, window, n_layer) == 'inside the window') == (d < window)
        assert (band(d, window, n_layer) == 'beyond the receptive field') == \
            (d > (window - 1) * n_layer)
    # the edges of every band are evaluated, so the steps show
    assert {MIN_DISTANCE, window - 1, window, rf - 1, rf, max_distance} <= set(distances)


def test_band_distances_leave_out_what_does_not_fit():
    distances = band_distances(64, 4, 200, per_band=3)
    assert max(distances) == 200 and {63, 64} <= set(distances)
    assert all(band(d, 64, 4) != 'beyond the receptive field' for d in distances)


def test_preset_geometry():
    """The default preset evaluates all three bands, and every distance fits all its pairs."""
    p = RECALL_DEFAULT
    assert receptive_field(p.window, p.n_layer) == 253
    distances = band_distances(p.window, p.n_layer, p.max_distance, p.points_per_band)
    assert len({band(d, p.window, p.n_layer) for d in distances}) == 3
    assert p.max_distance > receptive_field(p.window, p.n_layer)


def facts_of(tokens, answers, p):
    """[(key position at the fact, value position at the fact, answer position)], found from the
    tokens alone: the answer follows the second occurrence of its key."""
    found = []
    for a in np.flatnonzero(answers):
        key = tokens[a - 1]
        occurrences = np.flatnonzero(tokens == key)
        assert is_key(key, p) and len(occurrences) == 2 and occurrences[1] == a - 1
        found.append((occurrences[0], occurrences[0] + 1, a))
    return found


@pytest.mark.parametrize('p', [RECALL_TINY, RECALL_DEFAULT], ids=['tiny', 'default'])
@pytest.mark.parametrize('task', TASKS)
def test_fact_at_the_requested_distance(task, p, filler_text):
    """Property test over random seeds and all evaluated distances: every answer's fact is
    exactly d before its question, the key occurs there and at the question only, and the
    answer is the fact's value."""
    distances = band_distances(p.window, p.n_layer, p.max_distance, p.points_per_band)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        for d in distances + [int(rng.integers(MIN_DISTANCE, p.max_distance + 1))]:
            tokens, answers = make_example(task, rng, p, filler_text, distance=d)
            assert tokens.shape == answers.shape == (p.example_length,)
            assert answers.sum() == (p.n_pairs if task == 'mqar' else 1)
            for key_at, value_at, a in facts_of(tokens, answers, p):
                assert (a - 1) - value_at == d               # the query's key, back to the value
                assert tokens[a] == tokens[value_at] and is_value(tokens[a], p)
                if task != 'mqar':
                    assert tokens[key_at - 1] == FACT and tokens[a - 2] == QUERY
            # no other key, value or marker anywhere: the filler holds none
            task_tokens = is_key(tokens, p) | is_value(tokens, p) | (tokens >= FACT)
            assert task_tokens.sum() == answers.sum() * (6 if task != 'mqar' else 4)


@pytest.mark.parametrize('task', TASKS)
def test_training_examples_spread_over_all_distances(task, filler_text):
    """Without a distance, each fact gets its own, log-uniformly from MIN_DISTANCE to the
    longest that fits: most inside one window, and every band reached, beyond the receptive
    field too."""
    p = RECALL_DEFAULT
    rng = np.random.default_rng(0)
    distances = []
    for _ in range(300):
        tokens, answers = make_example(task, rng, p, filler_text)
        distances += [(a - 1) - value_at for _, value_at, a in facts_of(tokens, answers, p)]
    longest = p.example_length - 1 - (2 if task == 'mqar' else 3)
    assert MIN_DISTANCE <= min(distances) and max(distances) <= longest
    assert len({band(d, p.window, p.n_layer) for d in distances}) == 3
    inside = np.mean(np.array(distances) < p.window)          # log-uniform: log(w/2) / log(...)
    expected = math.log(p.window / MIN_DISTANCE) / math.log((longest + 1) / MIN_DISTANCE)
    assert abs(inside - expected) <= 4 * math.sqrt(expected * (1 - expected) / len(distances))


def test_training_mix_holds_every_task(filler_text):
    tokens, answers = make_examples(None, np.random.default_rng(0), 60, RECALL_TINY, filler_text)
    assert tokens.shape == answers.shape == (60, RECALL_TINY.example_length)
    has_marker = (tokens == FACT).any(axis=1)
    assert 0 < has_marker.sum() < 60                  # passkeys and mqar both
    assert (answers.sum(axis=1) >= 1).all()


def test_no_room_is_an_error(filler_text):
    with pytest.raises(ValueError, match='no room for 16 facts at distance 500'):
        make_example('mqar', np.random.default_rng(0), RECALL_DEFAULT, filler_text, distance=500)
    with pytest.raises(ValueError, match='would overlap its fact'):
        make_example('passkey_random', np.random.default_rng(0), RECALL_DEFAULT, filler_text, distance=1)


def oracle(x, where):
    """Solves the task from the input: at each question, the token after the key's first
    occurrence."""
    predicted = []
    for b, i in where.nonzero().tolist():
        first = (x[b, :i] == x[b, i]).nonzero()[0, 0]
        predicted.append(x[b, first + 1])
    return torch.stack(predicted)


def uniform_guess(n_values, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def predict(x, where):
        return VALUE_BASE + torch.randint(n_values, (int(where.sum()),), generator=generator)
    return predict


@pytest.mark.parametrize('task', TASKS)
def test_scored_positions_are_exactly_the_answers(task, filler_text):
    tokens, answers = make_examples(task, np.random.default_rng(1), 8, RECALL_TINY, filler_text, distance=9)
    asked = []

    def spy(x, where):
        asked.append(where.clone())
        assert torch.equal(x, torch.from_numpy(tokens[:, :-1]))
        return oracle(x, where)
    correct, total = score(spy, tokens, answers)
    assert torch.equal(asked[0], torch.from_numpy(answers[:, 1:]))  # output t-1 predicts token t
    assert total == answers.sum() and answers[:, 0].sum() == 0
    assert is_key(tokens[:, :-1][answers[:, 1:]], RECALL_TINY).all()       # asked at the query's key


@pytest.mark.parametrize('task', TASKS)
def test_oracle_scores_100_percent(task, filler_text):
    for d in (2, 9, 30):
        tokens, answers = make_examples(task, np.random.default_rng(d), 16, RECALL_TINY, filler_text, d)
        correct, total = score(oracle, tokens, answers)
        assert correct == total > 0


@pytest.mark.parametrize('task', TASKS)
def test_uniform_guess_scores_chance(task, filler_text):
    """Within 4 binomial standard deviations of 1 / n_values."""
    p = dataclasses.replace(RECALL_TINY, n_values=8)
    tokens, answers = make_examples(task, np.random.default_rng(2), 1500, p, filler_text, distance=9)
    correct, total = score(uniform_guess(p.n_values), tokens, answers)
    chance = 1 / p.n_values
    assert abs(correct / total - chance) <= 4 * math.sqrt(chance * (1 - chance) / total)


@pytest.mark.parametrize('attn, sinks', [('sigmoid', 0), ('softmax', 0), ('softmax', 2)])
def test_answer_logits_are_the_models_logits_at_the_questions(attn, sinks):
    """answer_logits at a position i is what the model itself predicts after reading x[:i+1]
    (its forward gives the last position's logits), with and without sinks."""
    torch.manual_seed(0)
    model = SWAT(tiny_config(attn=attn, window=8)).eval()
    x = torch.randint(0, 101, (2, 24))
    where = torch.zeros(2, 24, dtype=torch.bool)
    where[0, [3, 17]] = where[1, [0, 23]] = True
    logits = answer_logits(model, x, where, sinks)
    with torch.no_grad():
        expected = [model(x[b:b + 1, :i + 1], sink_tokens=sinks)[0][0, -1]
                    for b, i in where.nonzero().tolist()]
    assert torch.allclose(logits, torch.stack(expected), atol=1e-5)


def test_model_predictor_picks_among_the_values():
    torch.manual_seed(0)
    model = SWAT(SWATConfig(n_layer=1, n_head=2, n_embd=32, window=8, block_size=32)).eval()
    tokens, answers = make_examples('mqar', np.random.default_rng(0), 4, RECALL_TINY, distance=5)
    predicted = model_predictor(model, RECALL_TINY.n_values)(torch.from_numpy(tokens[:, :-1]),
                                                      torch.from_numpy(answers[:, 1:]))
    assert ((predicted >= VALUE_BASE) & (predicted < VALUE_BASE + RECALL_TINY.n_values)).all()


def test_prepare_writes_the_answers_and_only_them(tmp_path):
    p = dataclasses.replace(RECALL_TINY, train_examples=40, val_examples=12)
    counts = RECALL_PREPARE(p, str(tmp_path))
    for split, n in (('train', 40), ('val', 12)):
        tokens = np.fromfile(tmp_path / f'{split}.bin', dtype=np.uint16).astype(np.int64)
        mask = np.fromfile(tmp_path / f'{split}_mask.bin', dtype=np.uint8)
        assert len(tokens) == len(mask) == n * p.example_length
        assert set(np.unique(mask)) <= {0, 1} and counts[split] == (n, int(mask.sum()))
        for example, scored in zip(tokens.reshape(n, -1), mask.reshape(n, -1).astype(bool)):
            # the answers, found from the tokens alone: a key seen before, and the token after
            # it, the same as after its first occurrence
            keys = np.flatnonzero(is_key(example, p))
            seen_before = [i for i in keys if (example[:i] == example[i]).any()]
            assert np.array_equal(np.flatnonzero(scored), np.array(seen_before, dtype=int) + 1)
            assert scored.any()                     # every sequence train.py reads scores some
    with open(tmp_path / 'meta.json') as f:
        assert json.load(f) == {k: getattr(p, k) for k in recall.DATA_FIELDS}


@pytest.mark.parametrize('preset', ['tiny', 'default'])
def test_induction_answers_follow_the_earlier_occurrence_in_view(preset):
    p = PRESETS[preset]
    rng = np.random.default_rng(7)
    for _ in range(5):
        tokens, answers = recall.induction_example(rng, p)
        assert answers.sum() >= len(tokens) // 4            # dense: most of every repeat scores
        for a in np.flatnonzero(answers):
            # found from the tokens alone: the token before the answer occurred exactly once
            # before, in view, and the answer is the token that followed it there
            query = a - 1
            earlier = np.flatnonzero(tokens[:query] == tokens[query])
            assert len(earlier) == 1 and query - p.window < earlier[0] < query - 1
            assert tokens[earlier[0] + 1] == tokens[a] and is_task_id(tokens[a:a + 1], p)


def test_induction_share_is_the_share_of_the_training_mix(filler_text):
    def mix(p, seed, n):
        return make_examples(None, np.random.default_rng(seed), n, p, filler_text)
    p = dataclasses.replace(RECALL_TINY, induction_share=0.5)
    _, answers = mix(p, 3, 400)
    dense = (answers.sum(axis=1) > p.n_pairs).mean()   # a passkey scores 1 answer, mqar n_pairs
    assert 0.4 < dense < 0.6
    rng = np.random.default_rng(3)                     # share 0: the mix of before, draw for draw
    before = [make_example(TASKS[rng.integers(len(TASKS))], rng, RECALL_TINY, filler_text)
              for _ in range(20)]
    tokens, answers = mix(RECALL_TINY, 3, 20)
    assert all(np.array_equal(t, bt) and np.array_equal(m, bm)
               for t, m, (bt, bm) in zip(tokens, answers, before))
    for share in (1.0, -0.1):
        message = exit_message(recall.check_task, dataclasses.replace(p, induction_share=share))
        assert message.startswith(f"induction_share={share}: expected 0 <= share < 1")


def test_train_settings_make_every_row(recall_settings):
    p = RECALL_DEFAULT
    for name, kind in TRAININGS.items():
        s = recall.train_settings(p, name, 2)
        assert s['window'] == (p.block_size if name == 'vanilla' else p.window)
        assert (s['attn'], s['alibi']) == (kind['attn'], kind['alibi'])
        assert s.get('sigmoid_bias', False) == (name == 'swat-bias')
        assert s['example_length'] == p.block_size + 1 and s['dataset'] == 'recall'
        assert s['out_dir'] == os.path.join(recall.out_root, f'{name}-s2')
        SWATConfig(**{k: v for k, v in s.items() if k in SWATConfig.__dataclass_fields__})
    assert {name for _, name, _ in recall.READINGS} == set(TRAININGS)
    assert ('softmax SWA + 4 sinks', 'swa', 4) in recall.READINGS
    alibis = {kind['alibi'] for kind in TRAININGS.values() if kind['attn'] == 'sigmoid'}
    assert alibis == {'balanced', 'negative', 'positive', 'none', 'balanced_paper_code'}


def test_commands(recall_settings, capsys):
    recall.main(['--action=commands', '--preset=default'])
    lines = [line for line in capsys.readouterr().out.splitlines()
             if not line.startswith('override:')]
    assert lines[0] == 'python data/recall/prepare.py --preset=default'
    assert len(lines) == 2 + len(TRAININGS) * len(RECALL_DEFAULT.seeds)
    assert all(line.startswith('python train.py --out_dir=out-recall/') for line in lines[1:-1])
    assert '--alibi=balanced_paper_code' in lines[-2] and '--example_length=513' in lines[-2]
    assert lines[-1].startswith('python recall.py --preset=default --action=eval')


def test_commands_of_some_seeds(recall_settings, capsys):
    recall.main(['--action=commands', '--preset=default', '--seeds=3,1'])
    out = capsys.readouterr().out
    seeds = re.findall(r'--seed=(\d+)', out)
    assert sorted(set(seeds)) == ['1', '3'] and len(seeds) == 2 * len(TRAININGS)


def test_a_preset_with_changes():
    p = recall.changed_preset('default', "n_pairs=4, learning_rate=3e-3, score_steps=(100, 200)")
    assert (p.n_pairs, p.learning_rate, p.score_steps, p.max_iters) == (4, 3e-3, (100, 200), 200)
    assert dataclasses.replace(p, n_pairs=16, learning_rate=1e-3,
                               score_steps=RECALL_DEFAULT.score_steps) == RECALL_DEFAULT
    assert recall.changed_preset('tiny', 'learning_rate=1').learning_rate == 1.0   # an int: float
    assert recall.changed_preset('tiny', '') == RECALL_TINY


@pytest.mark.parametrize('changes, expected', [
    ('n_pair=4', 'n_pair is not a field of a preset; expected some of n_layer, '),
    ('n_pairs=4.5', 'n_pairs=4.5, expected a value of type int'),
    ('score_steps=100', 'score_steps=100, expected a value of type tuple'),
    ('4', 'expected fields of a preset and their values'),
    ('n_pairs=len("ab")', 'expected fields of a preset and their values'),
    ('n_pairs=4) + (1', 'expected fields of a preset and their values'),
])
def test_changes_that_do_not_fit_a_preset_are_one_line(changes, expected):
    message = exit_message(recall.changed_preset, 'default', changes)
    assert message.startswith(f"changes={changes!r}: ") and expected in message


def test_commands_of_some_trainings_on_a_variant(recall_settings, capsys):
    recall.main(['--action=commands', '--trainings=swa,vanilla', "--changes=n_pairs=4",
                 '--seeds=1'])
    lines = [line for line in capsys.readouterr().out.splitlines()
             if not line.startswith('override:')]
    assert lines[0] == "python data/recall/prepare.py --preset=default --changes=n_pairs=4"
    assert [re.search(r'--out_dir=\S+', line)[0] for line in lines[1:-1]] == [
        '--out_dir=out-recall/vanilla-s1', '--out_dir=out-recall/swa-s1']
    assert lines[-1].endswith('--trainings=swa,vanilla --changes=n_pairs=4')
    message = exit_message(recall.main, ['--action=commands', '--trainings=swat,full'])
    assert message == ("trainings='swat,full': expected some of " + ', '.join(TRAININGS) +
                       ", comma-separated, or '' for all")


@slow
def test_recall_prepare_writes_a_variant(tmp_path):
    script = os.path.join(ROOT, 'data', 'recall', 'prepare.py')
    proc = run(script, '--preset=tiny', '--changes=n_pairs=2, train_examples=50',
               f'--out_dir={tmp_path}')
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert (meta['n_pairs'], meta['train_examples']) == (2, 50), proc.stdout


@pytest.mark.parametrize('seeds', ['4', '1,x', ','])
def test_seeds_not_in_the_preset_are_one_line(recall_settings, seeds):
    message = exit_message(recall.main, ['--action=commands', '--preset=default',
                                         f'--seeds={seeds}'])
    assert message == (f"seeds={seeds!r}: expected some of preset default's seeds 1,2,3, "
                       f"comma-separated, or '' for all")


def fake_accuracy(n_seeds, distances, window):
    rng = np.random.default_rng(0)
    return {label: {task: np.clip(np.where(np.array(distances) < window, 0.95, 0.05)
                                  + rng.normal(0, 0.02, (n_seeds, len(distances))), 0, 1)
                    for task in TASKS}
            for label, _, _ in recall.READINGS}


def test_table_and_plot(tmp_path):
    window, n_layer = 64, 4
    distances = band_distances(window, n_layer, 446, 4)
    accuracy = fake_accuracy(3, distances, window)
    table = recall.format_tables(accuracy, distances, window, n_layer, 1 / 256)
    for label, _, _ in recall.READINGS:
        assert table.count(f'| {label} |') == len(TASKS)
    assert '| model | ' + ' | '.join(map(str, distances)) + ' |' in table
    assert 'receptive field 253' in table and ' ± ' in table
    path = tmp_path / 'recall.png'
    fig = recall.plot_accuracy(str(path), accuracy, distances, window, n_layer, 1 / 256)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for ax in fig.axes:
        vertical = [line.get_xdata()[0] for line in ax.lines
                    if line.get_xdata()[0] == line.get_xdata()[1]]
        assert vertical == [window, 253]
    # seeds far apart (0% and 100%): the band of +- one std stays inside [0, 100]
    apart = {'a': dict.fromkeys(TASKS, np.array([[0.0] * len(distances), [1.0] * len(distances)]))}
    fig = recall.plot_accuracy(str(path), apart, distances, window, n_layer, 1 / 256)
    band = np.concatenate([p.vertices for c in fig.axes[0].collections for p in c.get_paths()])
    assert band[:, 1].min() == 0 and band[:, 1].max() == 100


def test_mean_std():
    assert recall.mean_std([0.5]) == (0.5, 0.0)
    mean, std = recall.mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)


def test_a_row_short_of_seeds_says_how_many(recall_settings, monkeypatch, tmp_path):
    """A reading with fewer finished seeds than its preset's is tabled with what it has, and its
    label says how many; the cells of a single seed are its accuracies, with no spread."""
    p, distances = dataclasses.replace(RECALL_TINY, seeds=(1, 2, 3)), [2, 4]
    finished = {('swa', 1): 0.5, ('swa', 2): 0.6, ('swa', 3): 0.7, ('swat', 2): 0.9}

    def saved_scores(p, name, seed, distances):
        if (name, seed) not in finished:
            return {}
        labels = [label for label, reading, _ in recall.READINGS if reading == name]
        return {p.max_iters: {label: {task: [finished[name, seed]] * len(distances)
                                      for task in TASKS} for label in labels}}
    monkeypatch.setattr(recall, 'saved_scores', saved_scores)
    monkeypatch.setattr(recall, 'trainings', 'swa,swat')
    monkeypatch.setattr(recall, 'device', 'cpu')
    monkeypatch.setattr(recall, 'out_root', str(tmp_path))     # no checkpoint of the user's
    accuracy, curves = recall.evaluate(p, distances)
    swat = 'SWAT: sigmoid, balanced ALiBi (1 of 3 seeds)'
    assert set(accuracy) == {'softmax SWA', 'softmax SWA + 4 sinks', swat}
    table = recall.format_tables(accuracy, distances, p.window, p.n_layer, 1 / p.n_values)
    assert table.count(f'| {swat} | 90.0 | 90.0 |') == len(TASKS)
    assert table.count('| softmax SWA | 60.0 ± 10.0 | 60.0 ± 10.0 |') == len(TASKS)
    assert recall.percent([0.25]) == '25.0' and recall.percent([np.nan]) == '-'


def save_checkpoints(out_root, p, names):
    """Untrained models of the trainings `names`, as if train.py had finished them."""
    for name in names:
        for seed in p.seeds:
            s = recall.train_settings(p, name, seed)
            config = SWATConfig(**{k: v for k, v in s.items()
                                   if k in SWATConfig.__dataclass_fields__})
            torch.manual_seed(seed)
            out_dir = os.path.join(out_root, f'{name}-s{seed}')
            os.makedirs(out_dir)
            torch.save({'model_args': dataclasses.asdict(config),
                        'model': SWAT(config).state_dict(), 'iter_num': p.max_iters},
                       os.path.join(out_dir, 'ckpt.pt'))


def test_fact_weights_where_attention_is_alibi_alone():
    """A softmax model whose queries and keys are all zero attends by its ALiBi term alone: a
    query at position m gives the key d back exp(s_h d) / sum_{j=0}^{m} exp(s_h j), so the
    weight on the fact is the mean of that over the answers' question positions m, per head."""
    p = RECALL_TINY
    model = SWAT(SWATConfig(n_layer=2, n_head=2, n_embd=32, window=p.block_size,
                            block_size=p.block_size, attn='softmax', alibi='negative')).eval()
    for block in model.transformer.h:
        block.attn.c_attn.weight.data[:2 * 32] = 0.0                    # q and k: zero
    d = 9
    tokens, answers = recall.make_examples('mqar', np.random.default_rng(0), 5, p, distance=d)
    m = np.nonzero(answers[:, 1:])[1]
    slopes = alibi_slopes(2, 'negative').double().numpy()
    expected = [np.mean([np.exp(s * d) / np.exp(s * np.arange(q + 1)).sum() for q in m])
                for s in slopes]
    weights = recall.fact_weights(model, tokens, answers, d, batch_size=2)
    assert torch.allclose(weights, torch.tensor([expected] * 2, dtype=weights.dtype), rtol=1e-5)


def fake_predictors(p):
    """predict(x, where) functions for recall's scoring: the right value at every answer (the
    token after the question key's first occurrence, its fact); the first value in the answer's
    example (in view of every answer, the right one only by chance); an id no example holds."""
    def right(x, where):
        found = []
        for row, column in where.nonzero().tolist():
            fact = (x[row, :column] == x[row, column]).nonzero()[0, 0]
            found.append(x[row, fact + 1])
        return torch.stack(found)
    def first_value(x, where):
        is_value = (x >= VALUE_BASE) & (x < VALUE_BASE + p.n_values)
        first = x.gather(1, is_value.int().argmax(dim=1, keepdim=True)).expand_as(x)
        return first[where]
    def absent(x, where):
        return torch.full((int(where.sum()),), VALUE_BASE + p.n_values)
    return right, first_value, absent


def test_answers_in_view_tells_a_confused_answer_from_a_guess():
    p = RECALL_TINY
    tokens, answers = recall.make_examples('mqar', np.random.default_rng(0), 20, p, distance=9)
    n = int(answers[:, 1:].sum())
    right, first_value, absent = fake_predictors(p)
    got, in_view = recall.answers_in_view(right, tokens, answers)
    assert got.shape == in_view.shape == (n,) and got.all() and in_view.all()
    got, in_view = recall.answers_in_view(first_value, tokens, answers)
    assert in_view.all() and 0 < got.sum() < n
    got, in_view = recall.answers_in_view(absent, tokens, answers)
    assert not got.any() and not in_view.any()


def test_fewer_pairs_table_has_a_row_per_pair_count():
    p = dataclasses.replace(RECALL_TINY, n_pairs=4, eval_examples=8)
    right, first_value, _ = fake_predictors(p)
    distances = [2, 9, 20]
    table = recall.fewer_pairs_table('a', right, p, distances, contextlib.nullcontext())
    rows = [line for line in table.splitlines() if re.match(r'\| \d+ \|', line)]
    assert [row.split('|')[1].strip() for row in rows] == ['1', '2', '4']
    assert all(row == f"| {n} | 100.0 | 100.0 | 100.0 | - |" for row, n in zip(rows, (1, 2, 4)))
    table = recall.fewer_pairs_table('a', first_value, p, distances, contextlib.nullcontext())
    rows = [line for line in table.splitlines() if re.match(r'\| \d+ \|', line)]
    assert rows[0] == '| 1 | 100.0 | 100.0 | 100.0 | - |'     # one pair: its value is the first
    assert all(row.endswith('| 100% |') for row in rows[1:])


@pytest.mark.usefixtures('recall_settings')
def test_recall_pairs_prints_a_table_per_finished_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    monkeypatch.setitem(recall.PRESETS, 'tiny', dataclasses.replace(RECALL_TINY, eval_examples=2))
    save_checkpoints(str(tmp_path), RECALL_TINY, ['vanilla', 'swat'])
    recall.main(['--preset=tiny', '--action=pairs', '--trainings=vanilla,swat-negative,swat',
                 f'--out_root={tmp_path}', '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out                   # (swat-negative has no checkpoint: no table)
    assert out.count('MQAR accuracy (%) with fewer pairs') == 2
    assert 'full attention (vanilla), seed 1:' in out
    assert 'SWAT: sigmoid, balanced ALiBi, seed 1:' in out
    rows = [line for line in out.splitlines() if re.match(r'\| \d+ \|', line)]
    assert [row.split('|')[1].strip() for row in rows] == ['1', '2', '4'] * 2


@pytest.mark.usefixtures('recall_settings')
def test_recall_heads_prints_a_table_per_training_and_task(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    monkeypatch.setitem(recall.PRESETS, 'tiny', dataclasses.replace(RECALL_TINY, eval_examples=2))
    save_checkpoints(str(tmp_path), RECALL_TINY, ['vanilla', 'swat'])
    recall.main(['--preset=tiny', '--action=heads', '--trainings=swat', f'--out_root={tmp_path}',
                 '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    distances = recall.band_distances(RECALL_TINY.window, RECALL_TINY.n_layer,
                                      RECALL_TINY.max_distance, RECALL_TINY.points_per_band)
    assert out.count('the largest weight a head of each layer gives the fact') == len(TASKS)
    assert 'full attention' not in out and 'SWAT: sigmoid, balanced ALiBi, seed 1, mqar' not in out
    assert 'SWAT: sigmoid, balanced ALiBi, seed 1, multi-query associative recall' in out
    header = '| layer | ' + ' | '.join(map(str, distances)) + ' |'
    assert out.count(header) == len(TASKS)
    rows = [line for line in out.splitlines() if re.match(r'\| \d \|', line)]
    assert len(rows) == len(TASKS) * RECALL_TINY.n_layer
    beyond = [i for i, d in enumerate(distances) if d >= RECALL_TINY.window]
    for row in rows:                            # beyond the window a windowed model sees nothing
        cells = row.strip('|').split('|')[1:]
        assert all(cells[i].strip().startswith('0.00') for i in beyond)


@slow                                           # end to end: every model of the preset, table, plot
def test_eval_of_untrained_checkpoints(recall_settings, tmp_path, capsys, monkeypatch):
    """The whole evaluation, table and plot, on untrained models of the tiny preset (fewer
    examples), read as a user's CPU reads them: through the einsum reference, not Triton's
    interpreter."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    monkeypatch.setitem(recall.PRESETS, 'tiny', dataclasses.replace(RECALL_TINY, eval_examples=4))
    save_checkpoints(str(tmp_path), RECALL_TINY, [name for name in TRAININGS if name != 'swat-positive'])
    plot = tmp_path / 'recall.png'
    recall.main(['--preset=tiny', '--action=eval', f'--out_root={tmp_path}', f'--plot={plot}',
                 '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = (tmp_path / 'recall.md').read_text()
    # a table per task against distance, and one against the training's steps
    assert table in out and table.count('| softmax SWA + 4 sinks |') == 2 * len(TASKS)
    # what is not trained is said, and left out
    assert 'sigmoid, positive ALiBi: 0 of 1 trainings of swat-positive finished' in out
    assert '| sigmoid, positive ALiBi |' not in table


@slow
def test_recall_keeps_each_trainings_scores_and_tables_them_alone(recall_settings, tmp_path,
                                                                   capsys, monkeypatch):
    """A finished training's scores go to a scores.json beside its checkpoint (kilobytes), and
    --action=eval makes the same table from those files alone: the checkpoints gone, as on a
    machine that got only the JSON files of trainings run elsewhere. The scores of another
    evaluation (more examples) are not used."""
    monkeypatch.setattr(kernel, 'INTERPRET', False)
    monkeypatch.setitem(recall.PRESETS, 'tiny', dataclasses.replace(RECALL_TINY, eval_examples=4))
    save_checkpoints(str(tmp_path), RECALL_TINY, ['vanilla', 'swa'])
    args = ['--preset=tiny', '--action=eval', f'--out_root={tmp_path}', '--plot=',
            '--device=cpu', '--dtype=float32']
    recall.main(args)
    first = capsys.readouterr().out
    for name in ('vanilla', 'swa'):
        path = tmp_path / f'{name}-s1' / recall.SCORES
        saved = json.loads(path.read_text())
        assert list(saved['scores']) == [str(RECALL_TINY.max_iters)]
        assert set(saved['scores'][str(RECALL_TINY.max_iters)]) == {
            label for label, reading, _ in recall.READINGS if reading == name}
        assert path.stat().st_size < 10_000
        os.remove(tmp_path / f'{name}-s1' / 'ckpt.pt')
    recall.main(args)
    second = capsys.readouterr().out
    assert ', seed 1, step 200:' in first and ', seed 1' not in second    # none scored again
    assert second[second.index('Accuracy in %'):] == first[first.index('Accuracy in %'):]
    monkeypatch.setitem(recall.PRESETS, 'tiny', dataclasses.replace(RECALL_TINY, eval_examples=5))
    assert 'no finished training' in exit_message(recall.main, args)


def test_the_kept_recall_scores_fit_the_default_preset(recall_settings, tmp_path, capsys):
    """recall_scores/ keeps the scores.json of trainings of the default preset, run on GPUs, and
    --action=eval makes their tables from those files alone. So they must fit the preset as it
    is: a change to its task, trainings or evaluation that they do not fit fails here, and asks
    for the trainings to run again."""
    kept = sorted(os.listdir(os.path.join(ROOT, 'recall_scores')))
    assert kept, "recall_scores/ holds no training's scores"
    shutil.copytree(os.path.join(ROOT, 'recall_scores'), tmp_path / 'scores')
    recall.main(['--action=eval', f'--out_root={tmp_path / "scores"}', '--plot=',
                 '--device=cpu', '--dtype=float32'])
    out = capsys.readouterr().out
    for folder in kept:                         # <training>-s<seed>: its rows are in the tables
        name = folder.rsplit('-s', 1)[0]
        for label, reading, _ in recall.READINGS:
            if reading == name:
                assert re.search(rf'\| {re.escape(label)}( \(.*?\))* \|', out), (label, out)


def note_stages(monkeypatch):
    """recall.py with a train.py that only writes the checkpoint it would (at --max_iters, at
    once) and a scorer that only notes what it scores. Returns the lists they fill: each
    train.py's settings, and (training, step) for each scoring."""
    started, scored = [], []

    def run_command(cmd, **kwargs):
        settings = dict(arg[2:].split('=', 1) for arg in cmd[2:])
        started.append(settings)
        torch.save({'iter_num': int(settings['max_iters']), 'model': {}, 'model_args': {}},
                   os.path.join(settings['out_dir'], 'ckpt.pt'))
        return subprocess.Popen([sys.executable, '-c', 'pass'])

    class NotedScorer:
        def __init__(self, p, distances):
            pass

        def __call__(self, name, seed):
            scored.append((name, recall.trained_steps(recall.checkpoint_dir(name, seed))))
    monkeypatch.setattr(recall, 'run_command', run_command)
    monkeypatch.setattr(recall, 'Scorer', NotedScorer)
    monkeypatch.setattr(recall, 'data_is_prepared', lambda p: True)
    monkeypatch.setattr(recall, 'time', QuickClock)
    return started, scored


def test_recall_scores_each_training_at_each_scoring_step(recall_settings, tmp_path,
                                                          monkeypatch):
    """--action=train runs each training to each of the preset's score_steps in turn, on one
    learning-rate schedule (resuming its checkpoint), and scores it at each: here train.py
    only writes the checkpoint it would, and the scoring is noted down."""
    started, scored = note_stages(monkeypatch)
    recall.main(['--preset=tiny', '--action=train', '--jobs=3', f'--out_root={tmp_path}',
                 '--device=cpu'])
    steps = RECALL_TINY.score_steps
    for name in TRAININGS:
        runs = [s for s in started if s['out_dir'] == recall.checkpoint_dir(name, 1)]
        assert [int(s['max_iters']) for s in runs] == list(steps)
        assert {s['lr_decay_iters'] for s in runs} == {str(steps[-1])}
        assert [s.get('init_from') for s in runs] == [None] + ['resume'] * (len(steps) - 1)
        assert [step for scored_name, step in scored if scored_name == name] == list(steps)


def test_recall_scores_a_training_stopped_before_its_scoring(recall_settings, tmp_path,
                                                             monkeypatch):
    """A training stopped between the end of a stage and its scoring there (its checkpoint at a
    scoring step that its scores.json lacks) is scored when --action=train runs again, before
    it goes on; at the last step it is not trained again, only scored."""
    started, scored = note_stages(monkeypatch)
    steps = RECALL_TINY.score_steps
    for name, step in (('vanilla', steps[0]), ('swa', steps[-1])):
        os.makedirs(tmp_path / f'{name}-s1')
        torch.save({'iter_num': step, 'model': {}, 'model_args': {}},
                   tmp_path / f'{name}-s1' / 'ckpt.pt')
    recall.main(['--preset=tiny', '--action=train', '--trainings=vanilla,swa', '--jobs=2',
                 f'--out_root={tmp_path}', '--device=cpu'])
    assert [int(s['max_iters']) for s in started
            if s['out_dir'] == recall.checkpoint_dir('vanilla', 1)] == list(steps[1:])
    assert not [s for s in started if s['out_dir'] == recall.checkpoint_dir('swa', 1)]
    assert [step for name, step in scored if name == 'vanilla'] == list(steps)
    assert [step for name, step in scored if name == 'swa'] == [steps[-1]]


def test_a_curve_still_rising_is_marked():
    """The learning curves' table, and the mark on a reading still rising at its last scoring
    step: up more than 1 point and more than the seeds' spread."""
    distances, steps = [2, 4], (50, 100, 200)
    flat, rising = np.array([[0.5, 0.9, 0.905]] * 3), np.array([[0.5, 0.7, 0.8]] * 3)
    curves = {'a': dict.fromkeys(TASKS, flat), 'b': dict.fromkeys(TASKS, rising)}
    accuracy = {label: dict.fromkeys(TASKS, np.full((3, 2), 0.5)) for label in curves}
    table = recall.format_curves(curves, steps)
    assert table.count('| a | 50.0 ± 0.0 | 90.0 ± 0.0 | 90.5 ± 0.0 |  |') == len(TASKS)
    assert table.count('| b | 50.0 ± 0.0 | 70.0 ± 0.0 | 80.0 ± 0.0 | still rising |') == len(TASKS)
    marked = recall.format_tables(accuracy, distances, 8, 2, 1 / 32, curves)
    assert marked.count('| b (still rising) |') == len(TASKS) and '| a |' in marked
    noisy = rising + np.array([[0.2], [-0.2], [0.0]])     # a spread over seeds beyond the gain
    assert not recall.still_rising(noisy) and recall.still_rising(rising)


class QuickClock:
    """recall.py's time, with sleeps of 10 ms: its loop sees the trainings end sooner."""
    time = staticmethod(time.time)

    @staticmethod
    def sleep(seconds):
        time.sleep(0.01)


class TimeoutClock(QuickClock):
    """... and at the first sleep, a SIGTERM comes: what `timeout` sends."""
    @staticmethod
    def sleep(seconds):
        # (with no handler of recall.py's, the signal would end the test run itself)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), \
            'SIGTERM kills recall.py at once, and its trainings run on'
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)


def run_fake_trainings(monkeypatch, tmp_path, program, clock):
    """recall.py --action=train on the tiny preset, 2 at a time, where each train.py is
    `python -c program` instead. Returns the SystemExit message and (process, its exit code
    when recall.py returned: None if still running) for each process started."""
    started = []

    def run_command(cmd, **kwargs):
        started.append(subprocess.Popen([sys.executable, '-c', program], **kwargs))
        return started[-1]
    monkeypatch.setattr(recall, 'run_command', run_command)
    monkeypatch.setattr(recall, 'data_is_prepared', lambda p: True)
    monkeypatch.setattr(recall, 'time', clock)
    try:
        message = exit_message(recall.main, ['--preset=tiny', '--action=train', '--jobs=2',
                                             f'--out_root={tmp_path}', '--device=cpu'])
        return message, [(process, process.poll()) for process in started]
    finally:
        for process in started:             # (none is left running, whatever happened)
            process.kill()
            process.wait()


@pytest.mark.usefixtures('recall_settings', 'script_state')
def test_recall_names_the_error_of_a_failed_training(tmp_path, monkeypatch):
    message, started = run_fake_trainings(
        monkeypatch, tmp_path, 'import sys; sys.exit("--n_head=3: the fix")', QuickClock)
    assert 'failed (exit 1): --n_head=3: the fix' in message and 'train.log' in message
    assert all(code is not None for _, code in started)     # the other one was stopped


@pytest.mark.usefixtures('recall_settings', 'script_state')
def test_stopping_recall_stops_its_trainings(tmp_path, monkeypatch):
    """A SIGTERM to recall.py is passed on to the trainings (which save a checkpoint and exit)
    and waited for: none runs on after recall.py."""
    before = signal.getsignal(signal.SIGTERM)
    message, started = run_fake_trainings(
        monkeypatch, tmp_path, 'import time; time.sleep(60)', TimeoutClock)
    assert 'stopped: run the same command to continue' in message
    assert [code for _, code in started] == [-signal.SIGTERM] * 2
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.usefixtures('recall_settings', 'script_state')
def test_recall_checks_the_device_before_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(recall, 'run_trainings', None)         # never reached
    message = exit_message(recall.main, ['--preset=tiny', '--action=all', '--device=cuda:99'])
    assert "device='cuda:99'" in message
    (tmp_path / 'a_file').write_text('')                       # and where the checkpoints go
    message = exit_message(recall.main, ['--preset=tiny', '--action=train', '--device=cpu',
                                         f'--out_root={tmp_path / "a_file"}'])
    assert 'is a file, not a folder: pass another --out_root' in message


def test_eval_says_what_is_not_trained(recall_settings, tmp_path, capsys):
    with pytest.raises(SystemExit, match='no finished training'):
        recall.main(['--preset=tiny', '--action=eval', f'--out_root={tmp_path}', '--plot=',
                     '--device=cpu', '--dtype=float32'])



# =============================================================================
# The data: the tokenizer and the prepare scripts

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
        message = exit_message(gpt2_tokenizer)      # one line, for the scripts that use it
        assert str(path) in message and "git checkout data/r50k_base.tiktoken" in message
    finally:
        gpt2_tokenizer.cache_clear()  # the next test reloads the real file


def test_prepare_shakespeare(tmp_path):
    prepare = runpy.run_path(os.path.join(DATA, 'prepare.py'))["prepare"]  # not as __main__: nothing runs on load
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


def sample_rows(folder):
    with open(os.path.join(ROOT, 'data', folder, 'sample.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def read_bins(out_dir):
    return [np.fromfile(os.path.join(out_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')]


@slow
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
    run(os.path.join('data', 'pg19', 'prepare.py'), f'--sample={sample}', '--max_docs=1',
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


PREPARE = {name: runpy.run_path(os.path.join(ROOT, 'data', name, 'prepare.py'))['prepare']
           for name in ('openwebtext', 'pg19')}       # not as __main__: nothing runs on load


GOOD_BINS = {'train.bin': b'good train bin', 'val.bin': b'good val bin'}


@pytest.fixture
def out_dir(tmp_path):
    """A folder that holds good bins already, which a failed prepare must leave as they are."""
    out = tmp_path / 'out'
    out.mkdir()
    for name, content in GOOD_BINS.items():
        (out / name).write_bytes(content)
    return out


def assert_bins_untouched(out_dir):
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == GOOD_BINS   # and no .tmp


def write_sample(tmp_path, rows):
    """A JSON-lines file of rows (dicts become JSON; strings are written as they are)."""
    path = tmp_path / 'sample.jsonl'
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows),
                    encoding='utf-8')
    return str(path)


@pytest.mark.parametrize('script, rows, message', [
    ('openwebtext', [], 'no documents for train.bin or val.bin (of the 0 read)'),
    ('openwebtext', [{'text': 'one document'}], 'no documents for train.bin (of the 1 read)'),
    ('pg19', [{'text': 'a book', 'split': 'train'}], 'no documents for val.bin (of the 1 read)'),
    ('pg19', [{'text': 'a book', 'split': 'validation'}], 'no documents for train.bin'),
])
def test_prepare_never_writes_an_empty_split(tmp_path, out_dir, script, rows, message):
    got = exit_message(PREPARE[script], str(out_dir), write_sample(tmp_path, rows))
    assert message in got and 'nothing was written' in got
    assert_bins_untouched(out_dir)


@pytest.mark.parametrize('script, rows, message', [
    ('openwebtext', [{'text': 'a'}, '{"text": "no end', {'text': 'b'}],
     'sample.jsonl, line 2: not JSON'),
    ('openwebtext', [{'text': 'a'}, {'body': 'b'}], 'sample.jsonl, line 2: expected a JSON object '
                                                    'with a string "text"'),
    ('openwebtext', ['["text", "a"]'], 'sample.jsonl, line 1: expected a JSON object'),
    ('pg19', [{'text': 'a', 'split': 'train'}, '', {'text': 7}],
     'sample.jsonl, line 3: expected a JSON object with a string "text"'),
    ('pg19', [{'text': 'a', 'split': 'test'}], 'sample.jsonl, line 1: "split": \'test\'; '
                                               'expected "train" or "validation"'),
])
def test_prepare_names_the_bad_line(tmp_path, out_dir, script, rows, message):
    assert message in exit_message(PREPARE[script], str(out_dir), write_sample(tmp_path, rows))
    assert_bins_untouched(out_dir)


@pytest.mark.parametrize('script', ['openwebtext', 'pg19'])
def test_prepare_missing_or_wrong_paths(tmp_path, out_dir, script):
    prepare = PREPARE[script]
    good_sample = write_sample(tmp_path, [{'text': 'a', 'split': 'validation'}, {'text': 'b'}])
    missing = str(tmp_path / 'missing.jsonl')
    assert f'--sample={missing} does not exist' in exit_message(prepare, str(out_dir), missing)
    assert f'--sample={tmp_path} is a directory' in exit_message(prepare, str(out_dir),
                                                                 str(tmp_path))
    latin1 = tmp_path / 'latin1.jsonl'
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode('latin-1'))
    assert 'is not UTF-8 text' in exit_message(prepare, str(out_dir), str(latin1))
    assert '--max_docs=-1: expected 0' in exit_message(prepare, str(out_dir), good_sample, -1)
    assert_bins_untouched(out_dir)
    nowhere = str(tmp_path / 'nowhere')
    assert (f'--out_dir={nowhere} is not a directory: create it first'
            in exit_message(prepare, nowhere, good_sample))
    assert not os.path.exists(nowhere)


def read_only(*args, **kwargs):
    """What opening a file for writing does on a read-only disk (chmod does not stop root,
    who runs the tests in some containers: the refusal is faked)."""
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def writing_to(disk):
    """open, except that a file opened for writing is disk's: a FullDisk, or read_only."""
    return lambda path, mode='r', **kwargs: (disk(path, mode) if 'w' in mode else
                                             open(path, mode, **kwargs))


@pytest.mark.parametrize('disk, expected', [(read_only, 'Read-only file system'),
                                            (FullDisk, 'disk full')])
def test_prepare_keeps_the_bins_when_the_disk_fails(tmp_path, out_dir, monkeypatch, disk,
                                                    expected):
    monkeypatch.setattr(FullDisk, 'room', 100)
    monkeypatch.setattr(tokenizer, 'open', writing_to(disk), raising=False)
    sample = os.path.join(ROOT, 'data', 'openwebtext', 'sample.jsonl')
    message = exit_message(PREPARE['openwebtext'], str(out_dir), sample)
    assert expected in message and str(out_dir) in message and '--out_dir' in message
    assert_bins_untouched(out_dir)


RECALL_PREPARE = runpy.run_path(os.path.join(ROOT, 'data', 'recall', 'prepare.py'))['prepare']


@pytest.mark.parametrize('case, expected', [
    ('negative seed', '--seed=-1: expected 0 or more'),
    ('out_dir a file', 'is a file, not a folder: pass another --out_dir'),
    ('read-only out_dir', 'Read-only file system'),
    ('full disk', 'disk full'),
])
def test_recall_prepare_refuses_what_cannot_work(tmp_path, out_dir, monkeypatch, case, expected):
    """One line, and the files that were there stay as they were."""
    p = dataclasses.replace(RECALL_TINY, train_examples=40, val_examples=12)
    folder, seed = str(out_dir), 0
    if case == 'negative seed':
        seed = -1
    elif case == 'out_dir a file':
        folder = str(out_dir / 'train.bin')
    elif case == 'read-only out_dir':
        monkeypatch.setattr(tempfile, 'NamedTemporaryFile', read_only)     # check_folder's probe
    else:
        monkeypatch.setattr(FullDisk, 'room', 100)
        monkeypatch.setattr(tokenizer, 'open', writing_to(FullDisk), raising=False)
    assert expected in exit_message(RECALL_PREPARE, p, folder, seed)
    assert_bins_untouched(out_dir)


def test_prepare_shakespeare_into_a_missing_folder(tmp_path):
    prepare = runpy.run_path(os.path.join(ROOT, 'data', 'shakespeare', 'prepare.py'))['prepare']
    nowhere = str(tmp_path / 'nowhere')
    assert f'--out_dir={nowhere} is not a directory' in exit_message(prepare, nowhere)


@slow
def test_prepare_command_lines(tmp_path, out_dir):
    """The prepare scripts read --key=value through the configurator, as train.py does; a
    mistake is one line on stderr, no traceback, and the bins stay as they were."""
    sample_path = os.path.join(ROOT, 'data', 'openwebtext', 'sample.jsonl')
    script = os.path.join('data', 'openwebtext', 'prepare.py')
    proc = run(script, f'--sample={sample_path}', '--max_docs=3', f'--out_dir={tmp_path}')
    assert 'train: 2 documents' in proc.stdout and 'val: 1 documents' in proc.stdout
    proc = run(script, '--smaple=x.jsonl', check=False)
    assert proc.returncode == 2 and 'valid keys: sample, max_docs, out_dir' in proc.stderr
    empty = write_sample(tmp_path, [])
    proc = run(script, f'--sample={empty}', f'--out_dir={out_dir}', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().startswith('no documents for train.bin or val.bin')
    assert_bins_untouched(out_dir)
    proc = run(os.path.join('data', 'shakespeare', 'prepare.py'), f'--out_dir={tmp_path}/nowhere',
               check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert 'is not a directory' in proc.stderr


@pytest.mark.parametrize('device, message', [
    ('cuda:99', "device='cuda:99' but"),            # no machine has 100 GPUs
    ('tpu', "device='tpu' is not a device torch knows"),
    ('mps:0:1', "device='mps:0:1' is not a device torch knows"),
])
def test_check_device_names_what_is_not_here(device, message):
    assert message in exit_message(runtime.check_device, device)


@pytest.mark.usefixtures('script_state')
@pytest.mark.parametrize('args, message', [
    (['--batch_sizes=1,a'], "batch_sizes='1,a': expected comma-separated integers"),
    (['--batch_sizes=8,0'], "batch_sizes='8,0': every batch size must be 1 or more"),
    (['--methods=graph,fast'],
     "methods='graph,fast': expected some of graph, compiled, eager, unbounded"),
    (['--span=0'], 'span=0: expected 1 or more'),
    (['--tokens=300', '--span=256'], 'tokens=300 with span=256: expected tokens >= 2 * span + '
                                     '100'),
    (['--long_tokens=2999'], 'long_tokens=2999: expected 0 (no long run) or at least 3000'),
    (['--long_tokens=-1'], 'long_tokens=-1: expected 0 (no long run) or at least 3000'),
    (['--dtype=float64'], "dtype='float64': expected one of"),
    (['--token_linear_rows=-1'], 'token_linear_rows=-1: expected 0 (the modules at every batch '
                                 'size) or more'),
])
def test_bench_generate_refuses_settings_that_cannot_work(args, message):
    """Before the model is built: one line naming the setting."""
    assert message in exit_message(bench_generate.main, ['--device=cpu', *args])


@pytest.mark.usefixtures('script_state')
def test_bench_generate_profiles_a_decode_step(monkeypatch):
    """--profile's table: every operator of a step with its calls and time, longest first, the
    matmuls of the layers among them, and the total the sum of the rows (on the CPU, where the
    profiler names operators, on every machine)."""
    monkeypatch.setattr(bench_generate, 'device', 'cpu')
    torch.manual_seed(0)
    model = SWAT(SWATConfig(n_layer=2, n_head=2, n_embd=32, window=8, block_size=32)).eval()
    rows = bench_generate.step_profile(model, 'graph', 2, steps=5)
    times = [us for _, _, us in rows]
    assert times == sorted(times, reverse=True) and min(times) > 0
    calls = {name: n for name, n, _ in rows}
    assert calls['aten::mm'] >= 2 * 4          # q k v, the projection and the MLP's two, a layer
    table = bench_generate.format_profile(rows, 'a step', shown=3)
    assert table.startswith(f"a step: {sum(calls.values()):.0f} launches, {sum(times):.1f} µs")
    assert table.splitlines()[-1].startswith(f"| {len(rows) - 3} others |")


@pytest.mark.usefixtures('script_state')
def test_bench_generate_sets_the_rows_of_token_linear(monkeypatch, capsys):
    """--token_linear_rows=N is the model's TOKEN_LINEAR_ROWS for the run, and the header says it
    (a short run on the CPU, where the modules run whatever it says)."""
    monkeypatch.setattr(kernel, 'TOKEN_LINEAR_ROWS', kernel.TOKEN_LINEAR_ROWS)   # put back after
    monkeypatch.setattr(bench_generate, 'SWATConfig', lambda: tiny_config(vocab_size=50304))
    bench_generate.main(['--device=cpu', '--dtype=float32', '--batch_sizes=1', '--methods=eager',
                         '--tokens=228', '--span=64', '--token_linear_rows=0'])
    assert kernel.TOKEN_LINEAR_ROWS == 0
    header = capsys.readouterr().out.splitlines()[-4]
    assert header.endswith("token_linear's kernel up to 0 rows"), header


@slow
def test_bench_generate_rejects_a_device_that_is_not_here():
    proc = run('bench_generate.py', '--device=cuda:99', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "device='cuda:99' but" in proc.stderr


@slow                                           # importing bench sets up FlexAttention's compile
@pytest.mark.skipif(GPU, reason='on a GPU bench.py runs the benchmark')
def test_bench_says_it_needs_a_gpu():
    import bench                                # importing it runs nothing; its settings do
    assert exit_message(bench.apply_settings, []) == (
        "bench.py times GPU kernels and needs a CUDA GPU, but torch sees none here; on a CPU, "
        "python bench_generate.py --device=cpu times generation")


@slow                                           # importing bench sets up FlexAttention's compile
@pytest.mark.parametrize('arg, message', [
    ('--sigmoid=approx', "sigmoid='approx': expected 'fast' or 'exact'"),
    ('--backward_thread=gpu', "backward_thread='gpu': expected 'engine' or 'caller'"),
    ('--sweep_lengths=1024,2k', "sweep_lengths='1024,2k': expected comma-separated lengths"),
    ('--train_lengths=0', "train_lengths='0': expected comma-separated lengths"),
    ('--tokens=1000', 'tokens=1000, seq_len=16384: expected tokens (B * T) a multiple of'),
    ('--train_tokens=5000', 'train_tokens=5000 must be a multiple of each length in '
                            'train_lengths (4096)'),
    ('--sweep_window=0', 'sweep_window=0: expected a window of 1 or more'),
    ('--repeats=2', 'repeats=2: expected 3 or more (a median and a spread)'),
    ('--host_calls=0', 'host_calls=0: expected 1 or more'),
    ('--tile_calls=0', 'tile_calls=0: expected 1 or more'),
    ('--mode=tile', "mode='tile': expected 'attention', 'tiles', 'train' or 'loss'"),
    ('--loss_width=0', 'loss_width=0: expected 1 or more'),
    ('--loss_chunks=1024,', "loss_chunks='1024,': expected comma-separated chunk sizes"),
])
def test_bench_refuses_settings_that_cannot_work(monkeypatch, arg, message):
    """Before the GPU is looked for, and so on any machine."""
    import bench
    for key in bench.SETTINGS:                  # apply_settings sets them: put them back after
        monkeypatch.setattr(bench, key, getattr(bench, key))
    assert message in exit_message(bench.apply_settings, [arg])


def bars(line):
    """Where a table's line has its column separators."""
    return [i for i, c in enumerate(line) if c == '|']


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_spread_is_the_median_and_the_range_of_the_repeats():
    import bench
    assert bench.spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert bench.spread([4.0, 1.0, 10.0, 2.0]) == (3.0, 1.0, 10.0)    # even: the middle two's mean
    assert bench.ms_spread([0.7531, 0.7412, 0.7604]) == '0.753 (0.741-0.760)'
    assert bench.ms_spread([12.7231, 12.701, 12.8012]) == '12.723 (12.701-12.801)'


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_launched_row_takes_its_ratio_from_the_medians_under_its_header():
    import bench
    q = torch.empty(2, 12, 16384, 64)           # only its shape is read
    flops = bench.forward_flops(q, 128)
    assert flops == 4 * 2 * 12 * 64 * (128 * 129 // 2 + (16384 - 128) * 128)
    swat_ms = bench.spread([1.0, 0.5, 9.0])[0]  # the median, 1.0, not the mean
    row = bench.launched_row(q, 128, 'flex softmax', flops, 0.25, [2.0, 12.5, 1.5], 100.0,
                             swat_ms)
    assert bars(row) == bars(bench.LAUNCHED_HEADER)
    cells = [cell.split() for cell in row.split('|')]
    assert cells[:2] == [['64', '12', '128'], ['flex', 'softmax']]
    assert cells[2] == ['0.250', '2.000', '(1.500-12.500)']
    assert cells[3] == [f"{flops / 0.25 / 1e9:.1f}", f"{3.5 * flops / 2.0 / 1e9:.1f}"]
    assert cells[4:] == [['100'], ['2.00x']]
    assert bench.vs_swat(3.0, None) == '-'


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_a_method_that_cannot_be_recorded_is_one_cell_with_the_first_error():
    import bench

    def failed_recording():                     # as torch.cuda.graph's end raises after an error
        try:
            raise RuntimeError('CUDA error: operation not permitted when stream is capturing\n'
                               'CUDA kernel errors might be asynchronously reported')
        finally:
            raise RuntimeError('CUDA error: operation failed due to a previous error during '
                               'capture')

    def said_again():
        try:
            raise KeyError('x')
        except KeyError:
            raise ValueError('the error a user is meant to read') from None

    reason = bench.or_reason('cannot be recorded', failed_recording)
    assert reason == ('cannot be recorded: CUDA error: operation not permitted when stream is '
                      'capturing')
    assert bench.or_reason('failed', said_again) == 'failed: the error a user is meant to read'
    assert bench.or_reason('failed', lambda: 1 / 0) == 'failed: division by zero'
    assert bench.or_reason('failed', bench.spread, [2.0, 1.0, 3.0]) == (2.0, 1.0, 3.0)
    assert bench.first_line(AssertionError()) == 'AssertionError'

    q = torch.empty(1, 8, 16384, 128)           # only its shape is read
    flops = bench.forward_flops(q, 512)
    assert bench.graph_row(q, 512, 'flex sigmoid', flops, reason, 1.5) == (
        ' 128   8   512 | flex sigmoid  | ' + reason)
    row = bench.graph_row(q, 512, 'flex softmax', flops, [3.0, 2.0, 40.0], 1.5)
    assert bars(row) == bars(bench.GRAPH_HEADER)
    assert [cell.split() for cell in row.split('|')[2:]] == [
        ['3.000', '(2.000-40.000)'], [f"{3.5 * flops / 3.0 / 1e9:.1f}"], ['2.00x']]
    assert bench.graph_row(q, 512, 'swat', flops, [1.0] * 3, None).endswith('|           -')


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_host_time_is_taken_while_the_gpu_sleeps_and_says_when_it_woke(monkeypatch):
    """host_us on stand-ins for the GPU's calls: the sleep is queued before the timed calls, it
    lasts longer than they do, and nothing waits for the GPU until they are all queued."""
    import bench
    events, woke = [], False

    class Event:
        def record(self):
            events.append('woken')

        def query(self):
            return woke

    monkeypatch.setattr(bench.torch.cuda, 'synchronize', lambda: events.append('sync'))
    monkeypatch.setattr(bench.torch.cuda, '_sleep', lambda cycles: events.append(cycles))
    monkeypatch.setattr(bench.torch.cuda, 'Event', Event)
    monkeypatch.setattr(bench, 'host_calls', 5)
    monkeypatch.setattr(bench, 'repeats', 2)

    def call(x):
        events.append(x)
        time.sleep(0.002)

    times = bench.host_us(call, 'call')
    cycles = events[8]
    timed = [cycles, 'woken'] + ['call'] * 5 + ['sync']
    assert events == ['call', 'sync'] + ['call'] * 5 + ['sync'] + timed * 2
    assert isinstance(cycles, int) and cycles >= 2 * 5 * 0.002 * bench.GPU_HZ_AT_MOST
    assert len(times) == 2
    assert all(2000 <= us < 2000 + 1e5 for us in times)    # 2 ms a call, and the loop's own time
    woke = True
    assert bench.or_reason('failed', bench.host_us, call, 'call') == (
        'failed: the GPU woke before the 5 calls were queued (a full launch queue?): try a '
        'smaller host_calls')


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_host_row_has_a_cell_for_each_time_or_its_reason():
    import bench
    row = bench.host_row('flex softmax', [123.456, 120.2, 130.7], [99.9, 98.2, 101.6],
                         [87.04, 86.6, 87.2])
    assert bars(row) == bars(bench.HOST_HEADER)
    assert [cell.strip() for cell in row.split('|')] == [
        'flex softmax', '123.5 (120-131)', '99.9 (98-102)', '87.0 (87-87)']
    assert bench.host_row('swat', [41.0], [30.0], 'failed: backend compiler failed') == (
        'swat              |             41.0 (41-41) |             30.0 (30-30) | '
        'failed: backend compiler failed')
    assert bench.host_row('swat, launches', [30.0], None, None).endswith(
        '|                        - |                          -')


@pytest.mark.skipif(not GPU, reason="a CPU's backward runs on the calling thread anyway")
def test_bench_runs_the_backward_on_the_calling_thread_when_asked():
    """The host table's column 'backward here': autograd's backward of CUDA tensors, which runs
    on the engine's own thread by default, runs on the thread that called for it."""
    import bench
    threads = []

    class Recorded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            threads.append(threading.get_ident())
            return grad

    def forward_backward(x):
        return torch.autograd.grad(Recorded.apply(x), (x,), torch.ones_like(x))

    x = torch.ones(4, device='cuda', requires_grad=True)
    forward_backward(x)
    bench.on_calling_thread(forward_backward)(x)
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()


@slow                                           # importing bench sets up FlexAttention's compile
def test_bench_times_swat_without_autograd_on_the_same_work():
    """The host table's rows under swat's eager call (its forward and backward without autograd,
    then the launches alone) compute swat_attention's output and autograd's gradients."""
    import bench
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(4))
    slopes = random_slopes(2)
    out = kernel.swat_attention(*(x.requires_grad_() for x in (q, k, v)), slopes, 8)
    expected = (out, *torch.autograd.grad(out, (q, k, v), do))
    layers = bench.swat_without_autograd(slopes, 8)
    assert list(layers) == ['swat, no autograd', 'swat, launches']
    for call in layers.values():
        for _ in range(2):                      # the launches' outputs are allocated once
            for got, want in zip(call(q, k, v, do), expected):
                torch.testing.assert_close(got, want)
