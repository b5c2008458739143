"""The any-step sampler (paper Sec. 3.4, Eq. 22, S.2-S.3).

A schedule 1 = t_0 > t_1 > ... > t_N = 0 (linear, warped by the training shift). At each step the network
jumps from t_k towards the target time s_k (default s_k = t_{k+1}): x0_hat = G(x_{t_k}, t_k, s_k, c).
The DDIM-style update re-noises x0_hat to t_{k+1}; with eta = 0 it is exactly Eq. 22,
    x_{t_{k+1}} = x_{t_k} - (t_k - t_{k+1}) V(x_{t_k}, t_k, s_k, c),
and eta = 1 replaces the predicted noise by fresh noise as far as the DDIM posterior allows. Self-E samples with
eta = 1 by default (the paper's stochastic update), flow matching and MeanFlow with eta = 0 (DEFAULTS below).
Guidance is energy-preserving CFG (Zhang et al. 2412.09966): the guided velocity rescaled to ||V_c||.
One step costs one network evaluation per image (two with guidance).
"""
import torch
from tqdm import tqdm

from losses import alpha, bcast, norm, shift, sigma
from model import clean


# Each method's default sampler, the one place they live (sample.sampling_defaults reads them):
# Self-E: s_k = t_{k+1} and the paper's stochastic update (eta 1), no extra guidance (its training follows the
# classifier score already; bench/abl15's sweep); flow matching never saw s != t, so s_k = t_k, deterministic,
# omega 2 (best at 1-2 steps in the sweep); MeanFlow: its one-step map z_r = z_t - (t - r) u, i.e. s_k = t_{k+1},
# eta 0, no guidance (MeanFlow folds guidance into training instead, losses.MeanFlow).
DEFAULTS = {"selfe": dict(omega=1.0, eta=1.0, s_mode="next"),
            "flow": dict(omega=2.0, eta=0.0, s_mode="same"),
            "meanflow": dict(omega=1.0, eta=0.0, s_mode="next")}


def schedule(steps, mu):
    """t_0 = 1 > ... > t_steps = 0: linear, warped by the resolution shift. (steps + 1,)"""
    return shift(torch.linspace(1, 0, steps + 1), mu)


def target_time(t, t_next, s_mode):
    """s_k: 'next' = t_{k+1} (default, best at few steps), 'same' = t_k (plain flow matching), 'mid', or a number
    a in [0, 1]: s_k = t_{k+1} + a (t_k - t_{k+1}) (one step: s = a; the paper's Fig. S.4 takes 0.5)."""
    a = {"next": 0.0, "same": 1.0, "mid": 0.5}[s_mode] if isinstance(s_mode, str) else float(s_mode)
    return t_next + a * (t - t_next)


def ep_cfg(v_c, v_u, omega):
    """Energy-preserving CFG: V = V_c + (omega - 1)(V_c - V_u), rescaled per sample to ||V_c||."""
    v = v_c + (omega - 1) * (v_c - v_u)
    return v * bcast(norm(v_c) / norm(v))


@torch.no_grad()
def sample(model, ids, null_ids, steps, mu, shape, omega=1.0, eta=0.0, s_mode="next", generator=None,
           device="cpu", x=None, ts=None, progress=False):
    """Generate len(ids) images of `shape` (C, H, W) from noise in `steps` steps. Returns (B, C, H, W) in ~[-1, 1].
    x, ts: start from x at time ts[0] and follow the times ts instead (diagnose.py finishes half-made samples).
    progress: a tqdm bar over the steps, shown once sampling has taken 2 s."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    B = ids.shape[0]
    if x is None:
        x = torch.randn(B, *shape, generator=generator).to(device)              # x_{t_0} = x_1: pure noise
    ids, null = ids.to(device), null_ids.to(device).expand(B, -1)
    ts = schedule(steps, mu).tolist() if ts is None else list(ts)
    for t, t_next in tqdm(list(zip(ts[:-1], ts[1:])), disable=not progress, delay=2, unit="step", leave=False):
        s = target_time(t, t_next, s_mode)
        tb, sb = torch.full((B,), t, device=device), torch.full((B,), s, device=device)
        if omega == 1.0:
            v = model(x, tb, sb, ids)
        else:  # conditional and unconditional in one batch: 2 evaluations per image
            v_c, v_u = model(torch.cat([x, x]), tb.repeat(2), sb.repeat(2), torch.cat([ids, null])).chunk(2)
            v = ep_cfg(v_c, v_u, omega)
        x0_hat = clean(x, tb, v)                                                # G = x_t - t V (Eq. 6)
        eps_hat = (x - alpha(t) * x0_hat) / sigma(t)                            # the noise x_t implies
        # DDIM posterior noise level at t_next (0 when t_next = 0, everything fresh when t = 1)
        ratio = (alpha(t) * sigma(t_next) / (alpha(t_next) * sigma(t))) if t_next > 0 else 0.0
        std = eta * sigma(t_next) * max(0.0, 1 - ratio ** 2) ** 0.5                # fresh-noise std
        z = torch.randn(x.shape, generator=generator).to(device) if std > 0 else 0.0
        x = alpha(t_next) * x0_hat + (sigma(t_next) ** 2 - std ** 2) ** 0.5 * eps_hat + std * z
    return x
