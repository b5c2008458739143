"""Reproduce the paper's claims in miniature: Self-E against flow matching at equal wall-clock, measured.

    python -m scripts.benchmark                                  # 30 minutes per method, then ShapesEval
    python -m scripts.benchmark --minutes 15 --out /tmp/bench15  # a shorter budget
    python -m scripts.benchmark --ablations                      # + no energy-preserving target, fake-score term,
                                                         #   and Self-E with a second seed (noise)
    nohup python -m scripts.benchmark > bench.log 2>&1 &         # unattended; the same command again resumes it
    python -m scripts.benchmark --ablations --jobs 2             # two runs at a time, one core each
    python -m scripts.benchmark --curves --minutes 120 --snapshots 15 30 60 --jobs 2   # learning curves

Both methods train the same architecture with the same batch, seed and wall-clock budget (train.py with
--max-minutes); each run resumes from its checkpoint if interrupted. Then both are scored with
ShapesEval at 1, 2, 4, 8 and 50 steps (4 images per prompt), the ablation runs at 1-8 steps, Self-E also
under sampling ablations (s_k = t_{k+1} / t_k / midpoint, eta 0 / 1, a CFG sweep), and the costs are
measured in one process. Writes <out>/results.json (every number) and results.md (the tables), and
the figures overall_vs_steps.png, ablations.png and grid.png to --assets (default: the study's folder).
Finished pieces are cached in results.json, so a re-run only does what is missing.
Budgets are CPU-minutes of each run's own process (train.py --clock cpu), so a run that shares the machine
still gets its compute.

--curves: flow matching and Self-E train side by side for --minutes, keeping snapshot checkpoints at
--snapshots minutes (one run each: the snapshots are points along one learning-rate schedule, not separate
shorter runs); every snapshot and the end are scored at 1-50 steps. Writes results.json["curves"],
<assets>/curves.png and <assets>/curves_grid.png, and whether each of the paper's claims holds at each budget
(results.json["curve_claims"]). The shipped weights are not made here: `python -m scripts.ship` is the one command
that writes checkpoints/. results.json is written only when a run adds a number to it, and atomically.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import data
import evaluate
import model as models
import sample
from scripts import runs

STEPS = [1, 2, 4, 8, 50]
RUNS = {  # name: extra train.py arguments
    "flow": ["--method", "flow"],
    "selfe": [],
    "selfe_no_ep": ["--no-energy-preserving"],      # ablation: Eq. 16 instead of the target of Eq. 20
    "selfe_fake_start": ["--fake-start", "0"],      # ablation: fake-score term from the start
    "selfe_fake_late": ["--fake-start", "0.775"],   # the paper's recipe: from 550k of 710k iterations
    "selfe_seed1": ["--seed", "1"],                 # Self-E again, another seed: how large is run-to-run noise?
    "curve_flow": ["--method", "flow"],             # --curves: the two learning curves
    "curve_selfe": [],
    "curve_meanflow": ["--method", "meanflow", "--meanflow-cfg", "2"],  # --curves: the native few-step baseline
                                                    # (paper Table 2), guidance folded in: best at 30 min (fewstep)
    "curve_selfe_fake_late": ["--fake-start", "0.775"],  # --curves: the paper's complete recipe (fake term late)
}
GRID_PROMPTS = ["a red circle", "two squares", "a blue triangle and a yellow circle", "a square left of a circle"]


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="the study's folder (default bench/curves with --curves, bench/ablations with --ablations, "
                        "else bench/compare): one study, one folder")
    p.add_argument("--assets", default=None, help="where its figures go (default: --out)")
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per run (CPU-minutes)")
    p.add_argument("--ablations", action="store_true", help="also train the Self-E ablations and a second seed (the four selfe_* runs)")
    p.add_argument("--curves", action="store_true", help="learning curves instead (see above)")
    p.add_argument("--snapshots", type=float, nargs="*", default=[15, 30, 60], help="--curves: minutes to score")
    p.add_argument("--match-steps", action="store_true",
                   help="--curves: train the missing curves to the committed Self-E curve's optimiser steps at each "
                        "budget (--max-steps, --snapshot-steps) instead of CPU-minutes: on a slower or faster machine")
    p.add_argument("--per-task", type=int, default=50, help="ShapesEval prompts per task")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at a time; with 2 on 2 cores each run gets one core (one thread)")
    p.add_argument("--train-args", default="", help="extra train.py arguments for every run")
    args = p.parse_args()
    args.out = args.out or os.path.join("bench", "curves" if args.curves else "ablations" if args.ablations else "compare")
    args.assets = args.assets or args.out
    args.steps_at = None  # --match-steps: {budget: optimiser steps}, set by curves()
    return args


def train(names, args):
    """Train the runs to their budget, args.jobs at a time (each resumes if it was interrupted);
    returns {name: training summary}."""
    todo = [n for n in names if not os.path.exists(os.path.join(args.out, "runs", n, "DONE"))]
    env = runs.threads_env(args.jobs) if args.jobs > 1 else None
    for i in range(0, len(todo), args.jobs):
        procs = []
        for name in todo[i:i + args.jobs]:
            out = os.path.join(args.out, "runs", name)
            curve = name.startswith("curve_")
            if curve and args.steps_at:  # --match-steps: the committed Self-E curve's steps, whatever the time
                *snaps, last = args.steps_at.values()
                budget = ["--max-steps", str(last), "--max-minutes", "0", "--clock", "cpu",
                          "--snapshot-steps", *map(str, snaps)]
            else:
                budget = ["--max-minutes", str(args.minutes), "--clock", "cpu",
                          *(["--snapshots", *map(str, args.snapshots)] if curve else [])]
            flags = [*budget, "--seed", str(args.seed), "--sample-every", "0", *RUNS[name], *args.train_args.split()]
            cmd = runs.train_cmd(out, flags)
            print(" ".join(cmd), flush=True)
            procs.append((name, out, subprocess.Popen(cmd, env=env)))
        for name, out, p in procs:
            if p.wait() != 0:
                raise SystemExit(f"error: training {name} did not finish (exit {p.returncode}: stopped by a "
                                 f"signal, saved, if > 128); run the same command again to resume it")
            open(os.path.join(out, "DONE"), "w").close()
    return {name: runs.summary(os.path.join(args.out, "runs", name)) for name in names}


def score(name, args, steps=STEPS, ckpt="ckpt.pt", **opts):
    net, tok, cfg = sample.load(os.path.join(args.out, "runs", name, ckpt))
    gen = sample.make_generate(net, tok, cfg, **opts)
    return evaluate.evaluate(gen, steps, args.per_task, args.n, cfg["image_size"], args.seed)


def cost(args):
    """Step-time ratio Self-E / flow at the same batch, sampling images/s per step count, peak memory."""
    import losses
    torch.manual_seed(0)
    net, ema, x0, ids, null = tiny_setup()
    opt = torch.optim.Adam(net.parameters())
    g = torch.Generator().manual_seed(0)

    def step(method):
        t = losses.sample_t(len(x0), 0.4, g)
        eps, eps2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
        t0 = time.perf_counter()
        step_loss(method, net, ema, x0, ids, null, t, eps, eps2, g).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    times = {"flow": [], "selfe": []}
    for i in range(24):  # interleaved, so that machine load hits both alike; the first rounds warm up
        for m in times:
            dt = step(m)
            if i >= 4:
                times[m].append(dt)
    out = {f"step_seconds_{m}": float(np.median(v)) for m, v in times.items()}
    out["step_time_ratio_selfe_over_flow"] = out["step_seconds_selfe"] / out["step_seconds_flow"]
    net.eval()
    gen = sample.make_generate(net, data.Tokenizer(data.train_tokenizer(data.shapes_captions(500)).json, 16),
                               dict(method="selfe", image_size=32, mu=None), omega=2.0)
    prompts = ["a red circle"] * 256
    for steps in STEPS:
        gen(prompts[:32], steps)
        t0 = time.perf_counter()
        gen(prompts, steps)
        out[f"sample_img_per_s_{steps}"] = 256 / (time.perf_counter() - t0)
    out["sample_speedup_1_over_50"] = out["sample_img_per_s_1"] / out["sample_img_per_s_50"]
    for m in ("flow", "selfe"):  # peak memory of a training step, each in a fresh process
        out[f"step_peak_rss_increase_mb_{m}"] = peak_memory(m)
    return out


def peak_memory(method):
    """MB by which a few training steps of `method` raise a fresh process's peak memory (peak_memory_child)."""
    code = f"from scripts import benchmark; benchmark.peak_memory_child({method!r})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    if r.returncode != 0:
        raise SystemExit(f"error: the memory probe of {method} failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.split()[-1])


def peak_memory_child(method):
    """Run in a fresh process: a few training steps; print how much they raised the process's peak resident
    memory, in MB (peak after the steps minus peak before them)."""
    import losses
    net, ema, x0, ids, null = tiny_setup()
    before = peak_rss_kb()
    for _ in range(3):
        t = losses.sample_t(len(x0), 0.4)
        step_loss(method, net, ema, x0, ids, null, t, torch.randn_like(x0), torch.randn_like(x0)).backward()
    print((peak_rss_kb() - before) / 1024)


def tiny_setup(B=64):
    """The default CPU model, its EMA and one batch of the shapes size (batch B, 32 px, 16 text tokens)."""
    import copy
    import model as models
    net = models.build("tiny", 128, 16, 32)
    ema = copy.deepcopy(net).requires_grad_(False)
    x0, ids, null = torch.randn(B, 3, 32, 32), torch.randint(1, 128, (B, 16)), torch.zeros(1, 16, dtype=torch.long)
    return net, ema, x0, ids, null


def step_loss(method, net, ema, x0, ids, null, t, eps, eps2, g=None):
    """The training loss of one batch for either method (s drawn with tau = 1 for Self-E)."""
    import losses
    tok = lambda captions: null.expand(len(captions), -1)  # the methods only ask it for the null prompt here
    if method == "flow":
        return losses.FlowMatching(tok, 0.0).step_loss(net, x0, ids, t, eps=eps)[0]
    s, jump = losses.sample_s(t, 1.0, g)
    return losses.SelfE(tok, 0.0, ema, net).step_loss(net, x0, ids, t, s, jump, eps, eps2)[0]


def peak_rss_kb():
    """This process's peak resident memory (Linux VmHWM; ru_maxrss would carry the parent's over fork+exec)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def targets(res):
    """The paper's claims in miniature, each with its numbers and whether it holds."""
    s, f = res["eval"]["selfe"], res["eval"]["flow"]
    o = lambda r, k: r[str(k)]["overall"]
    mono = all(o(s, a) <= o(s, b) + 0.02 for a, b in zip(STEPS, STEPS[1:]))
    return {
        "selfe@2 >= 2 x flow@2": [o(s, 2), o(f, 2), o(s, 2) >= 2 * o(f, 2)],
        "selfe@2 >= 0.9 x selfe@50": [o(s, 2), o(s, 50), o(s, 2) >= 0.9 * o(s, 50)],
        "selfe@50 >= flow@50 - 0.02": [o(s, 50), o(f, 50), o(s, 50) >= o(f, 50) - 0.02],
        "selfe non-decreasing in steps (within 0.02)": [[o(s, k) for k in STEPS], mono],
        "selfe@1 >= 0.7 x selfe@50": [o(s, 1), o(s, 50), o(s, 1) >= 0.7 * o(s, 50)],
        "selfe@8 >= 0.6": [o(s, 8), o(s, 8) >= 0.6],
        **({f"selfe@{k} >= meanflow@{k}": [o(s, k), o(m, k), o(s, k) >= o(m, k)] for k in (1, 2)}
           if (m := res["eval"].get("meanflow")) else {}),
        **({f"late fake term helps: selfe_fake_late@{k} > selfe@{k}": [o(fl, k), o(s, k), o(fl, k) > o(s, k)]
            for k in (1, 2)} if (fl := res["eval"].get("selfe_fake_late")) else {}),
    }


def write_report(res, args):
    where = "one run at a time" if args.jobs == 1 else f"{args.jobs} runs at a time, the cores shared evenly"
    lines = [f"# Self-E vs flow matching on ShapesEval ({args.minutes:g} minutes per run, {where})", "",
             "Command: `python -m scripts.benchmark " + "".join(f" {a}" for a in sys.argv[1:]) + "`", "",
             f"Machine: {res['machine']}", ""]
    lines += ["## Training", "", "| run | steps | minutes | img/s | final loss |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['minutes']} | {v['img_per_s']} | {v['final_loss']:.4f} |"
              for k, v in res["train"].items()]
    for name, rows in res["eval"].items():
        lines += ["", f"## {name}", "", evaluate.table({**rows, **res["reference"]})]
    for name, rows in res.get("sampling", {}).items():
        lines += ["", f"## sampling ablation: {name}", "", evaluate.table(rows)]
    lines += ["", "## Targets", ""] + [f"- {k}: {v[:-1]} -> {'PASS' if v[-1] else 'MISS'}"
                                         for k, v in res.get("targets", {}).items()]
    if "cost" in res:
        lines += ["", "## Cost (this machine)", ""] + [f"- {k}: {v:.3f}" for k, v in res["cost"].items()]
    open(os.path.join(args.out, "results.md"), "w").write("\n".join(lines) + "\n")


def grid(res, args, names=("flow", "selfe"), path=None):
    """Rows: a few prompts; columns: 1, 2, 4, 8, 50 steps; one block per method."""
    from PIL import Image, ImageDraw
    blocks = []
    for name in names:
        net, tok, cfg = sample.load(os.path.join(args.out, "runs", name, "ckpt.pt"))
        gen = sample.make_generate(net, tok, cfg)
        images = {}
        for steps in STEPS:
            torch.manual_seed(args.seed)
            images[steps] = data.to_uint8(gen([p for p in GRID_PROMPTS for _ in range(2)], steps))
        g = sample.grid_image(images, GRID_PROMPTS, STEPS, 2)
        title = Image.new("RGB", (g.width, 18), (255, 255, 255))
        label = {"flow": "flow matching", "selfe": "Self-E", "meanflow": "MeanFlow"}[cfg["method"]]
        if cfg.get("fake_start") is not None:
            label += f", fake-score term from {cfg['fake_start']:g} of training"
        if cfg.get("meanflow_cfg", 1.0) != 1.0:
            label += f", guidance {cfg['meanflow_cfg']:g} folded in"
        if cfg.get("shortcut"):
            label += f", {cfg['shortcut']:g} of the jumps on the shortcut target (ours)"
        if cfg.get("flow_target"):
            label += f", {cfg['flow_target']:g} of the jumps on the flow target, {cfg['flow_steps']} steps (ours)"
        ImageDraw.Draw(title).text((4, 3), label, fill=(0, 0, 0))
        blocks += [title, g]
    out = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), (255, 255, 255))
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    out.save(path or os.path.join(args.assets, "grid.png"))


