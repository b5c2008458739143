"""What the research drivers (benchmark.py, search.py) share: the commands of a run, and its summary.

A run is a folder: train.py trains it (or resumes it, if it holds a checkpoint), evaluate.py scores it. Runs go
side by side with one thread each (threads()), and every budget is CPU time (train.py --clock cpu), so a
run that shares the machine still gets its compute.
"""
import json
import os
import sys

import numpy as np

import model as models


def train_cmd(out, flags):
    """train.py for the run folder `out`: --resume if it holds a checkpoint, else a new run with `flags`."""
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        return [sys.executable, "train.py", "--out", out, "--resume"]
    return [sys.executable, "train.py", "--out", out, *flags]


def eval_cmd(ckpt, out, per_task=50, n=4, steps=(1, 2, 4, 8, 50)):
    """evaluate.py on a checkpoint, writing <out>/shapes_eval.json."""
    return [sys.executable, "evaluate.py", "--ckpt", ckpt, "--out", out, "--per-task", str(per_task), "--n", str(n),
            "--steps", *map(str, steps)]


def threads_env(jobs):
    """The environment of `jobs` concurrent runs: the cores shared evenly (one thread each on 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def summary(out):
    """A finished run: optimiser steps, CPU-minutes, median images per second, batch, final loss (last 10 logs)."""
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    ckpt = models.load_checkpoint(os.path.join(out, "ckpt.pt"))
    return dict(steps=ckpt["step"], minutes=round(ckpt["elapsed"] / 60, 2), batch=ckpt["config"]["batch_size"],
                img_per_s=round(float(np.median([r["img_per_s"] for r in log])), 1),
                final_loss=round(float(np.mean([r["loss"] for r in log[-10:]])), 4))
