import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))  # the tests run one at a time: two cores for in-process work

import losses  # noqa: E402  (after the path: the project's modules)
from model import DiT  # noqa: E402

# train.py flags of the short runs (add --batch-size); fp32 and eager on a GPU too: the exactness tests need them
SMALL = ["--max-minutes", "0", "--sample-every", "0", "--log-every", "2", "--precision", "fp32", "--no-compile"]


# ---- small networks, step inputs and methods for the loss tests ----

def tiny_dit():
    """A 2-block DiT on 8x8 images with every weight moved off its zero init (a trained-looking network)."""
    torch.manual_seed(0)
    net = DiT(vocab_size=20, max_text_len=6, image_size=8, dim=32, depth=2, heads=2, patch=4, text_layers=1)
    for p in net.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return net


def null_tok(L=6):
    """A stand-in tokenizer: every caption (the methods here only ask for the empty one) -> zeros (n, L)."""
    return lambda captions: torch.zeros(len(captions), L, dtype=torch.long)


def step_inputs(B=8, seed=0, shape=(3, 8, 8)):
    """One batch's draws for step_loss: x0, ids (B, 6), t, s, jump, eps, eps2."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *shape, generator=g)
    ids = torch.randint(1, 20, (B, 6), generator=g)
    t = losses.sample_t(B, 0.0, g)
    s, jump = losses.sample_s(t, 1.0, g)
    return x0, ids, t, s, jump, torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)


def selfe(ema, live, **kw):
    """The paper's Self-E with the stand-in tokenizer."""
    return losses.SelfE(null_tok(), 0.0, ema, live, **kw)


# ---- files ----

def ckpt_step(path):
    """The step of a checkpoint file, -1 if it is missing or half-written."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return -1


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def rgb(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def cli(module, *argv):
    """`python -m MODULE ARGV` run in this process, returned as a subprocess would be (returncode, stdout, stderr):
    a fresh interpreter spends ~3.5 s importing torch and torch._dynamo (the first optimiser imports it), more than
    a few training steps. Runs from the repository root; the signal handlers train.py sets are
    restored. Tests of the process boundary itself (signals, the one-line CLI error) stay subprocesses."""
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                importlib.import_module(module).main([str(a) for a in argv])
            except SystemExit as e:  # as the interpreter does: an int is the code, a message goes to stderr
                code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
    finally:
        os.chdir(cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess([module, *argv], code or 0, out.getvalue(), err.getvalue())


def spawn(*argv, timeout=120, threads=None):
    """`python ARGV` as a real subprocess from the repository root, with a time-out (a hang fails the test):
    for what needs a process of its own (a signal, torchrun, data that could hang, the one-line CLI error).
    threads: OMP_NUM_THREADS for the child. Returns the CompletedProcess; the caller asserts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


SIGNAL_HOOK = """
import os, sys
sig, at, on = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.argv = ["train.py"] + sys.argv[4:]
import train
if on in ("step", "twice"):  # right after optimiser step `at` (its EMA update is its last act); twice: 0.3 s apart
    ema_update = train.models.ema_update
    def hooked(ema, net, decay, step):
        ema_update(ema, net, decay, step)
        if step + 1 == at:
            os.kill(os.getpid(), sig)
            if on == "twice":
                import time
                time.sleep(0.3)
                os.kill(os.getpid(), sig)
    train.models.ema_update = hooked
else:                 # right after ckpt.pt of step `at` is written
    save = train.models.save_checkpoint
    def hooked(path, **state):
        save(path, **state)
        if state["step"] == at and os.path.basename(path) == "ckpt.pt":
            os.kill(os.getpid(), sig)
    train.models.save_checkpoint = hooked
train.main()
"""


def spawn_signalled(sig, at, *argv, on="step", timeout=300, threads=None):
    """`python train.py ARGV` as a subprocess that sends itself `sig` right after optimiser step `at` (on="step") or
    right after writing ckpt.pt at step `at` (on="save"), or twice 0.3 s apart after step `at` (on="twice"): a trigger counted in steps, so the test holds on any
    machine speed (no race between a clock and the run)."""
    return spawn("-c", SIGNAL_HOOK, int(sig), at, on, *argv, timeout=timeout, threads=threads)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One finished 8-step Self-E run (fp32, eager), shared by the tests that only read it: its ckpt.pt. A test
    that changes the run copies its folder first."""
    out = tmp_path_factory.mktemp("tiny_run")
    r = cli("train", *SMALL, "--batch-size", "8", "--max-steps", "8", "--log-every", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out / "ckpt.pt")
