"""
What the tests in test_swat.py share: where things are, the device, tolerances, small models,
running a script, and the tiny trained checkpoints several tests read.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before anything imports triton); the scripts the tests launch run as a user runs them, on the
CPU through the einsum reference.
"""

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault('TRITON_INTERPRET', '1')     # must be set before triton is imported

from swat import SWAT, SWATConfig  # noqa: E402
import kernel  # noqa: E402

kernel.PINNED = 0       # no autotuning in the tests: one configuration per kernel (see kernel.py)

ROOT = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(ROOT, 'data', 'shakespeare')
DEVICE = 'cuda' if GPU else 'cpu'
needs_gpu = pytest.mark.skipif(not GPU, reason='needs a CUDA GPU')
# ||out - ref|| / ||ref|| against float64 (SPEC.md section 4)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# the scripts run as a user runs them: on a CPU through the reference, not the interpreter
SCRIPT_ENV = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
# a model small enough to train for a few dozen steps in seconds on a CPU
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=64', '--window=16',
        '--batch_size=4', '--eval_iters=2', '--device=cpu', '--compile=False', '--dtype=float32',
        '--dropout=0.0']
SEPARATOR = '---------------'          # what sample.py prints after each sample


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: launches a subprocess or compiles; '
                                       'the fast tier is -m "not slow"')


def relative_error(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def random_inputs(B, H, T, D, dtype=torch.float64, device=DEVICE):
    return [torch.randn(B, H, T, D, dtype=dtype, device=device) for _ in range(3)]


def random_slopes(H, sign='mixed'):
    magnitudes = torch.rand(H) * 0.5 + 0.01
    signs = {'mixed': torch.randint(0, 2, (H,)) * 2 - 1, 'positive': 1, 'negative': -1}[sign]
    return (magnitudes * signs).to(DEVICE)


V = 101                                # the tiny models' vocabulary


def tiny_config(**changes):
    """A 2-layer, 32-wide model with a vocabulary of V: fast enough for exact comparisons."""
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, window=8, vocab_size=V)
    settings.update(changes)
    return SWATConfig(**settings)


def tiny_model(**changes):
    """SWAT(tiny_config(**changes)), seed 0, in eval mode, on the CPU (where forward also checks
    the range of the ids: on a GPU that would cost a sync)."""
    torch.manual_seed(0)
    return SWAT(tiny_config(**changes)).eval()


def assert_one_line(error):
    assert '\n' not in str(error), str(error)


def exit_message(function, *args):
    """The message of the SystemExit that function(*args) must raise; it must be one line."""
    with pytest.raises(SystemExit) as e:
        function(*args)
    message = str(e.value.code)
    assert '\n' not in message and 'Traceback' not in message, message
    return message


# Most of the time of a script's run on a tiny model goes to Python importing torch (and
# torch._dynamo, which the optimizer imports on first use): about 3.5 s of 5 on two cores. So
# run() starts the scripts from a small fork server that has imported those once: each run is
# still a process of its own, with the script as __main__, its own arguments, folder, streams,
# exit code and every module of the project imported afresh; only the imports of the libraries
# are skipped. It is started with SCRIPT_ENV, read as the libraries import. The tests that signal
# a script or run it under torchrun start real interpreters.
SCRIPT_SERVER = r"""
import json, os, runpy, sys, traceback
import numpy, tiktoken, torch, torch._dynamo


def run_script(script, args, cwd, stdout, stderr):
    # as `python script args` would: the script's folder first on sys.path, its exit code
    os.chdir(cwd)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY),
                            (2, stderr, os.O_WRONLY)):
        os.dup2(os.open(path, flags), fd)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code if e.code is None or isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        run_script(**json.loads(line))
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""
_server = None


def _script_server():
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, '-c', SCRIPT_SERVER], cwd=ROOT, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=SCRIPT_ENV)
    return _server


def run(script, *args, check=True, cwd=ROOT, timeout=300):
    """Run `python script args...` (from the repo root by default) through the fork server;
    return a CompletedProcess. With check, a non-zero exit fails the test and shows both
    streams."""
    server = _script_server()
    with tempfile.TemporaryDirectory() as folder:
        streams = [os.path.join(folder, name) for name in ('stdout', 'stderr')]
        for path in streams:
            open(path, 'w').close()
        request = dict(script=str(script), args=[str(a) for a in args], cwd=str(cwd),
                       stdout=streams[0], stderr=streams[1])
        server.stdin.write(json.dumps(request) + '\n')
        server.stdin.flush()
        pid = int(server.stdout.readline())
        if not select.select([server.stdout], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            server.stdout.readline()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        returncode = int(server.stdout.readline())
        stdout, stderr = (open(path).read() for path in streams)
    proc = subprocess.CompletedProcess([script, *args], returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(*args, nproc=2, script='train.py'):
    """Run script (train.py) under torchrun with nproc processes on the CPU, one thread each."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={nproc}', str(script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**SCRIPT_ENV, 'OMP_NUM_THREADS': '1'})


