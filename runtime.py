"""
The set-up every script shares: which device to run on, and in which precision.

    device_type, ctx = setup_device_and_precision(device, dtype)
    with ctx:
        logits, loss = model(x, y)

Both checks run before any work, so a wrong --device or --dtype costs one clear line, not a
traceback after the model was built.
"""

from contextlib import nullcontext

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def check_device(device):
    """The torch.device for the string `device`, or SystemExit naming what there is instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SystemExit(f"device={device!r} is not a device torch knows; use 'cpu', 'cuda' or "
                         f"'cuda:N'") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit(f"device={device!r} but torch sees no CUDA GPU here; use "
                             f"--device=cpu (or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"device={device!r} but there are only {torch.cuda.device_count()} "
                             f"GPU(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == 'mps':
        if not torch.backends.mps.is_available():
            raise SystemExit(f"device={device!r} but MPS is not available here; use --device=cpu")
    elif dev.type != 'cpu':
        raise SystemExit(f"device={device!r}: only 'cpu', 'cuda', 'cuda:N' and 'mps' are supported")
    return dev


def setup_device_and_precision(device, dtype):
    """Check device and dtype, allow TF32 matmuls for float32 work, and return (device_type,
    ctx): ctx is the autocast context that runs the matmuls in dtype while the weights stay
    float32 (a no-op for float32)."""
    device_type = check_device(device).type
    if dtype not in DTYPES:
        raise SystemExit(f"dtype={dtype!r}: expected one of {', '.join(map(repr, DTYPES))}")
    # TF32 tensor cores for float32 matmuls (Ampere and later): much faster, ~1e-3 relative error.
    torch.set_float32_matmul_precision('high')
    if dtype == 'float32':
        return device_type, nullcontext()
    return device_type, torch.amp.autocast(device_type=device_type, dtype=DTYPES[dtype])


# Peak dense bfloat16 tensor-core FLOP/s of one GPU, from NVIDIA's data sheets: the denominator
# of the model FLOPs utilisation (MFU). The first name found in the device's name counts, so
# 'H100 PCIe' comes before 'H100'.
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}


def peak_bf16_flops(device):
    """The peak of the GPU `device`; None for a GPU not in PEAK_BF16_FLOPS, or not a GPU."""
    if device is None or torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def synchronize(device):
    """Wait for the GPU to finish: CUDA runs asynchronously, so a clock read without this would
    time only the launching of the work. Nothing to wait for on a CPU."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)
