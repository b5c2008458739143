"""SelfE.step_loss wires Eqs. 7-21 together as the paper says: which pass sees which weights, time and prompt."""
import torch

import levers
import losses


class Fixed(torch.nn.Module):
    """A 'network' whose clean-sample head is a given tensor: V = (x - out) / t, so G = out.
    It records the calls it gets."""

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t, s, ids):
        self.calls.append(dict(n=x.shape[0], t=t.clone(), s=s.clone(), ids=ids.clone()))
        out = self.out if self.out.shape[0] == x.shape[0] else self.out[: x.shape[0]]
        return (x - out) / t.view(-1, 1, 1, 1)


def setup(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 3, 4, 4, generator=g)
    ids = torch.randint(1, 9, (B, 5), generator=g)
    ids[1] = 0  # a dropped caption
    t = torch.rand(B, generator=g) * 0.8 + 0.1
    s, jump = losses.sample_s(t, 1.0, g)
    eps, eps2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    return x0, ids, t, s, jump, eps, eps2


def null_tok(L=5):
    """A stand-in tokenizer: every caption (the methods here only ask for the empty one) -> zeros (n, L)."""
    return lambda captions: torch.zeros(len(captions), L, dtype=torch.long)


def test_self_evaluation_passes_and_gradient():
    B = 8
    x0, ids, t, s, jump, eps, eps2 = setup(B)
    P = torch.randn(B, 3, 4, 4, requires_grad=True)     # G(x_t, t, s, c) of the live network
    C, U = torch.randn(B // 2, 3, 4, 4), torch.randn(B // 2, 3, 4, 4)
    net, ema, live = Fixed(P), Fixed(C), Fixed(U)
    method = losses.SelfE(null_tok(), 0.0, ema, live, energy_preserving=False)
    total, parts, landing = method.step_loss(net, x0, ids, t, s, jump, eps, eps2)
    # one pass with gradient on the whole batch; two no-grad passes on the jumping half, at time s, s
    assert len(jump) == B // 2 and (s[jump] < t[jump]).all()
    assert len(net.calls) == 1 and net.calls[0]["n"] == B
    assert ema.calls[0]["n"] == B // 2 and live.calls[0]["n"] == B // 2
    for c in (ema.calls[0], live.calls[0]):
        assert torch.equal(c["t"], s[jump]) and torch.equal(c["s"], s[jump])
    assert torch.equal(ema.calls[0]["ids"], ids[jump])     # conditional evaluation: EMA weights, prompt c
    assert (live.calls[0]["ids"] == 0).all()               # unconditional: live weights, empty prompt phi
    # the landing point is re-noised from sg[x0_hat] with fresh noise: alpha_s x0_hat + sigma_s eps'
    sj = s[jump].view(-1, 1, 1, 1)
    assert torch.allclose(landing["x"], (1 - sj) * P.detach()[jump] + sj * eps2[jump], atol=1e-6)
    # gradient: w_t / B * (2 (x0_hat - x0) + 2 lambda (G_phi - G_c)) / D   (Eqs. 7, 14, 16, 17, 21)
    total.backward()
    D = P[0].numel()
    lam = torch.zeros(B)
    has_caption = (ids[jump] != 0).any(1).float()
    lam[jump] = losses.lambda_st(s[jump], t[jump]) * has_caption
    delta = torch.zeros_like(P)
    delta[jump] = (U - C) * has_caption.view(-1, 1, 1, 1)
    w = losses.time_weight(t).view(-1, 1, 1, 1)
    expected = w / B * (2 * (P.detach() - x0) + 2 * lam.view(-1, 1, 1, 1) * delta) / D
    assert torch.allclose(P.grad, expected, atol=1e-5)
    assert parts["self"] > 0 and parts["data"] > 0


def test_energy_preserving_loss_regresses_onto_the_renormalised_target():
    B = 8
    x0, ids, t, s, jump, eps, eps2 = setup(B, seed=1)
    P = torch.randn(B, 3, 4, 4, requires_grad=True)
    C, U = torch.randn(B // 2, 3, 4, 4), torch.randn(B // 2, 3, 4, 4)
    total, _, _ = losses.SelfE(null_tok(), 0.0, Fixed(C), Fixed(U)).step_loss(Fixed(P), x0, ids, t, s, jump, eps, eps2)
    has_caption = (ids[jump] != 0).any(1).float()
    x_self = P.detach().clone()
    x_self[jump] = P.detach()[jump] - (U - C) * has_caption.view(-1, 1, 1, 1)
    lam = torch.zeros(B)
    lam[jump] = losses.lambda_st(s[jump], t[jump]) * has_caption
    target = losses.energy_preserving_target(x0, x_self, lam)
    expected = (losses.time_weight(t) * (P.detach() - target).pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(total, expected, atol=1e-6)
    stay = torch.tensor([i for i in range(B) if i not in jump.tolist()])  # s = t: lambda = 0, x_renorm = x0
    assert torch.allclose(target[stay], x0[stay], atol=1e-6)


def test_fake_branch_rides_in_the_batch():
    B = 8
    x0, ids, t, s, jump, eps, eps2 = setup(B, seed=2)
    n = 2
    rider = dict(x=torch.randn(n, 3, 4, 4), s=torch.tensor([0.3, 0.6]), x0_hat=torch.randn(n, 3, 4, 4),
                 ids=torch.full((n, 5), 7))
    P = torch.randn(B + n, 3, 4, 4, requires_grad=True)
    C, U = torch.randn(B // 2, 3, 4, 4), torch.randn(B // 2, 3, 4, 4)
    net = Fixed(P)
    method = losses.SelfE(null_tok(), 0.0, Fixed(C), Fixed(U))
    method.rider = rider
    total, parts, _ = method.step_loss(net, x0, ids, t, s, jump, eps, eps2, fake_ids=torch.full((B, 5), 3))
    call = net.calls[0]
    assert call["n"] == B + n                                    # still one pass with gradient
    assert torch.equal(call["t"][B:], rider["s"]) and torch.equal(call["s"][B:], rider["s"])
    assert torch.equal(call["ids"][B:], rider["ids"])            # the fake prompt
    fake_l = losses.time_weight(rider["s"]) * (P.detach()[B:] - rider["x0_hat"]).pow(2).flatten(1).mean(1)
    assert abs(parts["fake"] - fake_l.sum().item() / B) < 1e-5   # Eq. s.8, riders counted as batch samples
    assert abs(total.item() - parts["target"] - parts["fake"]) < 1e-5   # the logged terms are what is minimised


class Scaled(torch.nn.Module):
    """V(x, t, s) = a x (1 + s) with one parameter a: depends on s, so two half jumps differ from one jump."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, s, ids):
        return self.a * x * (1 + s.view(-1, 1, 1, 1))


def test_shortcut_lever_regresses_its_share_on_the_shortcut_target():
    """levers.Levers(shortcut=1) (--shortcut 1): every jump's loss is ||V - V_tgt||^2 with V_tgt from two half jumps
    of the live net, every s = t sample keeps flow matching's ||G - x0||^2 (Eq. 7); lambda plays no part."""
    x0, ids, t, s, jump, eps, eps2 = setup(8)
    net = Scaled()
    method = levers.Levers(null_tok(), 0.0, evaluator=net, live=net, shortcut=1.0)
    total, _, _ = method.step_loss(net, x0, ids, t, s, jump, eps, eps2)
    x_t = losses.add_noise(x0, eps, t)
    with torch.no_grad():
        G = losses.G(net, x_t, t, s, ids)
        want = losses.per_sample_mse(G, x0)
        v_tgt = levers.shortcut_target(net, x_t[jump], t[jump], s[jump], ids[jump])
        want[jump] = losses.per_sample_mse(G[jump], x_t[jump] - losses.bcast(t[jump]) * v_tgt)
        want = (losses.time_weight(t) * want).mean()
    assert torch.allclose(total, want, rtol=1e-5)
    # and it differs from self-evaluation's target on the same draws
    plain, _, _ = losses.SelfE(null_tok(), 0.0, evaluator=net, live=net).step_loss(net, x0, ids, t, s, jump, eps, eps2)
    assert not torch.allclose(total, plain, rtol=1e-3)


def test_flow_target_lever_takes_the_jumps_at_s_0_and_near_0_and_leaves_the_rest_to_self_evaluation():
    """levers.Levers(flow_target=f) (--flow-target f): a share f of the jumps is drawn at s = 0; those, and every
    other jump with s <= flow_below * t, regress on K Euler steps of the teacher's flow head (s = t); the other
    jumps keep Self-E's target, the s = t half flow matching."""
    B = 64
    g = torch.Generator().manual_seed(5)
    method = levers.Levers(null_tok(), 0.0, None, None, flow_target=0.25, flow_below=0.1, generator=g)
    t, s, jump = method.times(B, progress=1.0)
    at_zero = jump[:round(0.25 * len(jump))]
    assert len(jump) == B // 2 and (s[at_zero] == 0).all() and (s[jump[len(at_zero):]] > 0).all()
    # the loss: teacher Scaled (V depends on s, so K Euler steps of its s = t head differ from one jump)
    x0 = torch.randn(B, 3, 4, 4, generator=g)
    ids = torch.randint(1, 9, (B, 5), generator=g)
    eps, eps2 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    net, teacher = Scaled(), Scaled()
    with torch.no_grad():
        teacher.a.fill_(0.3)
    method = levers.Levers(null_tok(), 0.0, evaluator=net, live=net, flow_target=0.25, flow_steps=3, teacher=teacher)
    total, _, _ = method.step_loss(net, x0, ids, t, s, jump, eps, eps2)
    paper = losses.SelfE(null_tok(), 0.0, evaluator=net, live=net)
    x_t = losses.add_noise(x0, eps, t)
    with torch.no_grad():
        G = losses.G(net, x_t, t, s, ids)
        x_self, lam, _ = paper.self_evaluate(G, ids, t, s, jump, eps2)
        want = paper.pair_loss(G, x0, x_self, lam)
        rest = jump[len(at_zero):]
        flow = torch.cat([at_zero, rest[s[rest] <= 0.1 * t[rest]]])
        assert len(flow) > len(at_zero)                            # some drawn jumps are near 0 too
        x = x_t[flow]                                              # three Euler steps of the teacher, t -> s
        for k in range(3):
            r = t[flow] + (s[flow] - t[flow]) * k / 3
            r2 = t[flow] + (s[flow] - t[flow]) * (k + 1) / 3
            x = x - losses.bcast(r - r2) * teacher(x, r, r, ids[flow])
        v_tgt = (x_t[flow] - x) / losses.bcast(t[flow] - s[flow])  # the average velocity from t to s
        target = x_t[flow] - losses.bcast(t[flow]) * v_tgt
        assert torch.allclose(target[:len(at_zero)], x[:len(at_zero)], atol=1e-6)   # at s = 0: the landing itself
        want[flow] = losses.per_sample_mse(G[flow], target)
        want = (losses.time_weight(t) * want).mean()
    assert torch.allclose(total, want, rtol=1e-5)
    plain, _, _ = paper.step_loss(net, x0, ids, t, s, jump, eps, eps2)
    assert not torch.allclose(total, plain, rtol=1e-3)
