"""The few-step speedrun's table (issue: Self-E's 1-2 step samples): collect the finished runs of
scripts/fewstep_job.sh into bench/fewstep/results.json and results.md.

    bash scripts/fewstep_job.sh selfe_ft0.25_s0 --flow-target 0.25      # one run: 30 CPU-minutes, then scored
    HALF=1 bash scripts/fewstep_job.sh selfe_ts10_s0 --time-scale 10    # or only to its 15-minute snapshot
    python -m scripts.fewstep                                           # the table
    python -m scripts.fewstep --capacity                                # network or method: bench/capacity

Every run: the adopted recipe (tiny, patch 8, Muon, lr 4e-3, batch 64, seed 0 unless its flags say otherwise)
for 30 CPU-minutes on one thread (--clock cpu), a snapshot at 15, each scored with ShapesEval on the full
prompt set (50 per task x 4 images) at 1 / 2 / 4 / 8 / 50 steps with its method's default sampler.
"""
import argparse
import json
import os
import re
import sys

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
        if not os.path.isdir(d):  # the runs' logs sit beside their folders
            continue
        evals = {e[4:]: os.path.join(d, e, "shapes_eval.json") for e in os.listdir(d) if e.startswith("eval")}
        evals = {m: path for m, path in evals.items()  # "15", "30" or "<N>steps" (other evaluations, e.g. at
                 if os.path.exists(path) and re.fullmatch(r"\d+(steps)?", m)}  # another eta, are not the run's rows)
        if not evals:
            continue
        cfg = json.load(open(os.path.join(d, "config.json")))
        files = {m: "ckpt.pt" if m == "30" else models.snapshot_name(minutes=15) if m == "15" else
                 models.snapshot_name(step=int(m[:-5])) for m in evals}
        files = {m: f if os.path.exists(os.path.join(d, f)) else "ckpt.pt" for m, f in files.items()}  # the last one
        ck = {m: models.load_checkpoint(os.path.join(d, files[m])) for m in evals}
        res[name] = dict(method=cfg["method"], argv={k: cfg[k] for k in cfg.get("given", []) if k in cfg},
                         **{m: dict(steps=ck[m]["step"], cpu_minutes=round(ck[m]["elapsed"] / 60, 2),
                                    rows=json.load(open(evals[m]))["rows"]) for m in evals})
    return dict(sorted(res.items()))


def table(res, budget="30"):
    """One row per run at this budget ("30", "15": CPU-minutes; "<N>steps": step-matched): ShapesEval overall at
    1-50 steps, the single-object spread against the renders' at 1 / 2 / 50 steps (1: the data; a collapse reads
    low; "-" where not measured), the 2-step score per task."""
    what = f"{budget} CPU-min" if budget.isdigit() else budget.replace("steps", " steps")
    lines = [f"| run ({what}) | flags | optimiser steps | 1 | 2 | 4 | 8 | 50 | spread 1 / 2 / 50 | 2 steps: " +
             " / ".join(TASKS) + " |", "|---" * 10 + "|"]
    sp = lambda row: f"{row['spread']:.2f}" if "spread" in row else "-"
    for name, r in res.items():
        if budget not in r:
            continue
        rows = r[budget]["rows"]
        hidden = ("out", "max_minutes", "clock", "sample_every", "snapshots", "max_steps", "snapshot_steps")
        flags = r.get("flags") or " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["argv"].items()
                                           if k not in hidden and (k, v) != ("seed", 0))
        lines.append(f"| {name} | {flags or '(adopted recipe)'} | {r[budget]['steps']:,} | " +
                     " | ".join(f"{rows[k]['overall']:.3f}" for k in ("1", "2", "4", "8", "50")) + " | " +
                     " / ".join(sp(rows[k]) for k in ("1", "2", "50")) + " | " +
                     " / ".join(f"{rows['2'][t]:.2f}" for t in TASKS) + " |")
    return "\n".join(lines)


def curves_at(steps):
    """The committed learning curves' rows at this optimiser step count, to sit beside a step-matched run
    (bench/curves/results.json: Self-E, MeanFlow and the paper's late fake term at 2,967 / 5,877 / 11,563 / 24,206)."""
    curves = json.load(open(os.path.join("bench", "curves", "results.json")))["curves"]
    return {f"{name} (bench/curves)": {"flags": "the committed curve", f"{steps}steps": dict(steps=steps, rows=at)}
            for name, c in curves.items() for at in c.values() if at["optimiser_steps"] == steps}


