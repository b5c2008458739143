"""Self-E's one-step samples follow the prompt where flow matching's cannot (a seeded toy, ~25 s).

The toy: 4x4 images whose left half has value a and right half value b, (a, b) = 0.8 (cos th, sin th).
Prompt 1 draws th from {0, 90} degrees, prompt 2 from {90, 180}: the 90-degree mode is shared, and each
prompt has one mode of its own, at a = +0.8 (prompt 1) or a = -0.8 (prompt 2). All modes have the same
norm, so the energy-preserving target keeps its direction. One-step flow matching lands on the conditional
mean, a = +-0.4. Self-E's self-evaluation moves the jump along the classifier score, towards the mode only
its own prompt has: measured as the mean of a * (+1 for prompt 1, -1 for prompt 2).

Negative result kept in LOG.md: the mean distance to the nearest data mode, which the issue asked for,
is not reliably smaller for Self-E in this toy (smaller at 300 steps, larger at 600), because one-step
samples of both methods stay near one point per prompt; only the direction of the shift is robust."""
import copy
import math

import torch

import losses
from model import DiT
from sampler import sample

ANGLES = {1: (0.0, 90.0), 2: (90.0, 180.0)}


def images(a, b):
    x = torch.empty(len(a), 3, 4, 4)
    x[..., :2], x[..., 2:] = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    return x


def batch(B, g):
    ids = torch.randint(1, 3, (B, 1), generator=g)
    pick = torch.randint(0, 2, (B,), generator=g)
    th = torch.tensor([ANGLES[i][p] for i, p in zip(ids[:, 0].tolist(), pick.tolist())]) * math.pi / 180
    return images(0.8 * th.cos(), 0.8 * th.sin()), ids


def train(method, steps=300, B=128, seed=0):
    torch.manual_seed(seed)
    net = DiT(vocab_size=3, max_text_len=1, image_size=4, dim=32, depth=2, heads=2, patch=4, text_layers=1)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    null = torch.zeros(1, 1, dtype=torch.long)
    for step in range(steps):
        x0, ids = batch(B, g)
        ids = torch.where(torch.rand(B, 1, generator=g) < 0.1, torch.zeros_like(ids), ids)  # caption dropout
        t = losses.sample_t(B, 0.0, g)
        eps, eps2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
        if method == "flow":
            loss, _, _ = losses.flow_loss(net, x0, ids, t, eps)
        else:
            s, order = losses.sample_s(t, losses.tau_schedule(step / steps, 0.3), g)
            loss, _, _ = losses.selfe_loss(net, ema, x0, ids, null, t, s, order, eps, eps2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - min(0.99, (1 + step) / (10 + step)))
    return ema


def own_mode_coordinate(net, s_mode):
    """Mean of a * (+1 prompt 1, -1 prompt 2) over one-step samples: 0.4 at the conditional mean, 0.8 at
    the prompt's own mode."""
    ids = torch.tensor([[1]] * 200 + [[2]] * 200)
    x = sample(net, ids, torch.zeros(1, 1, dtype=torch.long), 1, 0.0, (3, 4, 4), s_mode=s_mode,
               generator=torch.Generator().manual_seed(123))
    a = x[..., :2].mean(dim=(1, 2, 3))
    return (a * torch.where(ids[:, 0] == 1, 1.0, -1.0)).mean().item()


def test_selfe_one_step_samples_move_towards_the_prompts_own_mode():
    flow = own_mode_coordinate(train("flow"), "same")
    selfe = own_mode_coordinate(train("selfe"), "next")
    assert abs(flow - 0.4) < 0.1, flow          # flow matching: the conditional mean
    assert selfe > flow + 0.08, (selfe, flow)   # Self-E: measurably towards the prompt's own mode
