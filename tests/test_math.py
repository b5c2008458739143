"""The paper's math: conventions, the self-evaluation gradient, lambda, the energy-preserving target,
the time sampler, and the sampler's update and cost."""
import math

import pytest
import torch

import losses
import model as models
import sampler
from model import G


class TrueVelocity(torch.nn.Module):
    """A 'network' that knows x0 and eps, so its velocity is the true one: V = eps - x0."""

    def __init__(self, x0, eps):
        super().__init__()
        self.x0, self.eps = x0, eps

    def forward(self, x, t, s, ids):
        return self.eps - self.x0


def test_time_convention_t0_is_data_t1_is_noise():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.allclose(losses.add_noise(x0, eps, torch.zeros(4)), x0)
    assert torch.allclose(losses.add_noise(x0, eps, torch.ones(4)), eps)
    t = torch.full((4,), 0.3)
    assert torch.allclose(losses.add_noise(x0, eps, t), 0.7 * x0 + 0.3 * eps)


def test_G_with_the_true_velocity_returns_x0():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    x_t = losses.add_noise(x0, eps, t)
    for s in (t, t / 2, torch.zeros(4)):  # any target time: the clean-sample head lands on x0 (Eq. 6)
        assert torch.allclose(G(TrueVelocity(x0, eps), x_t, t, s, None), x0, atol=1e-6)


def test_self_evaluation_gradient_is_the_classifier_direction():
    """d/dx0_hat ||x0_hat - x_self||^2 = 2 (G(x_s_hat, s, s, phi) - G(x_s_hat, s, s, c))  (appendix S.1, Eq. s.5)."""
    torch.manual_seed(0)
    x0_hat = torch.randn(3, 3, 8, 8, requires_grad=True)
    G_phi, G_c = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    x_self = losses.self_eval_target(x0_hat, losses.self_eval_direction(G_phi, G_c))
    assert not x_self.requires_grad  # sg[.]
    (grad,) = torch.autograd.grad((x0_hat - x_self).pow(2).sum(), x0_hat)
    assert torch.allclose(grad, 2 * (G_phi - G_c), atol=1e-5)
    # a step against the gradient moves x0_hat towards the conditional, away from the unconditional
    step = x0_hat - 0.01 * grad
    assert ((step - G_c).norm() - (x0_hat - G_c).norm()) < ((step - G_phi).norm() - (x0_hat - G_phi).norm())


def test_fake_score_direction_mixes_with_k():
    G_phi, G_c, G_fake = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    d = losses.self_eval_direction(G_phi, G_c, G_fake, k=0.9)
    assert torch.allclose(d, 0.9 * (G_phi - G_c) + 0.1 * (G_fake - G_c))
    assert torch.allclose(losses.self_eval_direction(G_phi, G_c, G_fake, k=1.0), G_phi - G_c)


def test_lambda_matches_eq17():
    t = torch.tensor([0.2, 0.5, 0.9, 0.7])
    s = torch.tensor([0.2, 0.25, 0.1, 0.0])
    lam = losses.lambda_st(s, t)
    expected = [0.0, 1 - 1 / 3, 9 - 1 / 9, 7 / 3]
    assert torch.allclose(lam, torch.tensor(expected), atol=1e-6)
    assert lam[0] == 0  # s = t: pure flow matching
    # longer jumps weigh more: lambda grows with t and shrinks with s
    assert losses.lambda_st(torch.tensor(0.1), torch.tensor(0.8)) > losses.lambda_st(torch.tensor(0.1), torch.tensor(0.6))
    assert losses.lambda_st(torch.tensor(0.3), torch.tensor(0.8)) < losses.lambda_st(torch.tensor(0.1), torch.tensor(0.8))


def test_energy_preserving_target_keeps_the_norm_of_x0():
    torch.manual_seed(0)
    x0, x_self = torch.randn(5, 3, 8, 8), 3 * torch.randn(5, 3, 8, 8) + 1
    lam = torch.tensor([0.0, 0.5, 2.0, 10.0, 100.0])
    target = losses.energy_preserving_target(x0, x_self, lam)
    assert torch.allclose(target.flatten(1).norm(dim=1), x0.flatten(1).norm(dim=1), rtol=1e-5)
    assert torch.allclose(target[0], x0[0], atol=1e-6)  # lambda = 0: the data target
    y = x0 + lam.view(-1, 1, 1, 1) * x_self             # the direction is that of x0 + lambda x_self (Eq. 19)
    cos = torch.nn.functional.cosine_similarity(target.flatten(1), y.flatten(1))
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)