# --capacity: network or method (issue: any-step). Each method at two widths, step-matched (3,000 optimiser steps, the
# learning rate decayed over them, a snapshot at 1,500): run name per (method, width); tiny runs are the 2026-11-30
# ones, the --dim 256 runs (about 4x the parameters) are new.
CAPACITY = {("Self-E + flow target", "tiny"): ["selfe_ft0.25_s0", "selfe_ft0.25_s1"],
            ("Self-E + flow target", "dim 256"): ["cap_d256_selfe_ft0.25_s0"],
            ("MeanFlow, guidance 2", "tiny"): ["meanflow_cfg2_3k_s0", "meanflow_cfg2_3k_s1"],
            ("MeanFlow, guidance 2", "dim 256"): ["cap_d256_meanflow_cfg2_s0"],
            ("MeanFlow + iMF's v-loss, guidance 2", "tiny"): ["meanflow_cfg2_vloss_3k_s0"],
            ("flow matching", "tiny"): ["flow_3k_s0"],
            ("flow matching", "dim 256"): ["cap_d256_flow_s0"],
            ("Self-E (the paper's)", "tiny"): ["selfe_3k_s0", "selfe_3k_s1"]}
PARAMS = {"tiny": 1.80, "dim 256": 6.90}  # millions, train.py's banner on shapes' vocabulary


def capacity(res, out=os.path.join("bench", "capacity")):
    """The capacity table: ShapesEval overall at 1-50 steps, the 1- and 2-step ratios to 50 steps, the spread at
    1 / 2 / 4 / 8 (1: the renders'), per method, width and step count; seeds averaged where there are two."""
    mean = lambda xs: sum(xs) / len(xs)
    rows = []
    for (method, width), names in CAPACITY.items():
        for b in ("1500steps", "3000steps"):
            have = [res[n][b]["rows"] for n in names if n in res and b in res[n]]
            if not have:
                continue
            o = {k: mean([r[k]["overall"] for r in have]) for k in ("1", "2", "4", "8", "50")}
            spread = {k: mean([r[k]["spread"] for r in have]) for k in ("1", "2", "4", "8") if "spread" in have[0][k]}
            rows.append(dict(method=method, width=width, params_m=PARAMS[width], steps=int(b[:-5]), seeds=len(have),
                             runs=[n for n in names if n in res and b in res[n]], overall=o,
                             ratio_1_to_50=o["1"] / o["50"], ratio_2_to_50=o["2"] / o["50"], spread=spread))
    os.makedirs(out, exist_ok=True)
    json.dump(dict(protocol="STEPS=3000 bash scripts/fewstep_job.sh NAME FLAGS (one thread each, seed 0 unless named "
                            "_s1); dim 256: --dim 256 (heads 4, depth 4, patch 8); scored by evaluate.py on the full "
                            "prompt set. The 2026-12-06 runs (dim 256, flow_3k_s0, meanflow_cfg2_vloss_3k_s0 with "
                            "--meanflow-v-loss) were stopped by SIGTERM at their 1,500-step snapshot and resumed to "
                            "3,000 on 2026-12-07 (train.py --resume continues a run bit for bit); meanflow_cfg2_3k_s1 "
                            "likewise, later the same day. The tiny Self-E and MeanFlow runs are of 2026-11-30 "
                            "(Muon's Newton-Schulz in bf16); the later runs used it in fp32 (LOG.md).", rows=rows),
              open(os.path.join(out, "results.json"), "w"), indent=1)
    md = ["# Network or method: each method at two widths, step-matched", "",
          "Made by `python -m scripts.fewstep --capacity` from `results.json` (protocol there). Cells: ShapesEval "
          "overall; ratios to the same run's 50 steps; spread of single objects against the renders' (1 = the data).",
          "", "| method | width (params) | optimiser steps | seeds | 1 | 2 | 4 | 8 | 50 | 1 / 50 | 2 / 50 | spread 1 / 2 / 4 / 8 |",
          "|---" * 12 + "|"]
    for r in rows:
        md.append(f"| {r['method']} | {r['width']} ({r['params_m']:.1f}M) | {r['steps']:,} | {r['seeds']} | " +
                  " | ".join(f"{r['overall'][k]:.3f}" for k in ("1", "2", "4", "8", "50")) +
                  f" | {r['ratio_1_to_50']:.2f} | {r['ratio_2_to_50']:.2f} | " +
                  (" / ".join(f"{r['spread'][k]:.2f}" for k in ("1", "2", "4", "8")) if r["spread"] else "-") + " |")
    open(os.path.join(out, "results.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


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
          table(res, "15"), "", "Step-matched runs (`STEPS=N scripts/fewstep_job.sh`: N optimiser steps, the learning rate "
          "decayed over them, a snapshot at N / 2; the 24,206-step run: the curves' snapshot steps), 2026-11-30:", ""]
    for b in sorted({b for r in res.values() for b in r if b.endswith("steps")}, key=lambda b: -int(b[:-5])):
        md += [table({**res, **curves_at(int(b[:-5]))}, b), ""]
    open(os.path.join(OUT, "results.md"), "w").write("\n".join(md))
    print("\n".join(md))
    if "--capacity" in sys.argv[1:]:
        capacity(res)


if __name__ == "__main__":
    main()
