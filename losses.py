"""Self-E's training objective: small pure functions in the paper's notation, then the methods as objects
(FlowMatching, the baseline; SelfE; MeanFlow, the native few-step baseline), each with
loss(net, x0, captions, progress) -> (loss, parts).

Convention (the whole project's; paper Sec. 3): x_t = alpha_t x0 + sigma_t eps, alpha_t = 1 - t,
sigma_t = t. t = 0 is data, t = 1 is noise. The network has two time inputs: the current time t and a
target time s <= t; G(x_t, t, s, c) = x_t - t V(x_t, t, s, c) is its clean-sample head (Eq. 6).
c is the prompt, phi the empty prompt, sg[.] the stop-gradient.

One training step (SelfE.step_loss):
    x0_hat = G(x_t, t, s, c)                                              the jump, with gradient
    x_s_hat = alpha_s sg[x0_hat] + sigma_s eps'                           re-noised landing point
    x_self = sg[x0_hat - (G(x_s_hat, s, s, phi) - G(x_s_hat, s, s, c))]  Eq. 14 (self-evaluation)
    L_{s,t} = ||x0_hat - x_renorm||^2,  x_renorm = EP(x0 + lambda_{s,t} x_self)    Eqs. 17-20
    loss = E[w_t L_{s,t}],  w_t = 1 / t^2                                 Eq. 21, paper S.2
"""
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data import FAKE_PROMPT
from model import G


def stopgrad(x):
    """sg[x]."""
    return x.detach()


def alpha(t):
    return 1 - t


def sigma(t):
    return t


def bcast(t):
    """(B,) -> (B, 1, 1, 1), to multiply images."""
    return t.view(-1, 1, 1, 1)


def add_noise(x0, eps, t):
    """x_t = alpha_t x0 + sigma_t eps."""
    return bcast(alpha(t)) * x0 + bcast(sigma(t)) * eps


# -----------------------------------------------------------------------------
# time sampling (paper S.2)

def shift_mu(num_tokens):
    """Resolution shift mu, linear in the number of image tokens: 0.5 at 512 tokens, 1.15 at 4096."""
    return 0.5 + (1.15 - 0.5) * (num_tokens - 512) / (4096 - 512)


def shift(t, mu):
    """Resolution shift t -> e^mu / (e^mu + 1/t - 1): pushes times towards noise for mu > 0. Keeps 0 and 1."""
    return math.exp(mu) * t / (math.exp(mu) * t + (1 - t))


def sample_t(batch, mu, generator=None, t_min=1e-3, t_max=1 - 1e-3):
    """Logit-normal t = sigmoid(z), z ~ N(0, 1), then the resolution shift; clamped away from 0 and 1 (ours)."""
    t_raw = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift(t_raw, mu).clamp(t_min, t_max)


def tau_schedule(progress, anneal):
    """tau grows linearly 0 -> 1 over the first `anneal` fraction of training, then stays 1 (paper S.2)."""
    return 1.0 if anneal <= 0 else min(1.0, progress / anneal)


