"""The few-step lab: every method on a labelled 2-D mixture, trained to a plateau in a CPU-minute or two, with the
project's own losses.py, levers.py and sampler.py. Both of Self-E's few-step failures show here at convergence.

    python -m scripts.toy                                   # README's picture: assets/toy.png (bench/toy/toy.json)
    python -m scripts.toy --lab selfe flow meanflow --seeds 0 1   # lab runs -> bench/toy/lab/VARIANT_sSEED_STEPS.json
    python -m scripts.toy --table                           # bench/toy/lab/*.json -> bench/toy/lab.md

The data: six modes on a circle of radius 1 (std 0.05). Each of three labels owns one mode (drawn 60% of the time)
and shares the two modes beside it with its neighbours (20% each). A "prompt" is a label; the empty prompt is
the unconditional mixture; "fake image k" is label k's fake-score prompt. The network is a small MLP with the DiT's
two time inputs (t and s); it sees a point as a 2 x 1 x 1 "image", so every loss and the sampler are the project's
own code, unchanged.

Metrics (`metrics`), per label and averaged, 400 samples per label, the same starting noise at every step count:
dist, the mean distance to the nearest of the label's modes; tv, the total variation between the histogram over
the six modes (each sample to its nearest mode) and the label's 0.6 / 0.2 / 0.2; off, the share of samples
farther than 0.25 from every mode; energy, the energy distance to 4,000 fresh points of the label (it sees
over-tight modes and wrong weights alike). `floor` is fresh data's own values (400 points per label).
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn

import levers
import losses
from model import G, TimeMLP, ema_update, velocity
from sampler import DEFAULTS, sample, schedule

LABELS = 3
MODES = torch.tensor([[math.cos(a), math.sin(a)] for a in torch.arange(6) * math.pi / 3])  # (6, 2)
OWN, SHARED, SPREAD = 0.6, 0.2, 0.05  # label k: mode 2k with 0.6, modes 2k +- 1 with 0.2 each
STEPS = (1, 2, 4, 8, 50)               # the sampler's step counts the lab scores
OUT = "bench/toy"

# The lab's variants: a method and its options, as train.py would build them (the demo: the first four).
# "selfe" options are losses.SelfE's, "levers" options levers.Levers' (ours); eta: the sampler's, else the method's.
VARIANTS = {
    "flow": dict(method="flow"),
    "selfe": dict(method="selfe"),
    "meanflow": dict(method="meanflow", p=0.0),  # plain L2: the adaptive weight is mode-seeking in 2-D (LOG.md)
    "meanflow_vloss": dict(method="meanflow", p=0.0, v_loss=True),  # improved MeanFlow's v-loss (--meanflow-v-loss)
    "selfe_flowtgt": dict(method="levers", flow_target=0.25, flow_steps=8),
    "selfe_eta0": dict(method="selfe", eta=0.0),
    "selfe_fake": dict(method="selfe", fake_start=0.3),
    "selfe_fake_k0": dict(method="selfe", fake_start=0.3, k=0.0),
    "selfe_shortcut": dict(method="levers", shortcut=0.25),
    "selfe_flowtgt_k4": dict(method="levers", flow_target=0.25, flow_steps=4),
    "selfe_flowtgt_k16": dict(method="levers", flow_target=0.25, flow_steps=16),
    "selfe_flowtgt_eta0": dict(method="levers", flow_target=0.25, flow_steps=8, eta=0.0),
    "selfe_flowtgt_half": dict(method="levers", flow_target=0.5, flow_steps=8),
    "selfe_flowtgt_below0": dict(method="levers", flow_target=0.25, flow_steps=8, flow_below=0.0),
    "selfe_flowtgt_below03": dict(method="levers", flow_target=0.25, flow_steps=8, flow_below=0.3),
    "selfe_flowtgt_below1": dict(method="levers", flow_target=0.25, flow_steps=8, flow_below=1.0),  # every jump
    "selfe_flowtgt_t1": dict(method="levers", flow_target=0.25, flow_steps=8, flow_t="one"),
    # issue 30, parts 2-3 (2026-12-07): every jump on the flow target with the deterministic sampler (the levers tried
    # beside these, rejected, left the code; their records stay in lab/, LOG.md names the commit that had them)
    "selfe_flowtgt_below1_eta0": dict(method="levers", flow_target=0.25, flow_below=1.0, eta=0.0),
    "selfe_flowtgt_below1_t1_eta0": dict(method="levers", flow_target=0.25, flow_below=1.0, flow_t="one", eta=0.0),
    # part 3's distribution-matching direction: the paper's fake-score term (Eq. s.6) on top of the flow target
    "selfe_flowtgt_fake": dict(method="levers", flow_target=0.25, fake_start=0.3),
    "selfe_flowtgt_fake_k0": dict(method="levers", flow_target=0.25, fake_start=0.3, k=0.0),  # real minus fake only
}


def label_modes(k):
    """Indices of label k's modes (k = 1..LABELS): its own, then the two it shares."""
    own = 2 * (k - 1)
    return [own, (own - 1) % 6, (own + 1) % 6]


