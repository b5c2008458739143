"""The recipe search, run as a speedrun: a fixed CPU budget per run, one change at a time against the baseline.

    nohup python -m scripts.search > search.log 2>&1 &   # every config in bench/search/configs.json; resumes
    python -m scripts.search --only base p8_muon         # just these
    python -m scripts.search --full flow_p8 flow_p8_seed1  # finished runs again on the full prompt set

Each config trains flow matching (train.py --method flow) for --minutes of CPU time (--clock cpu: a run
that shares the CPU still gets the same compute), two runs at a time with one thread each, then is scored
with ShapesEval at 1, 2 and 50 steps on a smaller prompt set (--per-task 20, 4 images each: 480 images).
Writes bench/search/results.json (every number, cached: a re-run does only what is missing) and bench/search/results.md.
"""
import argparse
import json
import os
import subprocess

import data
from scripts import runs

# The configs and the baseline they start from are data, beside their results: bench/search/configs.json
# ({"baseline": flags, "configs": {name: {"flags", "why", "round", "removed"?}}}). Not every config has run.
CONFIGS_FILE = os.path.join("bench", "search", "configs.json")
_spec = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CONFIGS_FILE)))
BASELINE = _spec["baseline"]
CONFIGS = {name: c["flags"] for name, c in _spec["configs"].items() if "removed" not in c}


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/search")
    p.add_argument("--only", nargs="+", default=None, help="names of CONFIGS to run (default: all)")
    p.add_argument("--minutes", type=float, default=15.0, help="CPU-minutes of training per run")
    p.add_argument("--per-task", type=int, default=20)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 50])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--method", default="flow", choices=["flow", "selfe"])
    p.add_argument("--full", nargs="+", default=None, metavar="RUN",
                   help="instead: score these finished runs (e.g. flow_p8 flow_p8_seed1) on 50 prompts per task")
    args = p.parse_args()
    res = os.path.join(args.out, "results.json")
    missing = set(args.full or []) - set(json.load(open(res)) if os.path.exists(res) else {})
    if missing:
        p.error(f"--full: no finished run(s) {sorted(missing)} in {res}")
    unknown = set(args.only or []) - set(CONFIGS)
    if unknown:
        p.error(f"unknown config(s) {sorted(unknown)}; choose from {list(CONFIGS)}")
    return args


def run_one(name, args):
    """Train (or resume) then score one config; returns the Popen of a shell doing both (or of `true`, when
    the run is already trained and scored)."""
    out = os.path.join(args.out, "runs", f"{args.method}_{name}")
    if os.path.exists(os.path.join(out, "shapes_eval.json")):
        return out, subprocess.Popen(["true"])
    train = runs.train_cmd(out, ["--method", args.method, "--max-minutes", str(args.minutes), "--clock", "cpu",
                                 "--sample-every", "0", *BASELINE, *CONFIGS[name]])
    score = runs.eval_cmd(os.path.join(out, "ckpt.pt"), out, args.per_task, args.n, args.steps)
    cmd = " ".join(train) + " > " + os.path.join(out + ".log") + " 2>&1 && " + " ".join(score) + " >> " + \
        os.path.join(out + ".log") + " 2>&1"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(cmd, flush=True)
    return out, subprocess.Popen(cmd, shell=True, env=runs.threads_env(args.jobs))


def score_full(names, res, args):
    """The top configs' runs again on the full prompt set (50 per task, 4 images), two at a time."""
    todo = [n for n in names if "full" not in res[n]]
    for i in range(0, len(todo), args.jobs):
        procs = []
        for name in todo[i:i + args.jobs]:
            run = os.path.join(args.out, "runs", name)
            cmd = runs.eval_cmd(os.path.join(run, "ckpt.pt"), os.path.join(run, "full"), 50, 4, args.steps)
            procs.append((name, run, subprocess.Popen(cmd, env=runs.threads_env(args.jobs), stdout=subprocess.DEVNULL)))
        for name, run, p in procs:
            if p.wait() != 0:
                raise SystemExit(f"error: scoring {name} failed (exit {p.returncode})")
            res[name]["full"] = json.load(open(os.path.join(run, "full", "shapes_eval.json")))["rows"]
            print(f"{name}: {res[name]['full']['50']['overall']:.3f} at 50 steps, full prompt set", flush=True)
    return res


