"""Fingerprints of the trained weights after 6 seeded steps of each method: what tests/test_train.py checks
refactors against. Run this only after a change that is MEANT to alter training, and say why in the commit:

    python tests/golden.py            # print the fingerprints of the current code
    python tests/golden.py --write    # and write them to tests/golden.json

A fingerprint is the sum, the sum of squares and a fixed random projection of all live and EMA weights.
The flags pin the recipe of commit b90af2b (patch 4, Adam, lr 1e-3, the fake-score term from half-way), so
the numbers do not move when the defaults do; flow and selfe still match what b90af2b gave to 1e-6.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "tests", "golden.json")
FLAGS = ["--max-steps", "6", "--batch-size", "8", "--max-minutes", "0", "--sample-every", "0", "--warmup", "2",
         "--tau-anneal", "0.4", "--fake-start", "0.5", "--seed", "3", "--patch", "4", "--optimizer", "adam",
         "--lr", "1e-3", "--precision", "fp32", "--no-compile"]
METHODS = ["flow", "selfe", "meanflow"]


def fingerprint(ckpt_path):
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    out = {}
    for which in ("model", "ema"):
        v = torch.cat([p.flatten().double() for _, p in sorted(ck[which].items())])
        proj = (v * torch.randn(v.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)).sum()
        out[which] = [v.sum().item(), v.pow(2).sum().item(), proj.item()]
    return out


def train_and_fingerprint(method, out):
    r = subprocess.run([sys.executable, "train.py", "--method", method, *FLAGS, "--out", out], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"training {method} failed:\n{r.stderr[-3000:]}")
    return fingerprint(os.path.join(out, "ckpt.pt"))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        got = {m: train_and_fingerprint(m, os.path.join(tmp, m)) for m in METHODS}
    print(json.dumps(got, indent=1))
    if "--write" in sys.argv:
        json.dump(got, open(PATH, "w"), indent=1)
        print(f"wrote {PATH}")
