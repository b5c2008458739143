"""MeanFlow, the native few-step baseline: its JVP, its target on a closed-form case, and the whole path."""
import json
import os

import pytest
import torch
import torch.nn as nn

import data
import levers
import losses
import model as models
from conftest import cli
from model import TimeMLP


def perturbed_tiny(scale=10.0):
    """The tiny DiT with every weight moved off its zero init (a trained-looking network), in float64."""
    tok = data.Tokenizer(data.train_tokenizer(data.shapes_captions()[:500], 256).json, 16)
    torch.manual_seed(0)
    net = models.build("tiny", tok.vocab_size, 16, 32, time_scale=scale).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, tok


def test_jvp_matches_a_finite_difference_along_the_flow():
    net, tok = perturbed_tiny()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.4, 0.2], dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, 0.1, 0.15], dtype=torch.float64)
    ids = tok(["a red circle", "two squares", "", "a blue triangle"])
    x_t, v = losses.add_noise(x0, eps, t), eps - x0
    u, dudt = losses.meanflow_dudt(net, x_t, t, r, ids, v)
    h = 1e-5  # central difference of u(z + h v, r, t + h): the total derivative along dz/dt = v, r fixed
    with torch.no_grad():
        fd = (net(x_t + h * v, t + h, r, ids) - net(x_t - h * v, t - h, r, ids)) / (2 * h)
    assert torch.allclose(u, net(x_t, t, r, ids))
    assert dudt.abs().max() > 1e-2                                   # not trivially zero
    assert (dudt - fd).abs().max() / fd.abs().max() < 1e-6
    # and the target is the MeanFlow identity: v where r = t, v - (t - r) du/dt elsewhere
    tgt = losses.meanflow_target(v, t, r, dudt)
    assert torch.allclose(tgt[1], v[1] - 0.3 * dudt[1])
    assert torch.allclose(losses.meanflow_target(v, t, t, dudt), v)


def test_times_sorted_with_a_fixed_share_of_jumps():
    t, r, jump = losses.meanflow_times(1000, 250, torch.Generator().manual_seed(0))
    assert len(jump) == 250 and len(set(jump.tolist())) == 250
    assert (r <= t).all() and (r >= 0).all() and ((t > 0) & (t < 1)).all()
    flat = torch.ones(1000, dtype=torch.bool)
    flat[jump] = False
    assert (r[flat] == t[flat]).all() and (r[jump] < t[jump]).float().mean() > 0.99
    # logit-normal(-0.4, 1): the max of two draws has median above sigmoid(-0.4) = 0.40, the min below it
    assert t.median() > 0.45 and r[jump].median() < 0.35