def curves(res, args, save):
    """Train the learning-curve runs that results.json lacks, score each snapshot and the end, judge the claims at
    each budget. With --match-steps every budget is the committed Self-E curve's optimiser steps at that budget."""
    res.setdefault("curves", {})
    names = ["curve_flow", "curve_selfe", "curve_meanflow", "curve_selfe_fake_late"]
    budgets = sorted({*args.snapshots, args.minutes})
    todo = [n for n in names if any(f"{m:g}" not in res["curves"].get(n, {}) for m in budgets)]
    args.steps_at = {m: res["curves"]["curve_selfe"][f"{m:g}"]["optimiser_steps"] for m in budgets} \
        if args.match_steps else None
    if todo:
        res["train"] = {**res.get("train", {}), **train(todo, args)}
        save()
    else:
        print("every curve is scored at every budget in results.json: nothing to train or score")
    for name in todo:
        for m in budgets:
            if f"{m:g}" in res["curves"].setdefault(name, {}):
                continue
            path = "ckpt.pt" if m == args.minutes else models.snapshot_name(step=args.steps_at[m]) if args.steps_at \
                else models.snapshot_name(minutes=m)
            ck = models.load_checkpoint(os.path.join(args.out, "runs", name, path))
            res["curves"][name][f"{m:g}"] = dict(score(name, args, ckpt=path), optimiser_steps=ck["step"],
                                                 images=ck["step"] * ck["config"]["batch_size"],
                                                 cpu_minutes=round(ck["elapsed"] / 60, 1),
                                                 steps_matched_to_selfe=bool(args.steps_at))
            print(name, m, json.dumps({k: round(v["overall"], 3) for k, v in res["curves"][name][f"{m:g}"].items()
                                       if isinstance(v, dict)}), flush=True)
            save()
    if not todo:
        return
    res["curve_claims"] = claims_by_budget(res["curves"], budgets)
    plot_curves(res, budgets, os.path.join(args.assets, "curves.png"))
    here = [n for n in names if os.path.exists(os.path.join(args.out, "runs", n, "ckpt.pt"))]  # runs made elsewhere:
    if here:                                                                                  # no picture of them
        grid(res, args, names=here, path=os.path.join(args.assets, "curves_grid.png" if here == names
                                                      else f"curves_grid_{'_'.join(n[6:] for n in here)}.png"))
    save()


