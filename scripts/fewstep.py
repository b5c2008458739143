"""The few-step speedrun's table (issue: Self-E's 1-2 step samples): collect the finished runs of
scripts/fewstep_job.sh into bench/fewstep/results.json and results.md.

    bash scripts/fewstep_job.sh selfe_cons0.25_s0 --consistency 0.25    # one run: 30 CPU-minutes, then scored
    HALF=1 bash scripts/fewstep_job.sh selfe_ts10_s0 --time-scale 10    # or only to its 15-minute snapshot
    python -m scripts.fewstep                                           # the table

Every run: the adopted recipe (tiny, patch 8, Muon, lr 4e-3, batch 64, seed 0 unless its flags say otherwise)
for 30 CPU-minutes on one thread (--clock cpu), a snapshot at 15, each scored with ShapesEval on the full
prompt set (50 per task x 4 images) at 1 / 2 / 4 / 8 / 50 steps with its method's default sampler.
"""
import argparse
import json
import os

import model as models
from data import TASKS

OUT = os.path.join("bench", "fewstep")


def collect(runs_dir=os.path.join(OUT, "runs")):
    """The committed results.json, updated by every scored run in runs_dir (runs_dir is not in git: a run whose
    folder is gone keeps its committed row)."""
    saved = os.path.join(OUT, "results.json")
    res = json.load(open(saved)) if os.path.exists(saved) else {}
    for name in sorted(os.listdir(runs_dir) if os.path.isdir(runs_dir) else []):
        d = os.path.join(runs_dir, name)
        evals = {m: os.path.join(d, f"eval{m}", "shapes_eval.json") for m in ("15", "30")}
        evals = {m: path for m, path in evals.items() if os.path.exists(path)}  # a half run has the 15 only
        if not evals:
            continue
        cfg = json.load(open(os.path.join(d, "config.json")))
        files = {"30": "ckpt.pt", "15": models.snapshot_name(minutes=15)}
        ck = {m: models.load_checkpoint(os.path.join(d, files[m])) for m in evals}
        res[name] = dict(method=cfg["method"], argv={k: cfg[k] for k in cfg.get("given", []) if k in cfg},
                         **{m: dict(steps=ck[m]["step"], cpu_minutes=round(ck[m]["elapsed"] / 60, 2),
                                    rows=json.load(open(evals[m]))["rows"]) for m in evals})
    return dict(sorted(res.items()))


def table(res, budget="30"):
    lines = [f"| run ({budget} CPU-min) | flags | optimiser steps | 1 | 2 | 4 | 8 | 50 | 2 steps: " +
             " / ".join(TASKS) + " |", "|---" * 9 + "|"]
    for name, r in res.items():
        if budget not in r:
            continue
        rows = r[budget]["rows"]
        hidden = ("out", "max_minutes", "clock", "sample_every", "snapshots")  # the protocol's own flags
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["argv"].items()
                         if k not in hidden and (k, v) != ("seed", 0))
        lines.append(f"| {name} | {flags or '(adopted recipe)'} | {r[budget]['steps']:,} | " +
                     " | ".join(f"{rows[k]['overall']:.3f}" for k in ("1", "2", "4", "8", "50")) + " | " +
                     " / ".join(f"{rows['2'][t]:.2f}" for t in TASKS) + " |")
    return "\n".join(lines)


def main():
    res = collect()
    shown = [n for n in ("flow_s0", "selfe_s0", "selfe_sc0.25_s0", "meanflow_s0") if n in res]
    if shown and not os.path.exists(os.path.join(OUT, "grid.png")):  # the methods' samples, 1-50 steps
        from scripts import benchmark
        benchmark.grid(res, argparse.Namespace(out=OUT, seed=0), shown, os.path.join(OUT, "grid.png"))
    json.dump(res, open(os.path.join(OUT, "results.json"), "w"), indent=1)
    md = ["# Few-step speedrun: 30 CPU-minutes per run, one change at a time", "",
          "Made by `python -m scripts.fewstep` from `results.json`; see `scripts/fewstep.py` for the protocol.", "",
          table(res, "30"), "", "The 15-minute snapshots (one learning-rate schedule of 30 minutes; runs stopped there by "
          "`HALF=1 scripts/fewstep_job.sh` have this row only):", "",
          table(res, "15"), ""]
    open(os.path.join(OUT, "results.md"), "w").write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
