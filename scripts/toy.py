"""Self-E in one CPU-minute: flow matching and Self-E on a labelled 2-D mixture, same losses.py and sampler.py.

    python -m scripts.toy          # trains both (about a minute on one core), writes bench/toy/toy.png

The data: six modes on a circle of radius 1. Each of three labels owns one mode (drawn 60% of the time) and
shares the two modes beside it with its neighbours (20% each). A "prompt" is a label; the empty prompt is
the unconditional mixture. The network is a small MLP with the DiT's two time inputs (t and s); it sees a
point as a 2 x 1 x 1 "image", so every loss and the sampler are the project's own code, unchanged.

What it shows (README): in one step, flow matching lands near each label's mean, inside the circle and
between the modes; Self-E's jump is trained against its own classifier score (the arrows: G_c - G_phi at
the landing points), which points away from the other labels, towards the label's own mode: its one-step
samples land on the data. With many steps both methods reach the modes.
"""
import argparse
import copy
import json
import math
import os

import torch
import torch.nn as nn

import losses
from model import TimeMLP, ema_update, velocity
from sampler import DEFAULTS, sample

LABELS = 3
MODES = torch.tensor([[math.cos(a), math.sin(a)] for a in torch.arange(6) * math.pi / 3])  # (6, 2)
OWN, SHARED = 0.6, 0.2  # label k: mode 2k with 0.6, modes 2k +- 1 with 0.2 each


def label_modes(k):
    """Indices of label k's modes (k = 1..LABELS): its own, then the two it shares."""
    own = 2 * (k - 1)
    return [own, (own - 1) % 6, (own + 1) % 6]


def draw(B, g):
    """B points (B, 2, 1, 1) of the mixture and their labels as strings (the captions)."""
    labels = torch.randint(1, LABELS + 1, (B,), generator=g)
    u = torch.rand(B, generator=g)
    which = torch.where(u < OWN, 0, torch.where(u < OWN + SHARED, 1, 2))
    idx = torch.tensor([label_modes(k)[w] for k, w in zip(labels.tolist(), which.tolist())])
    x = MODES[idx] + 0.05 * torch.randn(B, 2, generator=g)
    return x.view(B, 2, 1, 1), [str(k) for k in labels.tolist()]


def tok(captions):
    """Captions '1'..'3' -> ids (B, 1); the empty caption -> 0, the null prompt."""
    return torch.tensor([[int(c) if c else 0] for c in captions])


class ToyNet(nn.Module):
    """V(x_t, t, s, c) for 2-D points: an MLP that predicts x0 (V = (x_t - x0_hat) / t, as the DiT does),
    conditioned on MLP_t(t) + MLP_s(t - s) + a label embedding."""

    def __init__(self, width=128):
        super().__init__()
        self.t_embed, self.s_embed = TimeMLP(width), TimeMLP(width)
        self.label = nn.Embedding(LABELS + 1, width)
        self.mlp = nn.Sequential(nn.Linear(2 + width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, s, ids):
        c = self.t_embed(t) + self.s_embed(t - s) + self.label(ids[:, 0])       # (B, width)
        x0_hat = self.mlp(torch.cat([x.flatten(1), c], 1)).view_as(x)           # (B, 2, 1, 1)
        return velocity(x, t, x0_hat)


def train(method, steps=1500, B=256, seed=0, lr=2e-3):
    """Train one method on the mixture; returns the EMA network."""
    torch.manual_seed(seed)
    net = ToyNet()
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    m = losses.FlowMatching(tok, 0.0, generator=g) if method == "flow" else \
        losses.SelfE(tok, 0.0, ema, net, tau_anneal=0.3, generator=g)
    for step in range(steps):
        x0, captions = draw(B, g)
        loss, _ = m.loss(net, x0, captions, step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, net, 0.99, step)
    return ema


def generate(net, method, steps, n=200, seed=123):
    """n samples per label at this step count: (points (LABELS * n, 2), labels (LABELS * n,))."""
    labels = torch.arange(1, LABELS + 1).repeat_interleave(n)
    d = DEFAULTS[method]  # each method's default sampler, without guidance
    x = sample(net, labels.view(-1, 1), torch.zeros(1, 1, dtype=torch.long), steps, 0.0, (2, 1, 1),
               eta=d["eta"], s_mode=d["s_mode"], generator=torch.Generator().manual_seed(seed))
    return x.flatten(1), labels


def distance_to_modes(points, labels):
    """Mean distance from each sample to the nearest mode of its own label."""
    own = torch.stack([MODES[label_modes(k)] for k in labels.tolist()])          # (N, 3, 2)
    return (points[:, None] - own).norm(dim=-1).min(1).values.mean().item()


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


def figure(nets, path, steps_list=(1, 2, 4, 50)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = ["tab:red", "tab:green", "tab:blue"]
    data, data_labels = draw(3000, torch.Generator().manual_seed(1))
    fig, axes = plt.subplots(2, len(steps_list), figsize=(3 * len(steps_list), 6.2))
    for row, (method, net) in enumerate(nets.items()):
        for col, steps in enumerate(steps_list):
            ax = axes[row, col]
            ax.scatter(data[:, 0, 0, 0], data[:, 1, 0, 0], s=1, c="lightgray")
            points, labels = generate(net, method, steps)
            for k in range(1, LABELS + 1):
                p = points[labels == k]
                ax.scatter(p[:, 0], p[:, 1], s=3, c=colors[k - 1], label=f"label {k}" if col == 0 else None)
            if steps == 1:
                a = self_eval_arrows(net, points[::10], labels[::10])
                ax.quiver(points[::10, 0], points[::10, 1], a[:, 0], a[:, 1], angles="xy", scale_units="xy",
                          scale=1, width=0.004, color="black")
            d = distance_to_modes(points, labels)
            ax.set_title(f"{'flow matching' if method == 'flow' else 'Self-E'}, {steps} step"
                         f"{'s' if steps > 1 else ''}\ndistance to modes {d:.3f}", fontsize=9)
            ax.set_xlim(-1.5, 1.5)
            ax.set_ylim(-1.5, 1.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("labelled 2-D mixture; arrows: G_c - G_phi at the one-step landing points", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/toy/toy.png")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    nets = {m: train(m, args.steps, seed=args.seed) for m in ("flow", "selfe")}
    res = {m: {k: round(distance_to_modes(*generate(net, m, k)), 4) for k in (1, 2, 4, 50)} for m, net in nets.items()}
    for m, r in res.items():
        print(f"{m:5s} distance to the label's modes at 1 / 2 / 4 / 50 steps: " + " / ".join(f"{v:.3f}" for v in r.values()))
    figure(nets, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(distance_to_modes=res, args=vars(args)), f, indent=1)
    print(f"wrote {args.out} and its .json")


if __name__ == "__main__":
    main()
