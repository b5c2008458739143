import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # in-process tests use tiny tensors: one thread is fastest, and leaves a core to the subprocesses


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One finished 8-step Self-E run (fp32, eager), shared by the tests that only read it: its ckpt.pt. A test
    that changes the run copies its folder first."""
    out = tmp_path_factory.mktemp("tiny_run")
    r = subprocess.run([sys.executable, "train.py", "--batch-size", "8", "--max-steps", "8", "--max-minutes", "0",
                        "--sample-every", "0", "--log-every", "1", "--precision", "fp32", "--no-compile",
                        "--out", str(out)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out / "ckpt.pt")
