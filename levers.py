"""Ours: levers beyond the paper, one class beside losses.SelfE, each off by default and one train.py flag away
(its "research levers" group). losses.SelfE stays the paper's method; bench/README.md holds every lever's numbers,
and a rejected lever leaves the code (LOG.md names the commit that had it).

Both levers here give some of the jumps a trajectory target instead of self-evaluation's: a velocity V_tgt that the
jump's average velocity V(x_t, t, s, c) regresses on, written as a G target x_t - t V_tgt so that Eq. 21's weight
w_t = 1/t^2 makes the loss ||V - V_tgt||^2. Why: a pair's Self-E loss is stationary at
x0_hat = E[x0 | x_t, c] - lambda_{s,t} E[Delta], and at s = 0 Delta is 0, so the last jump of every few-step sample
learns the posterior mean, a blur between modes (the lab, scripts/toy.py, and scripts.diagnose --fewstep show it).
A trajectory target does not vanish at s = 0: it is where the ODE from x_t lands.

- shortcut: two half jumps of the live model itself, t -> m -> s (shortcut models, arXiv 2410.12557).
- flow_target: the model's own flow-matching head (s = t), K deterministic Euler steps of the EMA from t to s
  (teacher-free self-distillation of the probability-flow ODE, as in flow-map self-distillation, arXiv
  2505.18825). It serves the jumps self-evaluation cannot judge: every jump with s <= flow_below * t, and a share
  of the jumps drawn at s = 0 (the last jump of every sampler, and the one-step jump).
"""
import torch

from losses import SelfE, bcast


@torch.no_grad()
def shortcut_target(net, x_t, t, s, ids):
    """V_tgt = (x_t - x_s') / (t - s) for two half jumps of the model itself, x_m = x_t - (t - m) V(x_t, t, m, c),
    x_s' = x_m - (m - s) V(x_m, m, s, c), m = (t + s) / 2: the semigroup property of the any-step map. No JVP."""
    m = (t + s) / 2
    v1 = net(x_t, t, m, ids)
    v2 = net(x_t - bcast(t - m) * v1, m, s, ids)
    return (v1 + v2) / 2


@torch.no_grad()
def flow_target(net, x_t, t, s, ids, steps):
    """V_tgt = (x_t - x_s') / (t - s), x_s' from `steps` Euler steps of the flow-matching head V(x, r, r, c)
    (s = t: an ordinary flow prediction), r going from t to s in equal steps."""
    x = x_t
    for k in range(steps):
        r, r_next = t + (s - t) * k / steps, t + (s - t) * (k + 1) / steps
        x = x - bcast(r - r_next) * net(x, r, r, ids)
    return (x_t - x) / bcast(t - s)


class Levers(SelfE):
    """Self-E with the levers above. shortcut: share of the jumps on the shortcut target; flow_target: share of the
    jumps drawn at s = 0 (from t as drawn, or from t = 1 with flow_t="one") and put, with every jump at
    s <= flow_below * t, on the flow target of `flow_steps` Euler steps of `teacher` (the EMA; default the evaluator).
    The shares are disjoint slices of the jumps."""

    def __init__(self, *args, shortcut=0.0, flow_target=0.0, flow_steps=8, flow_below=0.1, flow_t="drawn", teacher=None,
                 **kw):
        super().__init__(*args, **kw)
        self.shortcut, self.flow_target, self.flow_steps, self.flow_below = shortcut, flow_target, flow_steps, flow_below
        self.flow_t = flow_t  # the t of the jumps drawn at s = 0: "drawn" (as the rest) or "one" (the 1-step jump)
        self.teacher = teacher if teacher is not None else self.evaluator

    def slices(self, jump):
        """(the jumps drawn at s = 0, the shortcut jumps): disjoint leading slices of `jump` (a random order)."""
        n0 = round(self.flow_target * len(jump))
        return jump[:n0], jump[n0:n0 + round(self.shortcut * len(jump))]

    def times(self, batch, progress):
        t, s, jump = super().times(batch, progress)
        at_zero = self.slices(jump)[0]
        s[at_zero] = 0.0
        if self.flow_t == "one":  # the sampler's first jump starts at t = 1: train that jump alone
            t[at_zero] = 1 - 1e-3
        return t, s, jump

    def trajectory_targets(self, x_t, ids, t, s, jump):
        """The hook of losses.SelfE.step_loss: [(shortcut jumps, their V_tgt), (flow-target jumps, theirs)]."""
        at_zero, short = self.slices(jump)
        targets = []
        if len(short):
            targets.append((short, shortcut_target(self.live, x_t[short], t[short], s[short], ids[short])))
        if self.flow_target > 0:
            rest = jump[len(at_zero) + len(short):]
            flow = torch.cat([at_zero, rest[(s[rest] <= self.flow_below * t[rest]) & (s[rest] < t[rest])]])
            if len(flow):
                targets.append((flow, flow_target(self.teacher, x_t[flow], t[flow], s[flow], ids[flow],
                                                  self.flow_steps)))
        return targets