def draw(B, g, labels=None):
    """B points (B, 2, 1, 1) of the mixture and their labels as strings (the captions); labels: fixed (B,) or drawn."""
    labels = torch.randint(1, LABELS + 1, (B,), generator=g) if labels is None else labels
    u = torch.rand(B, generator=g)
    which = torch.where(u < OWN, 0, torch.where(u < OWN + SHARED, 1, 2))
    idx = torch.tensor([label_modes(k)[w] for k, w in zip(labels.tolist(), which.tolist())])
    x = MODES[idx] + SPREAD * torch.randn(B, 2, generator=g)
    return x.view(B, 2, 1, 1), [str(k) for k in labels.tolist()]


def tok(captions):
    """Captions -> ids (B, 1): '' -> 0 (the null prompt), 'k' -> k, 'fake image k' -> LABELS + k,
    'fake image' alone (a dropped caption's fake prompt) -> 2 LABELS + 1."""
    def one(c):
        c = c.strip()
        if c.startswith(losses.FAKE_PROMPT):
            rest = c[len(losses.FAKE_PROMPT):].strip()
            return LABELS + int(rest) if rest else 2 * LABELS + 1
        return int(c) if c else 0
    return torch.tensor([[one(c)] for c in captions])


class ToyNet(nn.Module):
    """V(x_t, t, s, c) for 2-D points: an MLP that predicts x0 (V = (x_t - x0_hat) / t, as the DiT does),
    conditioned on MLP_t(t) + MLP_s(t - s) + a prompt embedding. time_scale: the sinusoid's, as the DiT's."""

    def __init__(self, width=128, time_scale=1000.0):
        super().__init__()
        self.t_embed, self.s_embed = TimeMLP(width, scale=time_scale), TimeMLP(width, scale=time_scale)
        self.label = nn.Embedding(2 * LABELS + 2, width)
        self.mlp = nn.Sequential(nn.Linear(2 + width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, s, ids):
        c = self.t_embed(t) + self.s_embed(t - s) + self.label(ids[:, 0])       # (B, width)
        x0_hat = self.mlp(torch.cat([x.flatten(1), c], 1)).view_as(x)           # (B, 2, 1, 1)
        return velocity(x, t, x0_hat)


def make_method(variant, net, ema, g):
    """The method object of a variant, built as train.py builds it (mu 0: no resolution shift for two numbers)."""
    opts = {k: v for k, v in VARIANTS[variant].items() if k not in ("method", "eta")}
    method = VARIANTS[variant]["method"]
    if method == "flow":
        return losses.FlowMatching(tok, 0.0, generator=g)
    if method == "meanflow":
        return losses.MeanFlow(tok, 0.0, net, generator=g, **opts)
    cls = levers.Levers if method == "levers" else losses.SelfE
    return cls(tok, 0.0, ema, net, tau_anneal=0.3, generator=g, **opts)


def sampler_of(variant):
    """(the sampler's method defaults, eta) of a variant: MeanFlow's own, Self-E's for Self-E and its levers."""
    method = VARIANTS[variant]["method"]
    d = DEFAULTS["selfe" if method == "levers" else method]
    return d, VARIANTS[variant].get("eta", d["eta"])


def train(variant, steps=6000, B=256, seed=0, lr=2e-3, every=1000, on_eval=None):
    """Train one variant on the mixture; returns the EMA network. on_eval(step, ema) every `every` steps."""
    torch.manual_seed(seed)
    net = ToyNet(time_scale=10.0 if VARIANTS[variant]["method"] == "meanflow" else 1000.0)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    m = make_method(variant, net, ema, g)
    for step in range(steps):
        x0, captions = draw(B, g)
        loss, _ = m.loss(net, x0, captions, step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, net, 0.99, step)
        if on_eval and (step + 1) % every == 0:
            on_eval(step + 1, ema)
    return ema


def generate(net, variant, steps, n=400, seed=123):
    """n samples per label at this step count, from the same starting noise at every count:
    (points (LABELS * n, 2), labels (LABELS * n,))."""
    labels = torch.arange(1, LABELS + 1).repeat_interleave(n)
    d, eta = sampler_of(variant)
    x = sample(net, labels.view(-1, 1), torch.zeros(1, 1, dtype=torch.long), steps, 0.0, (2, 1, 1),
               eta=eta, s_mode=d["s_mode"], generator=torch.Generator().manual_seed(seed))
    return x.flatten(1), labels


def distance_to_modes(points, labels):
    """Mean distance from each sample to the nearest mode of its own label."""
    own = torch.stack([MODES[label_modes(k)] for k in labels.tolist()])          # (N, 3, 2)
    return (points[:, None] - own).norm(dim=-1).min(1).values.mean().item()


def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (squared energy distance; 0 iff the laws agree)."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


REFERENCE = None


def reference():
    """4,000 fresh points per label (fixed seed): what `energy` compares with."""
    global REFERENCE
    if REFERENCE is None:
        g = torch.Generator().manual_seed(999)
        REFERENCE = {k: draw(4000, g, torch.full((4000,), k))[0].flatten(1) for k in range(1, LABELS + 1)}
    return REFERENCE


def metrics(points, labels):
    """dist / tv / off / energy of samples (N, 2) with labels (N,), averaged over the labels (module docstring)."""
    d = (points[:, None] - MODES).norm(dim=-1)                                   # (N, 6)
    near, nearest = d.min(1)
    tv, energy = 0.0, 0.0
    for k in range(1, LABELS + 1):
        mine = labels == k
        hist = torch.bincount(nearest[mine], minlength=6).float() / mine.sum()
        true = torch.zeros(6)
        true[label_modes(k)] = torch.tensor([OWN, SHARED, SHARED])
        tv += 0.5 * (hist - true).abs().sum().item() / LABELS
        energy += energy_distance(points[mine], reference()[k]) / LABELS
    return dict(dist=round(distance_to_modes(points, labels), 4), tv=round(tv, 4),
                off=round((near > 0.25).float().mean().item(), 4), energy=round(energy, 4))


def floor(n=400, seed=7):
    """The metrics of fresh data, n points per label: the best a sampler can do."""
    labels = torch.arange(1, LABELS + 1).repeat_interleave(n)
    x, _ = draw(len(labels), torch.Generator().manual_seed(seed), labels)
    return metrics(x.flatten(1), labels)


def score(net, variant):
    """{steps: metrics} at every step count of STEPS."""
    return {str(k): metrics(*generate(net, variant, k)) for k in STEPS}


@torch.no_grad()
def probe(net, variant, n=4000, K=8, seed=5):
    """The lab's `diagnose --lastjump`: has the last jump learned its flow teacher, and do the middle jumps leave
    the ODE? On n fresh points per jump, RMS distances (per coordinate) between clean-sample predictions:
    last_vs_flow, teacher_vs_flow, last_vs_teacher for the 2-step sampler's last jump t_1 = 0.5 -> 0 (flow: the
    flow head G(x_t, t, t, c) ~ E[x0 | x_t, c]; teacher: where K Euler steps of the flow head land, the flow
    target), and middle_vs_teacher for the 4-step sampler's middle jump 0.75 -> 0.5 (the same comparison: how far
    self-evaluation moves a middle jump off the ODE). first_jump_then4: the metrics of the 2-step sample's first
    jump finished by 4 deterministic flow-head steps (diagnose's first_jump_then)."""
    g = torch.Generator().manual_seed(seed)
    rms = lambda d: round(d.pow(2).mean().sqrt().item(), 4)
    out = {}
    for name, t_, s_ in (("last", 0.5, 0.0), ("middle", 0.75, 0.5)):
        x0, captions = draw(n, g)
        ids, t, s = tok(captions), torch.full((n,), t_), torch.full((n,), s_)
        x_t = losses.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        jump = x_t - losses.bcast(t - s) * net(x_t, t, s, ids)                         # x_s (s = 0: G(x_t, t, 0, c))
        teacher = x_t - losses.bcast(t - s) * levers.flow_target(net, x_t, t, s, ids, K)   # x_s' (the ODE's)
        if name == "last":
            flow = G(net, x_t, t, t, ids)
            out.update(last_vs_flow=rms(jump - flow), teacher_vs_flow=rms(teacher - flow),
                       last_vs_teacher=rms(jump - teacher), posterior_spread=rms(x0 - flow))
        else:
            out["middle_vs_teacher"] = rms(jump - teacher)
    labels = torch.arange(1, LABELS + 1).repeat_interleave(400)
    d, eta = sampler_of(variant)
    x = sample(net, labels.view(-1, 1), torch.zeros(1, 1, dtype=torch.long), 1, 0.0, (2, 1, 1), eta=eta,
               s_mode=d["s_mode"], generator=torch.Generator().manual_seed(123), ts=schedule(2, 0.0)[:2].tolist())
    x = sample(net, labels.view(-1, 1), torch.zeros(1, 1, dtype=torch.long), 4, 0.0, (2, 1, 1), eta=0.0,
               s_mode="same", x=x, ts=torch.linspace(0.5, 0, 5).tolist())
    out["first_jump_then4"] = metrics(x.flatten(1), labels)
    return out


def lab(variant, steps, seed):
    """One lab run: train to `steps` with the metrics every 1,000 steps (the curve); returns (record, EMA net)."""
    t0, curve = time.process_time(), {}
    net = train(variant, steps, seed=seed, on_eval=lambda step, ema: curve.update({str(step): score(ema, variant)}))
    return dict(variant=variant, seed=seed, steps=steps, options=VARIANTS[variant], final=curve[str(steps)],
                probe=probe(net, variant), curve=curve, cpu_s=round(time.process_time() - t0, 1)), net


def fmt(m):
    return f"{m['dist']:.3f} / {m['tv']:.2f} / {m['off']:.2f} / {m['energy']:.3f}"


def load(folder):
    """Every lab record in folder/lab/: {"floor": metrics, "runs": {file name: record}}."""
    runs = {f: json.load(open(os.path.join(folder, "lab", f))) for f in sorted(os.listdir(os.path.join(folder, "lab")))
            if f.endswith(".json")}
    return dict(floor=floor(), runs=runs)


def table(results):
    """Markdown: one row per variant and seed, one cell per step count: dist / tv / off / energy."""
    head = "| variant | seed | steps | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in STEPS) + " |"
    rows = [head, "|" + "---|" * (len(STEPS) + 3),
            "| fresh data (the floor) | | | " + " | ".join(fmt(results["floor"]) for _ in STEPS) + " |"]
    order = sorted(results["runs"], key=lambda k: (list(VARIANTS).index(results["runs"][k]["variant"])
                                                     if results["runs"][k]["variant"] in VARIANTS else 99, k))
    for key in order:
        r = results["runs"][key]
        rows.append(f"| {r['variant']} | {r['seed']} | {r['steps']:,} | " +
                    " | ".join(fmt(r["final"][str(k)]) for k in STEPS) + " |")
    rows += ["", "The probe (`probe`, runs recorded since 2026-12-07): the 2-step sampler's last jump 0.5 -> 0 against the "
             "flow head (flow) and its flow target (teacher, 8 Euler steps); learned = 1 - last_vs_teacher / "
             "teacher_vs_flow; the 4-step sampler's middle jump 0.75 -> 0.5 against the ODE's landing; the 2-step "
             "sample's first jump finished by 4 flow steps (dist / tv / off / energy), beside the 2-step sample.", "",
             "| variant | seed | last_vs_flow | teacher_vs_flow | last_vs_teacher | learned | middle_vs_teacher | "
             "first jump + 4 flow steps | 2 steps |", "|" + "---|" * 9]
    for key in order:
        r = results["runs"][key]
        if "probe" in r:
            q = r["probe"]
            rows.append(f"| {r['variant']} | {r['seed']} | {q['last_vs_flow']:.3f} | {q['teacher_vs_flow']:.3f} | "
                        f"{q['last_vs_teacher']:.3f} | {1 - q['last_vs_teacher'] / q['teacher_vs_flow']:.2f} | "
                        f"{q['middle_vs_teacher']:.3f} | {fmt(q['first_jump_then4'])} | {fmt(r['final']['2'])} |")
    return "\n".join(rows) + "\n"


@torch.no_grad()
def self_eval_arrows(net, points, labels, s=0.3, draws=16, seed=0):
    """The self-evaluation direction G_c - G_phi (Eq. 14, sign flipped: where the jump is pushed) at each
    landing point, re-noised to time s as in training; averaged over `draws` noises."""
    g = torch.Generator().manual_seed(seed)
    x0 = points.view(-1, 2, 1, 1)
    sb = torch.full((len(x0),), s)
    out = torch.zeros_like(points)
    for _ in range(draws):
        x_s = losses.add_noise(x0, torch.randn(x0.shape, generator=g), sb)
        G_c = x_s - s * net(x_s, sb, sb, labels.view(-1, 1))
        G_phi = x_s - s * net(x_s, sb, sb, torch.zeros(len(x0), 1, dtype=torch.long))
        out += (G_c - G_phi).flatten(1) / draws
    return out


NAMES = {"flow": "flow matching", "selfe": "Self-E (paper)", "meanflow": "MeanFlow",
         "selfe_flowtgt": "Self-E + flow target (ours)"}


def figure(nets, path, steps_list=(1, 2, 4, 50)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = ["tab:red", "tab:green", "tab:blue"]
    data, _ = draw(3000, torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(len(nets), len(steps_list), figsize=(3 * len(steps_list), 3.1 * len(nets)), squeeze=False)
    for row, (variant, net) in enumerate(nets.items()):
        for col, steps in enumerate(steps_list):
            ax = axes[row, col]
            ax.scatter(data[:, 0, 0, 0], data[:, 1, 0, 0], s=1, c="lightgray")
            points, labels = generate(net, variant, steps, n=200)
            for k in range(1, LABELS + 1):
                p = points[labels == k]
                ax.scatter(p[:, 0], p[:, 1], s=3, c=colors[k - 1], label=f"label {k}" if col == 0 else None)
            if steps == 1 and VARIANTS[variant]["method"] != "flow":
                a = self_eval_arrows(net, points[::10], labels[::10])
                ax.quiver(points[::10, 0], points[::10, 1], a[:, 0], a[:, 1], angles="xy", scale_units="xy",
                          scale=1, width=0.004, color="black")
            m = metrics(points, labels)
            ax.set_title(f"{NAMES.get(variant, variant)}, {steps} step{'s' if steps > 1 else ''}\n"
                         f"dist {m['dist']:.3f}  TV {m['tv']:.2f}  off {m['off']:.2f}", fontsize=9)
            ax.set_xlim(-1.5, 1.5)
            ax.set_ylim(-1.5, 1.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("labelled 2-D mixture (grey: data); arrows: G_c - G_phi at the one-step landing points", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lab", nargs="+", metavar="VARIANT", help=f"variants to run: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=6000, help="training steps per run (the plateau: LOG.md)")
    p.add_argument("--table", action="store_true", help="write lab.md from the records in lab/")
    p.add_argument("--demo", nargs="+", default=list(VARIANTS)[:4], metavar="VARIANT", help="the picture's rows")
    p.add_argument("--out", default=OUT, help="folder of toy.json, lab/ and lab.md")
    p.add_argument("--figure", default="assets/toy.png", help="the demo's picture")
    args = p.parse_args(argv)
    bad = [v for v in (args.lab or []) + args.demo if v not in VARIANTS]
    if bad or args.steps < 1000 or args.steps % 1000:
        p.error(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}" if bad else
                "--steps must be a positive multiple of 1000 (the curve's points)")
    os.makedirs(args.out, exist_ok=True)
    if args.lab:
        os.makedirs(os.path.join(args.out, "lab"), exist_ok=True)
        for variant in args.lab:
            for seed in args.seeds:
                rec, _ = lab(variant, args.steps, seed)
                with open(os.path.join(args.out, "lab", f"{variant}_s{seed}_{args.steps}.json"), "w") as f:
                    json.dump(rec, f, indent=1)
                print(f"{variant} seed {seed} ({rec['cpu_s']:.0f} CPU-s): " +
                      "  ".join(f"{k}: {fmt(rec['final'][str(k)])}" for k in STEPS), flush=True)
                print("  probe: " + "  ".join(f"{k} {fmt(v) if isinstance(v, dict) else v}"
                                             for k, v in rec["probe"].items()), flush=True)
        return
    if args.table:
        with open(os.path.join(args.out, "lab.md"), "w") as f:
            f.write(table(load(args.out)))
        print(f"wrote {os.path.join(args.out, 'lab.md')}")
        return
    nets, res = {}, {}
    for v in args.demo:
        rec, nets[v] = lab(v, args.steps, args.seeds[0])
        res[v] = rec["final"]
        print(f"{v:14s} " + "  ".join(f"{k}: {fmt(rec['final'][str(k)])}" for k in STEPS), flush=True)
    figure(nets, args.figure)
    with open(os.path.join(args.out, "toy.json"), "w") as f:
        json.dump(dict(metrics=res, floor=floor(), args=vars(args)), f, indent=1)
    print(f"wrote {args.figure} and {os.path.join(args.out, 'toy.json')}")


if __name__ == "__main__":
    main()