class Net1D(nn.Module):
    """V(x_t, t, s) for scalar data seen as 1x1x1 images; x-prediction like the DiT."""

    def __init__(self, width=64):
        super().__init__()
        self.t_embed, self.s_embed = TimeMLP(width, scale=10.0), TimeMLP(width, scale=10.0)
        self.mlp = nn.Sequential(nn.Linear(1 + width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x, t, s, ids):
        x0_hat = self.mlp(torch.cat([x.flatten(1), self.t_embed(t) + self.s_embed(t - s)], 1)).view_as(x)
        return models.velocity(x, t, x0_hat)


@pytest.mark.parametrize("v_loss", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_learns_the_closed_form_average_velocity_of_a_gaussian(v_loss):
    """x0 ~ N(m, sd^2): the flow maps z_t to z_r = (1 - r) m + a_r (z_t - (1 - t) m) / a_t, a_t^2 = (1 - t)^2 sd^2 + t^2,
    so u(z, r, t) = (z - z_r) / (t - r). After a short run u is close to it at a long jump and a jump to r = 0,
    and clearly closer than the instantaneous velocity at t (what the target gives without its du/dt term).
    Plain L2 (p = 0): on scalar data the adaptive weight 1 / (err + c) would favour a robust (not the mean)
    estimate; on images err sums 3,072 numbers and the weight is nearly the same for every sample."""
    m, sd, B, steps, lr = 1.5, 0.4, 256, 1200, 3e-3
    torch.manual_seed(0)
    net = Net1D()
    g = torch.Generator().manual_seed(0)
    tok = lambda caps: torch.zeros(len(caps), 1, dtype=torch.long)
    method = losses.MeanFlow(tok, 0.0, net, caption_dropout=0.0, jump_share=0.5, p=0.0, v_loss=v_loss, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in range(steps):
        opt.param_groups[0]["lr"] = lr * (1 - i / steps)
        loss, _ = method.loss(net, m + sd * torch.randn(B, 1, 1, 1, generator=g), [""] * B, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.linspace(-2, 2, 41).view(-1, 1, 1, 1)
    a = lambda t: ((1 - t) ** 2 * sd ** 2 + t ** 2) ** 0.5
    for t, r in ((0.8, 0.3), (0.7, 0.0)):
        z_r = (1 - r) * m + a(r) * (z - (1 - t) * m) / a(t)
        u_true = (z - z_r) / (t - r)
        tb, rb = torch.full((41,), t), torch.full((41,), r)
        with torch.no_grad():
            u = net(z, tb, rb, tok([""] * 41))
            v = net(z, tb, tb, tok([""] * 41))  # the instantaneous velocity the same net learned (r = t)
        err, baseline = (u - u_true).abs().mean().item(), (v - u_true).abs().mean().item()
        assert err < 0.1 and err < baseline / 3, (t, r, err, baseline)


def test_trains_samples_in_one_step_and_is_scored(tmp_path):
    out = str(tmp_path / "mf")
    r = cli("train", "--method", "meanflow", "--batch-size", "16", "--max-steps", "3", "--max-minutes", "0",
            "--sample-every", "0", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["method"] == "meanflow" and cfg["arch"]["time_scale"] == 10.0
    rec = json.loads(open(os.path.join(out, "log.jsonl")).readlines()[-1])
    assert rec["dudt"] > 0 and rec["jump"] > 0 and rec["data"] > 0
    r = cli("evaluate", "--ckpt", os.path.join(out, "ckpt.pt"), "--steps", "1", "--per-task", "1", "--n", "1",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(tmp_path / "shapes_eval.json"))["rows"]
    assert set(rows) == {"1"} and set(data.TASKS) <= set(rows["1"]) and rows["1"]["swd"] > 0


def test_shortcut_target_keeps_the_exact_map_and_moves_a_wrong_one():
    """Data at one point c: the flow is x_t = c + t k, so the exact average velocity from t to s is (x - c) / t for
    every s. Two half jumps of that map land where one jump does (a fixed point of the shortcut target); a map
    that ignores c is moved towards the exact one."""
    c = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    exact = lambda x, t, s, ids: (x - c) / losses.bcast(t)
    wrong = lambda x, t, s, ids: x * (1 + losses.bcast(s))              # depends on s: not consistent
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    s = torch.tensor([0.0, 0.2, 0.1], dtype=torch.float64)
    x_t = losses.add_noise(c, torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64), t)
    assert torch.allclose(levers.shortcut_target(exact, x_t, t, s, None), exact(x_t, t, s, None))
    err = lambda f: (f(x_t, t, s, None) - exact(x_t, t, s, None)).abs().max()
    tgt = levers.shortcut_target(wrong, x_t, t, s, None)
    assert not torch.allclose(tgt, wrong(x_t, t, s, None))
    assert (tgt - exact(x_t, t, s, None)).abs().max() < err(wrong)     # the target is nearer the exact map


@pytest.mark.parametrize("omega", [1.0, 2.0])
def test_v_loss_takes_du_dt_along_the_networks_own_velocity(monkeypatch, omega):
    """iMF's one change: the JVP's tangent is u(z_t, t, t, c) (guided like v where omega != 1), not eps - x0; the
    target's v stays the sampled one."""
    net, tok = perturbed_tiny()
    net = net.float()
    seen = {}
    real = losses.meanflow_dudt
    monkeypatch.setattr(losses, "meanflow_dudt", lambda n, x, t, r, ids, v: seen.update(x=x, t=t, ids=ids, v=v)
                        or real(n, x, t, r, ids, v))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    captions = ["a red circle", "two squares", "", "a blue triangle"] * 2
    for v_loss in (False, True):
        method = losses.MeanFlow(tok, 0.0, net, caption_dropout=0.0, omega=omega, v_loss=v_loss,
                                 generator=torch.Generator().manual_seed(1))
        captions_, ids, t, s, jump, eps, eps2 = method.draw(x0, captions, 0.0)
        method.step_loss(net, x0, ids, t, s, jump, eps, eps2)
        x_t, tj, idj = seen["x"], seen["t"], seen["ids"]
        with torch.no_grad():
            own = net(x_t, tj, tj, idj)
            if omega != 1.0:
                phi = net(x_t, tj, tj, method.null_ids.expand(len(tj), -1))
                own = torch.where(losses.bcast((idj != 0).any(1)), omega * own + (1 - omega) * phi, own)
        sampled = (eps - x0)[jump]
        if v_loss:
            assert torch.allclose(seen["v"], own, atol=1e-5) and not torch.allclose(seen["v"], sampled, atol=1e-2)
        else:
            assert not torch.allclose(seen["v"], own, atol=1e-2)
