"""
The tests: python -m pytest -q test_swat.py

Without a GPU the Triton kernels run in Triton's CPU interpreter at small shapes (float32 and
float16; the interpreter multiplies bfloat16 wrongly inside tl.dot). With a GPU the same tests
run on it, and the GPU-only cases add full sizes, bfloat16 and torch.compile.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')     # must be set before triton is imported

import kernel  # noqa: E402
from kernel import swat_attention, swat_attention_reference, swat_backward, swat_forward  # noqa: E402
from swat import SWAT, SWATConfig, alibi_slopes  # noqa: E402

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
