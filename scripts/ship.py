"""The shipped weights, checkpoints/shapes_tiny_selfe.pt, from one command: the only thing that writes checkpoints/.

    python -m scripts.ship          # about 140 minutes on 2 threads; the same command again resumes a stopped run

The shipped recipe: Self-E plus the flow target (ours, `--flow-target 0.25`), the tiny network, seed 0, step-matched
to the learning curves: 24,206 optimiser steps (`--max-steps 24206 --max-minutes 0`), in bench/shipped/run. Then:
ShapesEval (full prompt set, 1 / 2 / 4 / 8 / 50 steps) of the run's fp32 EMA; the EMA exported as fp16 if that moves
no score by more than 0.01, else as fp32; the exported file scored again. bench/shipped/results.json holds the recipe,
both sets of scores and the file's size; README quotes the file's scores.
"""
import argparse
import json
import os
import subprocess
import sys

import evaluate
import model as models
import sample
from scripts import runs

RECIPE = ["--flow-target", "0.25", "--seed", "0", "--max-minutes", "0", "--sample-every", "0"]
STEPS = [1, 2, 4, 8, 50]
RESULTS = os.path.join("bench", "shipped", "results.json")


def score(ckpt_path, steps, per_task):
    net, tok, cfg = sample.load(ckpt_path)
    return evaluate.evaluate(sample.make_generate(net, tok, cfg), steps, per_task, 4, cfg["image_size"], 0)


def export(ckpt, fp32_rows, dest, score_file, tolerance=0.01):
    """Write the EMA of `ckpt` to dest as fp16 if every score of the file (score_file(path) -> rows) stays within
    `tolerance` of fp32_rows, else as fp32. Returns the entry that results.json keeps."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    for half in (True, False):
        models.export_weights(ckpt, dest, half=half)
        rows = score_file(dest)
        diff = max(abs(rows[k]["overall"] - fp32_rows[k]["overall"]) for k in rows if k.isdigit())
        if diff <= tolerance:
            break
    return dict(path=os.path.relpath(dest), dtype="fp16" if half else "fp32", bytes=os.path.getsize(dest),
                step=ckpt["step"], max_diff_vs_fp32=round(diff, 4), rows=rows)


def main(argv=None):
    p = sample.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("bench", "shipped", "run"), help="the training run's folder")
    p.add_argument("--max-steps", type=int, default=24206, help="optimiser steps (the shipped weights: 24,206)")
    p.add_argument("--dest", default=sample.SHIPPED_CKPT, help="where the weights go")
    p.add_argument("--results", default=RESULTS, help="the JSON of the recipe and the scores")
    p.add_argument("--steps", type=int, nargs="+", default=STEPS, help="ShapesEval step counts")
    p.add_argument("--per-task", type=int, default=50, help="ShapesEval prompts per task (the full set: 50)")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.per_task < 1 or any(s < 1 for s in args.steps):
        p.error("--max-steps, --per-task and --steps must be positive")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    done = os.path.exists(ckpt_path) and models.load_checkpoint(ckpt_path)["step"] >= args.max_steps
    if not done:  # train, or resume a stopped run (runs.train_cmd: --resume when the folder holds a checkpoint)
        cmd = runs.train_cmd(args.out, [*RECIPE, "--max-steps", str(args.max_steps)])
        print(" ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            raise SystemExit("error: training stopped before the end (it saved, if stopped by a signal); run the "
                             "same command again to resume it")
    ckpt = models.load_checkpoint(ckpt_path)
    fp32_rows = score(ckpt_path, args.steps, args.per_task)
    entry = export(ckpt, fp32_rows, args.dest, lambda path: score(os.path.abspath(path), args.steps, args.per_task))
    res = json.load(open(args.results)) if os.path.exists(args.results) else {}
    res.update(command=" ".join(["python -m scripts.ship", *(sys.argv[1:] if argv is None else argv)]),
               recipe=" ".join(RECIPE + ["--max-steps", str(args.max_steps)]), run=runs.summary(args.out),
               fp32_rows=fp32_rows, shipped=entry)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results + ".tmp", "w") as f:  # never a half-written results file
        json.dump(res, f, indent=1)
    os.replace(args.results + ".tmp", args.results)
    print(f"wrote {entry['path']} ({entry['dtype']}, {entry['bytes'] / 1e6:.1f} MB, step {entry['step']}): overall "
          + " / ".join(f"{entry['rows'][str(k)]['overall']:.3f}" for k in args.steps) + f" at {args.steps} steps; "
          f"{args.results}")


if __name__ == "__main__":
    main()