def summary(out):
    """runs.summary, with the config's flags and its ShapesEval rows."""
    method, name = os.path.basename(out).split("_", 1)
    return dict(args=(["--method", "selfe"] if method == "selfe" else []) + _spec["configs"][name]["flags"],
                rows=json.load(open(os.path.join(out, "shapes_eval.json")))["rows"], **runs.summary(out))


def write_report(res, path):
    """results.md: one table per method, best first."""
    md = ["# Recipe search: 15 CPU-minutes per run, ShapesEval on 20 prompts per task x 4 images", "",
          "`python -m scripts.search` (one change at a time from `BASELINE`, tiny before the search: patch 4, Adam, lr 1e-3;",
          "`vs base` = against it, seed 0; images per CPU-second = optimiser steps x batch / CPU-seconds)", ""]
    for method, title in (("flow", "Flow matching"), ("selfe", "Self-E (`python -m scripts.search --method selfe`)")):
        runs = {k: v for k, v in res.items() if k.startswith(method + "_")}
        if runs:
            md += [f"## {title}", "", table(runs, method), ""]
    full = {k: v for k, v in res.items() if "full" in v}
    if full:
        md += ["## The top configs again, on the full prompt set (`--full`: 50 prompts per task x 4 images)", "",
               "| run | args | 1 step | 2 steps | 50 steps | per task @50 |", "|---|---|---|---|---|---|"]
        for name, r in sorted(full.items(), key=lambda kv: -kv[1]["full"]["50"]["overall"]):
            rows = r["full"]
            md.append(f"| {name} | `{' '.join(r['args'])}` | {rows['1']['overall']:.3f} | "
                      f"{rows['2']['overall']:.3f} | {rows['50']['overall']:.3f} | {per_task(rows['50'])} |")
        md.append("")
    open(path, "w").write("\n".join(md))


def per_task(row):
    return " / ".join(f"{row[t]:.2f}" for t in data.TASKS)


def table(res, method):
    base = res.get(f"{method}_base", {}).get("rows", {}).get("50", {}).get("overall")
    lines = ["| config | args | optimiser steps | images per CPU-second | 1 step | 2 steps | 50 steps | vs base | "
             "swd@50 | per task @50 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(res.items(), key=lambda kv: -kv[1]["rows"]["50"]["overall"]):
        rows = r["rows"]
        tasks = per_task(rows["50"])
        d = f"{rows['50']['overall'] - base:+.3f}" if base is not None else ""
        rate = r["steps"] * r["batch"] / (r.get("cpu_minutes", r.get("minutes")) * 60)  # wall-clock img/s depends on what else ran
        lines.append(f"| {name} | `{' '.join(r['args'])}` | {r['steps']} | {rate:.0f} | "
                     f"{rows['1']['overall']:.3f} | {rows['2']['overall']:.3f} | {rows['50']['overall']:.3f} | {d} | "
                     f"{rows['50']['swd']:.2f} | {tasks} |")
    return "\n".join(lines)


def main():
    args = get_args()
    path = os.path.join(args.out, "results.json")
    res = json.load(open(path)) if os.path.exists(path) else {}
    if args.full:
        res = score_full(args.full, res, args)
        json.dump(res, open(path, "w"), indent=1)
        return write_report(res, os.path.join(args.out, "results.md"))
    todo = [n for n in (args.only or CONFIGS) if f"{args.method}_{n}" not in res]
    for i in range(0, len(todo), args.jobs):
        procs = [run_one(name, args) for name in todo[i:i + args.jobs]]
        for out, p in procs:
            if p.wait() != 0:
                print(f"error: {out} failed; see {out}.log; the same command resumes it", flush=True)
                continue
            res[os.path.basename(out)] = summary(out)
            json.dump(res, open(path, "w"), indent=1)
            write_report(res, os.path.join(args.out, "results.md"))
            print(f"{out}: {res[os.path.basename(out)]['rows']['50']['overall']:.3f} at 50 steps", flush=True)


if __name__ == "__main__":
    main()