def test_hybrid_loss_minimiser_points_along_the_energy_preserving_target():
    """Eq. 16 (the project's per_sample_mse and lambda_st) is minimised at (x0 + lambda x_self) / (1 + lambda),
    whose direction is that of Eq. 20's target (energy_preserving_target), with ||x0|| as its norm."""
    g = torch.Generator().manual_seed(0)
    x0, x_self = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    lam = losses.lambda_st(torch.tensor([0.1, 0.3, 0.0]), torch.tensor([0.5, 0.6, 0.7]))
    x = torch.zeros(3, 1, 2, 2, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        (losses.per_sample_mse(x, x0) + lam * losses.per_sample_mse(x, x_self)).sum().backward()
        opt.step()
    target = losses.energy_preserving_target(x0, x_self, lam)
    cos = torch.nn.functional.cosine_similarity(x.detach().flatten(1), target.flatten(1))
    assert torch.allclose(cos, torch.ones(3), atol=1e-4)
    assert torch.allclose(losses.norm(target), losses.norm(x0), atol=1e-5)


def test_time_weight_is_inverse_square_and_clamped():
    t = torch.tensor([0.5, 0.1, 0.01])
    assert torch.allclose(losses.time_weight(t), torch.tensor([4.0, 100.0, 400.0]))


def test_shift_keeps_endpoints_and_pushes_towards_noise():
    t = torch.linspace(0, 1, 11)
    for mu in (0.0, 0.5, 1.15):
        u = losses.shift(t, mu)
        assert u[0] == 0 and u[-1] == 1 and (u[1:] >= u[:-1]).all()
    assert torch.allclose(losses.shift(t, 0.0), t)
    assert (losses.shift(t[1:-1], 1.0) > t[1:-1]).all()
    assert losses.shift_mu(512) == pytest.approx(0.5) and losses.shift_mu(4096) == pytest.approx(1.15)


def test_sample_t_is_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    t = losses.sample_t(100_000, 0.0, g)
    assert 0 < t.min() and t.max() < 1
    assert t.median() == pytest.approx(0.5, abs=0.01)
    z = torch.logit(t)
    assert z.std() == pytest.approx(1.0, abs=0.02)  # logit-normal with unit scale
    assert losses.sample_t(100_000, 1.0, g).median() == pytest.approx(math.e / (math.e + 1), abs=0.01)


def test_sample_s_half_jumps_and_respects_tau():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1000, generator=g) * 0.98 + 0.01
    for tau in (0.0, 0.3, 1.0):
        s, jump = losses.sample_s(t, tau, g)
        assert (s <= t).all() and (s >= (1 - tau) * t - 1e-6).all()
        stay = torch.ones(1000, dtype=torch.bool)
        stay[jump] = False
        assert len(jump) == 500 and len(set(jump.tolist())) == 500  # exactly half jump, no index twice
        assert torch.equal(s[stay], t[stay])                         # the other half: s = t
        if tau > 0:
            assert (s[jump] < t[jump]).all()
    s, _ = losses.sample_s(t, 1.0, g)
    assert (s / t).min() < 0.01  # tau = 1: jumps reach all the way to s ~ 0
    # P(s = t) = 0.5 for every sample (the half is a random half)
    hits = torch.zeros(8)
    for _ in range(2000):
        s, _ = losses.sample_s(t[:8], 1.0, g)
        hits += (s == t[:8]).float()
    assert ((hits / 2000 - 0.5).abs() < 0.05).all()


def test_tau_anneals_linearly_then_stays_at_one():
    assert losses.tau_schedule(0.0, 0.4) == 0.0
    assert losses.tau_schedule(0.2, 0.4) == pytest.approx(0.5)
    assert losses.tau_schedule(0.4, 0.4) == 1.0 and losses.tau_schedule(0.9, 0.4) == 1.0
    assert losses.tau_schedule(0.0, 0.0) == 1.0