def rank_weights_script(folder):
    """A script that runs train.py with its arguments, then saves the weights this process ends
    with to folder/rank{R}.pt: what the tests use to see the weights of every DDP rank."""
    path = os.path.join(folder, 'rank_weights.py')
    with open(path, 'w') as f:
        f.write(f"import os, runpy, sys, torch\n"
                f"sys.path.insert(0, {ROOT!r})\n"
                f"sys.argv = ['train.py', *sys.argv[1:]]\n"
                f"run = runpy.run_path(os.path.join({ROOT!r}, 'train.py'), run_name='__main__')\n"
                f"torch.save(run['raw_model'].state_dict(), "
                f"os.path.join({str(folder)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    return path


def load_ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), map_location='cpu')


def file_hash(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_same_weights(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


def save_tiny_checkpoint(out_dir, **entries):
    """out_dir/ckpt.pt with the two entries a model needs, as train.py writes them, of a fresh
    tiny softmax model with GPT-2's vocabulary (so the scripts can feed it text); `entries`
    replace or add entries. Returns the model."""
    model = tiny_model(attn='softmax', vocab_size=50304)
    checkpoint = dict(model=model.state_dict(), model_args=asdict(model.config))
    checkpoint.update(entries)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    return model


def make_bad_checkpoint(out_dir, kind):
    """out_dir/ckpt.pt, bad in the way `kind` names; returns its path."""
    path = os.path.join(out_dir, 'ckpt.pt')
    args = asdict(tiny_config(attn='softmax', vocab_size=50304))
    weights = (tiny_model(attn='softmax', vocab_size=50304).state_dict()
               if kind in ('foreign', 'wrong shape', 'missing weight') else None)
    if kind == 'directory':
        os.makedirs(path)
    elif kind == 'empty':
        open(path, 'wb').close()
    elif kind == 'garbage':
        with open(path, 'wb') as f:
            f.write(b'\x00not a checkpoint\xff' * 100)
    elif kind == 'truncated':                   # a real checkpoint, cut in half
        save_tiny_checkpoint(out_dir)
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:
            f.write(data[:len(data) // 2])
    elif kind == 'foreign':                     # a torch file, but not one train.py wrote
        torch.save({'state_dict': weights}, path)
    elif kind == 'not a dict':
        torch.save([1, 2, 3], path)
    elif kind == 'unknown field':
        save_tiny_checkpoint(out_dir, model_args={**args, 'n_experts': 8})
    elif kind == 'refused value':
        save_tiny_checkpoint(out_dir, model_args={**args, 'n_head': 3, 'n_embd': 48})
    elif kind == 'wrong shape':
        save_tiny_checkpoint(out_dir, model={**weights, 'lm_head.weight': torch.zeros(50304, 48)})
    elif kind == 'missing weight':
        del weights['transformer.h.1.mlp.c_fc.weight']
        save_tiny_checkpoint(out_dir, model=weights)
    else:
        assert kind == 'missing', kind
    return path


@pytest.fixture(scope='session')
def shakespeare():
    """Make sure data/shakespeare/{train,val}.bin exist (tokenize the corpus once if not)."""
    if not all(os.path.exists(os.path.join(DATA, f'{s}.bin')) for s in ('train', 'val')):
        run(os.path.join('data', 'shakespeare', 'prepare.py'))
    return DATA


@pytest.fixture(scope='session')
def trained(shakespeare, tmp_path_factory):
    """(out_dir, CompletedProcess) of a 10-step tiny run that saved at steps 5 and 10. Shared by
    the tests of train.py, sample.py and eval.py: copy it before changing anything in it."""
    out = tmp_path_factory.mktemp('trained')
    proc = run('train.py', *TINY, f'--out_dir={out}', '--max_iters=10', '--eval_interval=5',
               '--always_save_checkpoint=True')
    return out, proc


@pytest.fixture
def softmax_checkpoint(tmp_path):
    """An out_dir with an untrained 2-layer softmax model (window 8)."""
    save_tiny_checkpoint(tmp_path)
    return tmp_path


@pytest.fixture
def reference_attention(monkeypatch):
    """On a CPU, run the sigmoid attention through the einsum reference instead of Triton's
    interpreter: for the tests of what is built on the attention (the model, generation), not
    of the kernel itself, which the interpreter only slows down."""
    import kernel
    monkeypatch.setattr(kernel, 'INTERPRET', False)


@pytest.fixture
def script_state(monkeypatch, reference_attention):
    """For tests that call sample.main, eval.main or bench_generate.main in this process: main()
    applies its overrides to the module's globals and sets the float32 matmul precision for the
    whole process; both are put back after the test. The models run through the einsum
    reference."""
    import bench_generate
    import eval as eval_script
    import sample
    for module in (sample, eval_script, bench_generate):
        for key in module.config_keys:
            monkeypatch.setattr(module, key, getattr(module, key))
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