def sample_s(t, tau, generator=None):
    """s = t for exactly half of the batch (a random half: P(s = t) = 0.5 per sample), else
    s ~ U((1 - tau) t, t) (paper S.2). Returns (s, jump): jump holds the B // 2 indices with s < t.
    A fixed count keeps batch shapes static (compile, DDP)."""
    B = t.shape[0]
    order = torch.randperm(B, generator=generator)
    u = torch.rand(B, generator=generator)
    s = t - tau * t * u                       # U((1 - tau) t, t)
    s[order[B // 2:]] = t[order[B // 2:]]     # the other half: s = t, ordinary flow matching
    return s, order[: B // 2]


# -----------------------------------------------------------------------------
# the loss terms

def lambda_st(s, t):
    """lambda_{s,t} = sigma_t / alpha_t - sigma_s / alpha_s = t / (1 - t) - s / (1 - s)   (Eq. 17); 0 at s = t."""
    return sigma(t) / alpha(t) - sigma(s) / alpha(s)


def self_eval_direction(G_phi, G_c, G_fake=None, k=0.9):
    """The classifier-score direction at x_s_hat: G(x_s_hat, s, s, phi) - G(x_s_hat, s, s, c)  (Eq. 14).

    With the auxiliary fake-score term (appendix S.1.2, Eq. s.6):
    Delta = k (G_phi - G_c) + (1 - k) (G_fake - G_c)."""
    if G_fake is None:
        return G_phi - G_c
    return k * (G_phi - G_c) + (1 - k) * (G_fake - G_c)


def self_eval_target(x0_hat, delta):
    """x_self = sg[x0_hat - Delta]   (Eq. 14). ||x0_hat - x_self||^2 then has gradient 2 Delta w.r.t. x0_hat:
    it moves x0_hat along -Delta = G_c - G_phi, towards images the model itself judges to match c."""
    return stopgrad(x0_hat - delta)


def norm(x):
    """||x|| per sample: (B,)."""
    return x.flatten(1).norm(dim=1).clamp_min(1e-8)


def energy_preserving_target(x0, x_self, lam):
    """x_renorm = y / ||y|| * ||x0||, y = x0 + lambda x_self, norms per sample   (Eqs. 18-19)."""
    y = x0 + bcast(lam) * x_self
    return y * bcast(norm(x0) / norm(y))


def per_sample_mse(a, b):
    """||a - b||^2 averaged over pixels: (B,)."""
    return (a - b).pow(2).flatten(1).mean(1)


def time_weight(t, t_min=0.05):
    """w_t = 1 / t^2 (Eq. 21 with paper S.2): makes the data term a velocity MSE. t clamped (ours)."""
    return 1 / t.clamp_min(t_min) ** 2


def bin_losses(t, loss, bins=4):
    """Mean loss per time bin [0, 1/bins), ...: shows where in t the model is weak (NaN for an empty bin).
    A (bins,) tensor on loss's device, computed without a host sync (train.py reads it on logging steps only)."""
    idx = (t * bins).long().clamp(max=bins - 1).to(loss.device)
    sums = torch.zeros(bins, device=loss.device, dtype=loss.dtype).index_add_(0, idx, loss.detach())
    return sums / torch.bincount(idx, minlength=bins).to(loss.dtype)      # 0 / 0 = NaN where a bin is empty


def time_shift(cfg, grid):
    """A run's time shift mu: its --mu, else the one its image token count (grid x grid patches) implies. The one
    rule for training (train.py) and sampling (sample.py, the scripts)."""
    return cfg["mu"] if cfg.get("mu") is not None else shift_mu(grid ** 2)


# -----------------------------------------------------------------------------
# the methods, one object each: its random draws and the loss of one batch (MeanFlow further down)

class FlowMatching:
    """Plain conditional flow matching, the baseline: s = t always; loss E[w_t ||G(x_t, t, t, c) - x0||^2].

    tok: captions -> ids (B, L), the empty caption giving the null prompt phi; mu: the time shift;
    generator: the one stream of caption-dropout, time and noise draws (its state is checkpointed)."""

    def __init__(self, tok, mu, caption_dropout=0.1, generator=None, device="cpu"):
        self.tok, self.mu, self.caption_dropout = tok, mu, caption_dropout
        self.gen, self.device = generator, device
        self.null_ids = tok([""]).to(device)                                  # (1, L): the empty prompt phi

    def state_dict(self):
        """What a resumed run needs of the method beside the weights and the generator: nothing here."""
        return {}

    def load_state_dict(self, state):
        pass

    def times(self, batch, progress):
        """(t, s, jump): the current and target times (B,) and the indices that jump (s < t): none here."""
        t = sample_t(batch, self.mu, self.gen)
        return t, t, torch.zeros(0, dtype=torch.long)

    def draw(self, x0, captions, progress):
        """The batch's random draws, always in this order: caption dropout, t, s, then the noise eps, eps'. (Flow
        matching draws eps' too, unused, so that both methods read their generator the same way.) On a CPU the
        noise comes from the generator itself; on a GPU the generator gives one seed per batch and the noise is
        drawn on the device from it (no 2 x B x C x H x W host draw and copy per step). Both resume bit for bit:
        everything follows from the one checkpointed CPU stream."""
        B = x0.shape[0]
        drop = torch.rand(B, generator=self.gen) < self.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]   # dropped: the null prompt
        t, s, jump = self.times(B, progress)
        if torch.device(self.device).type == "cpu":
            eps = torch.randn(x0.shape, generator=self.gen)
            eps2 = torch.randn(x0.shape, generator=self.gen)
        else:
            g = torch.Generator(self.device).manual_seed(int(torch.randint(2 ** 62, (), generator=self.gen)))
            eps = torch.randn(x0.shape, generator=g, device=self.device)
            eps2 = torch.randn(x0.shape, generator=g, device=self.device)
        to = lambda v: v.to(self.device)
        return captions, to(self.tok(captions)), to(t), to(s), to(jump), eps, eps2

    def loss(self, net, x0, captions, progress):
        """(loss, parts) of one batch: x0 (B, C, H, W) data, captions B strings, progress in [0, 1]."""
        _, ids, t, s, jump, eps, eps2 = self.draw(x0, captions, progress)
        return self.step_loss(net, x0, ids, t, s, jump, eps, eps2)[:2]

    def step_loss(self, net, x0, ids, t, s=None, jump=None, eps=None, eps2=None, fake_ids=None):
        """The loss of one batch given its draws (s, jump, eps2, fake_ids: unused). Returns (loss, parts, None)."""
        x_t = add_noise(x0, eps, t)
        data_l = time_weight(t) * per_sample_mse(G(net, x_t, t, t, ids), x0)          # Eqs. 7, 21
        parts = dict(data=data_l.detach().mean(), self=0.0, fake=0.0)
        parts.update({f"data_t{b}": v for b, v in enumerate(bin_losses(t, data_l))})
        return data_l.mean(), parts, None


class SelfE(FlowMatching):
    """Self-E: flow matching on every pair (s, t) plus self-evaluation of the jumps s < t (Eqs. 7-21).

    evaluator: the weights of the conditional self-evaluation pass (the EMA, paper S.2); live: the plain
    live module for the other no-grad passes (the `net` given to loss may be DDP-wrapped: it takes the one
    pass with gradient).
    tau_anneal: fraction of training over which the longest jump grows to the full [0, t].
    fake_start: None, or the fraction of training from which the auxiliary fake-score term is on
    (appendix S.1.2): the prompt c_fake = FAKE_PROMPT + " " + caption, and a quarter of the batch's landings
    (the model's own samples) ride in the next batch to train the fake branch (Eq. s.8); k as in Eq. s.6.
    The levers beyond the paper (ours) subclass this one (levers.py) through one hook, `trajectory_targets`."""

    def __init__(self, tok, mu, evaluator, live, caption_dropout=0.1, tau_anneal=0.4, energy_preserving=True,
                 fake_start=None, k=0.9, generator=None, device="cpu"):
        super().__init__(tok, mu, caption_dropout, generator, device)
        self.evaluator, self.live, self.tau_anneal = evaluator, live, tau_anneal
        self.energy_preserving, self.fake_start, self.k = energy_preserving, fake_start, k
        self.rider = None  # an earlier step's landings, dict(x=x_s_hat, s, x0_hat, ids=their c_fake)

    def times(self, batch, progress):
        t = sample_t(batch, self.mu, self.gen)
        s, jump = sample_s(t, tau_schedule(progress, self.tau_anneal), self.gen)
        return t, s, jump

    def loss(self, net, x0, captions, progress):
        captions, ids, t, s, jump, eps, eps2 = self.draw(x0, captions, progress)
        fake_on = self.fake_start is not None and progress >= self.fake_start
        fake_ids = self.tok([f"{FAKE_PROMPT} {c}" for c in captions]).to(self.device) if fake_on else None
        total, parts, landing = self.step_loss(net, x0, ids, t, s, jump, eps, eps2, fake_ids)
        if fake_on and landing is not None:  # this step's landings train the fake branch next step
            n = x0.shape[0] // 4
            self.rider = dict(x=landing["x"][:n], s=landing["s"][:n], x0_hat=landing["x0_hat"][:n],
                              ids=fake_ids[jump[:n]])
        parts.update(tau=tau_schedule(progress, self.tau_anneal), fake_on=float(fake_on))
        return total, parts

    def step_loss(self, net, x0, ids, t, s, jump, eps, eps2, fake_ids=None):
        """One training step given its draws, the summary at the top of this file line by line, with ONE forward
        pass with gradient. x0 (B, C, H, W) data, ids (B, L) prompts (all zeros where the caption was dropped),
        t, s (B,), jump: the indices with s < t, eps, eps2: noise for x_t and for re-noising the landing point,
        fake_ids: None, or (B, L) prompts c_fake (the fake-score term is on).
        Returns (total, parts, landing): total = target + fake, the loss minimised; parts = its two terms and
        diagnostics (see `diagnostics`); landing = this step's re-noised landing points, for the fake branch."""
        x_t = add_noise(x0, eps, t)
        x0_hat, fake = self.jump_and_fake_term(net, x_t, t, s, ids, fake_ids)         # G(x_t, t, s, c), Eq. s.8
        x_self, lam, landing = self.self_evaluate(x0_hat, ids, t, s, jump, eps2, fake_ids)   # Eqs. 8-15, 17
        per_sample = self.pair_loss(x0_hat, x0, x_self, lam)                          # Eqs. 18-20 (or 16)
        for idx, v_tgt in self.trajectory_targets(x_t, ids, t, s, jump):              # none here; ours: levers.py
            per_sample[idx] = per_sample_mse(x0_hat[idx], x_t[idx] - bcast(t[idx]) * v_tgt)
        w = time_weight(t)
        target = (w * per_sample).mean()                                              # Eq. 21
        parts = dict(target=target.detach(), fake=fake.detach(),
                     **self.diagnostics(x0_hat, x0, x_self, lam, w, t, jump))
        return target + fake, parts, landing

    def pair_loss(self, x0_hat, x0, x_self, lam):
        """L_{s,t} per sample: ||x0_hat - x_renorm||^2 (Eq. 20), or Eq. 16 without the energy-preserving target."""
        if self.energy_preserving:
            return per_sample_mse(x0_hat, energy_preserving_target(x0, x_self, lam))          # Eq. 20
        return per_sample_mse(x0_hat, x0) + lam * per_sample_mse(x0_hat, x_self)             # Eq. 16

    def trajectory_targets(self, x_t, ids, t, s, jump):
        """[(indices, V_tgt)]: jumps whose L_{s,t} is replaced by w_t ||G - (x_t - t V_tgt)||^2 = ||V - V_tgt||^2.
        None in the paper's method; the levers (ours, levers.py) return theirs."""
        return []

    @torch.no_grad()
    def self_evaluate(self, x0_hat, ids, t, s, jump, eps2, fake_ids=None):
        """Self-evaluation of the jumps (s < t), without gradient (Eqs. 8-15). Returns (x_self, lambda, landing):
        x_self = sg[x0_hat - Delta] on the jumps and sg[x0_hat] elsewhere, lambda_{s,t} (0 where s = t or the
        caption was dropped), landing = dict(x=x_s_hat, s, x0_hat) of the jumps (None if there are none)."""
        lam = torch.zeros_like(t)
        x_self = stopgrad(x0_hat).clone()
        if len(jump) == 0:
            return x_self, lam, None
        tj, sj = t[jump], s[jump]
        x_s_hat = add_noise(stopgrad(x0_hat[jump]), eps2[jump], sj)       # alpha_s sg[x0_hat] + sigma_s eps'
        G_c = G(self.evaluator, x_s_hat, sj, sj, ids[jump])                               # conditional: EMA
        G_phi = G(self.live, x_s_hat, sj, sj, self.null_ids.expand(len(jump), -1).contiguous())  # uncond.: live
        G_fake = G(self.live, x_s_hat, sj, sj, fake_ids[jump]) if fake_ids is not None else None
        delta = self_eval_direction(G_phi, G_c, G_fake, self.k)           # Eq. 14 (Eq. s.6 with the fake term)
        has_caption = (ids[jump] != 0).any(1).float()                     # dropped caption: no self-evaluation
        x_self[jump] = self_eval_target(x0_hat[jump], delta * bcast(has_caption))          # Eq. 14
        lam[jump] = lambda_st(sj, tj) * has_caption                       # Eq. 17
        return x_self, lam, dict(x=x_s_hat, s=sj, x0_hat=stopgrad(x0_hat[jump]))

    # ---- the auxiliary fake-score term (appendix S.1.2; the paper switches it on late in training) ----

    def jump_and_fake_term(self, net, x_t, t, s, ids, fake_ids):
        """(x0_hat, L_fake): the jump G(x_t, t, s, c) and, while the fake term is on and an earlier step's riders
        wait, the fake branch G(sg[x_s_hat], s, s, c_fake) on them, in the same pass with gradient (one batch of
        B + riders: one forward, one backward, one DDP all-reduce). L_fake is 0 otherwise."""
        B, rider = x_t.shape[0], self.rider if fake_ids is not None else None
        if rider is None:
            return G(net, x_t, t, s, ids), torch.zeros((), device=x_t.device)
        out = G(net, torch.cat([x_t, rider["x"]]), torch.cat([t, rider["s"]]), torch.cat([s, rider["s"]]),
                torch.cat([ids, rider["ids"]]))
        return out[:B], self.fake_loss(out[B:], rider, B)

    def fake_loss(self, out_fake, rider, B):
        """L_fake = w_s ||G(sg[x_s_hat], s, s, c_fake) - sg[x0_hat]||^2 on the riders (Eq. s.8; the weight w_s = 1/s^2
        and the sum over riders / B, i.e. riders count as batch samples, are ours: the paper gives none)."""
        return (time_weight(rider["s"]) * per_sample_mse(out_fake, rider["x0_hat"])).sum() / B

    def state_dict(self):
        """What a resumed run needs beside the weights and the generator: the riders waiting for the next step."""
        return dict(rider={k: v.cpu() for k, v in self.rider.items()} if self.rider else None)

    def load_state_dict(self, state):
        rider = state.get("rider")
        self.rider = {k: v.to(self.device) for k, v in rider.items()} if rider else None

    @staticmethod
    @torch.no_grad()
    def diagnostics(x0_hat, x0, x_self, lam, w, t, jump):
        """Logged, not minimised (with the energy-preserving target on): Eq. 16's two terms, data =
        w ||x0_hat - x0||^2 and self = w lambda ||x0_hat - x_self||^2, and the data term per time bin, for the
        whole batch and for the jumps alone. Tensors, read by train.py on logging steps only (no host sync)."""
        data_l = w * per_sample_mse(x0_hat, x0)
        parts = dict(data=data_l.mean(), self=(w * lam * per_sample_mse(x0_hat, x_self)).mean())
        parts.update({f"data_t{b}": v for b, v in enumerate(bin_losses(t, data_l))})
        parts.update({f"jump_t{b}": v for b, v in enumerate(bin_losses(t[jump], data_l[jump]))})
        return parts


# -----------------------------------------------------------------------------
# MeanFlow (Geng et al., arXiv 2505.13447): the native few-step baseline of the paper's Table 2 comparison.
# Its average velocity u(z_t, r, t) is the network's V(x_t, t, s = r, c), so one sampler step x_s = x_t - (t - s) V
# (Eq. 22 with s_k = t_{k+1}, eta = 0) is MeanFlow's one-step map z_r = z_t - (t - r) u (MeanFlow Eq. 3).
# Equation numbers in this part are MeanFlow's.

def meanflow_times(batch, jumps, generator=None, mean=-0.4, std=1.0, t_min=1e-3, t_max=1 - 1e-3):
    """(t, r, jump): two logit-normal(mean, std) draws, sorted so that r <= t (MeanFlow Sec. 4.3); r = t except
    on `jumps` random samples (a fixed count keeps shapes static: MeanFlow's 25% of the batch with r != t).
    t is clamped away from 0 and 1 as elsewhere (ours); r may reach 0, the one-step jump."""
    a = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    b = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    t = torch.maximum(a, b).clamp(t_min, t_max)
    jump = torch.randperm(batch, generator=generator)[:jumps]
    r = t.clone()
    r[jump] = torch.minimum(torch.minimum(a, b)[jump], t[jump])
    return t, r, jump


def meanflow_dudt(net, x_t, t, r, ids, v):
    """du/dt = v d_z u + d_t u along the flow (MeanFlow Eq. 8), by one forward-mode JVP of u(z, r, t) = V(z, t, r, c)
    with tangents (v, 0, 1) in (z, r, t). Returns (u, du/dt), no gradient. The math attention kernel: the fused
    CPU and GPU kernels have no forward-mode derivative. Autocast is off here: the JVP runs in the inputs' precision
    (fp32) inside a bf16 run too, since bf16 tangents would round du/dt, the term MeanFlow's target rests on."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast(x_t.device.type, enabled=False):
        return torch.func.jvp(lambda z, tt: net(z, tt, r, ids), (x_t, t), (v, torch.ones_like(t)))


def meanflow_target(v, t, r, dudt):
    """u_tgt = v - (t - r) du/dt, the MeanFlow identity (Eq. 10); u_tgt = v where r = t (flow matching)."""
    return v - bcast(t - r) * dudt


def adaptive_weight(err, p=1.0, c=1e-3):
    """sg[1 / (||Delta||^2 + c)^p] for the per-sample squared error ||Delta||^2 (MeanFlow Sec. 4.3, p = 1)."""
    return 1 / (stopgrad(err) + c) ** p


class MeanFlow(FlowMatching):
    """MeanFlow on the project's network: regress V(x_t, t, r, c) onto sg[u_tgt] (Eqs. 9-10) with the adaptive
    weight; a quarter of the batch has r < t (the JVP runs on that quarter only: where r = t, u_tgt = v).

    jvp_net: the plain module for the JVP (torch.func cannot differentiate through DDP or a compiled module in
    forward mode; the target needs no gradient, so the gradient pass still goes through the DDP-wrapped `net`).
    The JVP runs in fp32 under a bf16 autocast too (meanflow_dudt).
    omega: guidance folded into the target (Eq. 19 with kappa = 0): the velocity v = eps - x0 of a captioned
    sample is replaced by omega v + (1 - omega) u(x_t, t, t, phi), the live net's unconditional prediction;
    1 = no guidance (the default); sampling then uses omega 1. p: the adaptive weight's power (0: plain L2).
    v_loss: improved MeanFlow's v-loss (iMF, Geng et al., arXiv 2512.02012): regress the compound velocity
    V = u + (t - r) sg[du/dt] onto v = eps - x0, with du/dt taken along the network's own velocity u(z_t, t, t, c)
    (guided as v is) instead of the sampled v. Since ||V - v||^2 = ||u - (v - (t - r) sg[du/dt])||^2, the loss is
    Eq. 9's and the one change is the JVP's tangent, which no longer carries the noise of eps - x0 (one more
    no-grad pass on the jumps). iMF's guidance-as-condition is not taken: omega stays folded in (Eq. 19)."""

    def __init__(self, tok, mu, jvp_net, caption_dropout=0.1, omega=1.0, jump_share=0.25, p=1.0, v_loss=False,
                 generator=None, device="cpu"):
        super().__init__(tok, mu, caption_dropout, generator, device)
        self.jvp_net, self.omega, self.jump_share, self.p, self.v_loss = jvp_net, omega, jump_share, p, v_loss

    def guided(self, v, u_phi, ids):
        """omega v + (1 - omega) u(x_t, t, t, phi) where a caption is given (Eq. 19, kappa = 0), else v."""
        return torch.where(bcast((ids != 0).any(1)), self.omega * v + (1 - self.omega) * u_phi, v)

    def times(self, batch, progress):
        return meanflow_times(batch, round(self.jump_share * batch), self.gen)

    def step_loss(self, net, x0, ids, t, s, jump, eps, eps2=None, fake_ids=None):
        """s plays r. Returns (loss, parts, None); parts: data = ||u - v||^2 per pixel where r = t (flow
        matching's data term), jump = ||u - u_tgt||^2 per pixel where r < t, dudt = RMS of du/dt there."""
        x_t = add_noise(x0, eps, t)
        v = eps - x0                                                       # dz/dt of x_t = (1 - t) x0 + t eps
        u_phi = None
        if self.omega != 1.0:                                              # Eq. 19 (kappa = 0), captioned only
            with torch.no_grad():
                u_phi = self.jvp_net(x_t, t, t, self.null_ids.expand(len(t), -1))
            v = self.guided(v, u_phi, ids)
        u_tgt = v.clone()
        if len(jump) > 0:
            tangent = v[jump]                                              # MeanFlow: the sampled velocity
            if self.v_loss:                                                # iMF: the network's own u(z_t, t, t, c)
                with torch.no_grad():
                    tangent = self.jvp_net(x_t[jump], t[jump], t[jump], ids[jump])
                if u_phi is not None:
                    tangent = self.guided(tangent, u_phi[jump], ids[jump])
            _, dudt = meanflow_dudt(self.jvp_net, x_t[jump], t[jump], s[jump], ids[jump], tangent)
            u_tgt[jump] = meanflow_target(v[jump], t[jump], s[jump], dudt)  # Eq. 10 (iMF: V = u + (t-r) sg[du/dt] -> v)
        u = net(x_t, t, s, ids)                                            # u(z_t, r, t): the pass with gradient
        err = (u - stopgrad(u_tgt)).pow(2).flatten(1).sum(1)               # ||u - sg[u_tgt]||^2 (Eq. 9)
        total = (adaptive_weight(err, self.p) * err).mean()
        mse = err / x0[0].numel()
        flat = torch.ones_like(t, dtype=torch.bool)
        flat[jump] = False
        mse = mse.detach()
        parts = dict(data=mse[flat].mean(), self=0.0, fake=0.0, jump=mse[jump].mean() if len(jump) else 0.0,
                     dudt=dudt.pow(2).mean().sqrt() if len(jump) else 0.0)
        parts.update({f"data_t{b}": val for b, val in enumerate(bin_losses(t[flat], mse[flat]))})
        parts.update({f"jump_t{b}": val for b, val in enumerate(bin_losses(t[jump], mse[jump]))})
        return total, parts, None