def claims_by_budget(curves, budgets):
    """{claim: {"first": the first budget (minutes, as a string) at which it holds, or None, "at": {budget: holds}}}.
    A claim is judged only where Self-E's 50-step score is at least 0.1 (else "at" says None): below that both
    methods draw noise and 0 >= 2 x 0 'holds'. "at" shows a claim that holds early and is lost later."""
    out = {}
    for m in (f"{b:g}" for b in budgets):
        runs_at = {k[len("curve_"):]: v[m] for k, v in curves.items() if m in v}
        verdicts = targets({"eval": runs_at})
        judged = curves["curve_selfe"][m]["50"]["overall"] >= 0.1
        for claim, v in verdicts.items():
            c = out.setdefault(claim, {"first": None, "at": {}})
            c["at"][m] = bool(v[-1]) if judged else None
            if c["first"] is None and c["at"][m]:
                c["first"] = m
    return out


def plot_curves(res, budgets, path):
    """ShapesEval overall against CPU-minutes: colour = step count, solid = Self-E, dashed = flow matching."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, steps in enumerate(STEPS):
        for name, style, label in (("curve_selfe", "-", "Self-E"), ("curve_flow", "--", "flow"),
                                   ("curve_meanflow", ":", "MeanFlow"), ("curve_selfe_fake_late", "-.", "Self-E+fake")):
            have = [m for m in budgets if f"{m:g}" in res["curves"].get(name, {})]
            y = [res["curves"][name][f"{m:g}"][str(steps)]["overall"] for m in have]
            if have:
                ax.plot(have, y, style, marker="o", color=f"C{i}", label=f"{label} {steps} step{'s' * (steps > 1)}")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [f"{m:g}" for m in budgets])
    ax.set_xlabel("training CPU-minutes (one core)")
    ax.set_ylabel("ShapesEval overall")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = get_args()
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    path = os.path.join(args.out, "results.json")
    res = json.load(open(path)) if os.path.exists(path) else {}

    def save():  # called when a run adds a number: the numbers, with the machine and the arguments that made them
        res["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        res["curve_args" if args.curves else "args"] = vars(args)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
    if args.curves:
        os.makedirs(args.assets, exist_ok=True)
        curves(res, args, save)
        return print(json.dumps(res["curve_claims"], indent=1))
    names = ["flow", "selfe", "selfe_no_ep", "selfe_fake_start", "selfe_fake_late", "selfe_seed1"] \
        if args.ablations else ["flow", "selfe"]
    res["train"] = {**res.get("train", {}), **train(names, args)}
    save()
    if "reference" not in res:
        res["reference"] = evaluate.floor_rows(args.per_task, args.n)
        save()
    for name in names:  # the ablation runs at 1-8 steps: 50 steps would add ~4 CPU-minutes each
        if name not in res.setdefault("eval", {}):
            res["eval"][name] = score(name, args, steps=STEPS if name in ("flow", "selfe") else STEPS[:-1])
            print(name, json.dumps({k: round(v["overall"], 3) for k, v in res["eval"][name].items()}), flush=True)
            save()
    sampling = {"s_k = t_k (same)": dict(s_mode="same"), "s_k = midpoint": dict(s_mode="mid"),
                "eta = 0": dict(eta=0.0), "eta = 1": dict(eta=1.0),
                **{f"cfg = {w:g}": dict(omega=w) for w in (1.0, 2.0, 3.0, 5.0)}}
    selfe_cfg = json.load(open(os.path.join(args.out, "runs", "selfe", "config.json")))  # the run's train.py config
    for label, opts in sampling.items():
        if sample.sampling_defaults(selfe_cfg, **opts) == sample.sampling_defaults(selfe_cfg):
            continue  # the default sampler: that is Self-E's main row
        if label not in res.setdefault("sampling", {}):
            res["sampling"][label] = score("selfe", args, steps=STEPS[:-1], **opts)
            save()
    res["targets"] = targets(res)
    if "cost" not in res:
        res["cost"] = cost(args)
    save()
    os.makedirs(args.assets, exist_ok=True)
    evaluate.plot({n: res["eval"][n] for n in ("flow", "selfe")}, os.path.join(args.assets, "overall_vs_steps.png"),
                  reference=res["reference"]["reference"]["overall"],
                  title=f"ShapesEval, {args.minutes:g} training minutes per run")
    if args.ablations:
        evaluate.plot({n: res["eval"][n] for n in names if n != "flow"}, os.path.join(args.assets, "ablations.png"),
                      title=f"Self-E ablations, {args.minutes:g} training minutes per run")
    grid(res, args)
    write_report(res, args)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