class Counter(torch.nn.Module):
    """Counts network evaluations (images) and records the (t, s) it was called with."""

    def __init__(self):
        super().__init__()
        self.images, self.calls = 0, []

    def forward(self, x, t, s, ids):
        self.images += x.shape[0]
        self.calls.append((t[0].item(), s[0].item()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_sampler_evaluation_count(steps, cfg):
    net, B = Counter(), 3
    sampler.sample(net, torch.ones(B, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), steps, 0.4,
                   (3, 8, 8), omega=cfg)
    assert net.images == B * steps * (1 if cfg == 1.0 else 2)
    assert len(net.calls) == steps


def test_sampler_target_times():
    ts = sampler.schedule(4, 0.4).tolist()
    assert ts[0] == 1 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    for mode, expect in (("next", ts[1:]), ("same", ts[:-1]), ("mid", [(a + b) / 2 for a, b in zip(ts, ts[1:])])):
        net = Counter()
        sampler.sample(net, torch.ones(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 4, 0.4,
                       (3, 8, 8), s_mode=mode)
        assert [c[0] for c in net.calls] == pytest.approx(ts[:-1])
        assert [c[1] for c in net.calls] == pytest.approx(expect)


class Linear(torch.nn.Module):
    """A fixed velocity field V = a x + b t, to check the update."""

    def forward(self, x, t, s, ids):
        return 0.3 * x + t.view(-1, 1, 1, 1)


def test_eta0_update_is_eq22_and_one_step_lands_on_G():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ids, null = torch.ones(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    out = sampler.sample(Linear(), ids, null, 3, 0.4, (3, 4, 4), eta=0.0, generator=g1)
    x = torch.randn(2, 3, 4, 4, generator=g2)
    ts = sampler.schedule(3, 0.4).tolist()
    for t, tn in zip(ts[:-1], ts[1:]):  # x_{t_{k+1}} = x_{t_k} - (t_k - t_{k+1}) V   (Eq. 22)
        x = x - (t - tn) * Linear()(x, torch.full((2,), t), None, None)
    assert torch.allclose(out, x, atol=1e-5)
    one = sampler.sample(Linear(), ids, null, 1, 0.4, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    x1 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(one, x1 - 1.0 * Linear()(x1, torch.ones(2), None, None), atol=1e-5)


def test_eta1_adds_fresh_noise_and_ends_clean():
    ids, null = torch.ones(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    a = sampler.sample(Linear(), ids, null, 4, 0.4, (3, 4, 4), eta=1.0, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(Linear(), ids, null, 4, 0.4, (3, 4, 4), eta=0.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    # one step: the DDIM posterior at t_next = 0 has no noise, so eta does not matter
    a1 = sampler.sample(Linear(), ids, null, 1, 0.4, (3, 4, 4), eta=1.0, generator=torch.Generator().manual_seed(1))
    b1 = sampler.sample(Linear(), ids, null, 1, 0.4, (3, 4, 4), eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a1, b1)


def test_energy_preserving_cfg():
    v_c, v_u = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    v = sampler.ep_cfg(v_c, v_u, 5.0)
    assert torch.allclose(v.flatten(1).norm(dim=1), v_c.flatten(1).norm(dim=1), rtol=1e-5)
    raw = v_c + 4 * (v_c - v_u)
    cos = torch.nn.functional.cosine_similarity(v.flatten(1), raw.flatten(1))
    assert torch.allclose(cos, torch.ones(4), atol=1e-5)
    assert torch.allclose(sampler.ep_cfg(v_c, v_u, 1.0), v_c)


def test_model_shapes_zero_init_and_two_times():
    torch.manual_seed(0)
    net = models.build("tiny", vocab_size=50, max_text_len=8, image_size=16)
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3)
    ids = torch.randint(1, 50, (3, 8))
    ids[1] = 0  # an empty prompt
    v = net(x, t, t, ids)
    assert v.shape == x.shape and torch.all(G(net, x, t, t, ids).abs() < 1e-5)  # zero-init head: x0_hat = 0
    vnet = models.build("tiny", vocab_size=50, max_text_len=8, image_size=16, prediction="v")
    assert torch.all(vnet(x, t, t, ids) == 0)  # with the paper's V head, V = 0 at start
    for p in net.parameters():  # perturb, as training would
        p.data += 0.02 * torch.randn_like(p)
    v1, v2 = net(x, t, t, ids), net(x, t, t / 2, ids)
    assert not torch.allclose(v1, v2)  # the target time s is an input
    assert not torch.allclose(net(x, t, t, torch.zeros_like(ids))[0], v1[0])  # so is the prompt
    assert torch.allclose(G(net, x, t, t, ids), x - t.view(-1, 1, 1, 1) * v1, atol=1e-6)
    x_patch = net.patchify(x)
    assert x_patch.shape == (3, 4, 192) and torch.equal(net.unpatchify(x_patch), x)  # 2x2 patches of 8x8x3
    # padding is ignored: more trailing zeros do not change the output
    net2 = models.build("tiny", vocab_size=50, max_text_len=12, image_size=16)
    net2.load_state_dict({k: (v if k != "text.pos" else torch.cat([v, torch.zeros(1, 4, v.shape[2])], 1))
                          for k, v in net.state_dict().items()})
    ids12 = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    assert torch.allclose(net2(x, t, t, ids12), v1, atol=1e-5)
