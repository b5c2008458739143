import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))  # the tests run one at a time: two cores for in-process work


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


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One finished 8-step Self-E run (fp32, eager), shared by the tests that only read it: its ckpt.pt. A test
    that changes the run copies its folder first."""
    out = tmp_path_factory.mktemp("tiny_run")
    r = cli("train", "--batch-size", "8", "--max-steps", "8", "--max-minutes", "0", "--sample-every", "0",
            "--log-every", "1", "--precision", "fp32", "--no-compile", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out / "ckpt.pt")
