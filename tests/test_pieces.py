"""The training loop's pieces, one at a time and in process: optimiser groups, schedules, EMA warm-up,
gradient accumulation, the fake branch's hand-off, sampler defaults, and the grid's labels."""
import contextlib
import copy

import numpy as np
import pytest
import torch

import losses
import model as models
import sample
import sampler
import train
from conftest import null_tok, tiny_dit as tiny


def test_muon_takes_exactly_the_blocks_matrices_and_adam_the_rest():
    net = tiny()
    opts = train.make_optimizers(net, train.get_args(["--optimizer", "muon"]), "cpu")
    assert [type(o).__name__ for o in opts] == ["Adam", "Muon"]
    adam, muon = ({id(p) for g in o.param_groups for p in g["params"]} for o in opts)
    names = {id(p): n for n, p in net.named_parameters()}
    assert not adam & muon and adam | muon == set(names)                      # every parameter, once
    blocks = {n for n, p in net.named_parameters() if p.ndim == 2 and (n.startswith("blocks.") or ".blocks." in n)}
    assert {names[i] for i in muon} == blocks and any(n.startswith("text.blocks.") for n in blocks)  # DiT and text
    assert any(names[i].startswith("blocks.") for i in adam)                 # the blocks' biases and norms: Adam
    only_adam = train.make_optimizers(net, train.get_args(["--optimizer", "adam"]), "cpu")
    assert len(only_adam) == 1 and len(only_adam[0].param_groups[0]["params"]) == len(names)


def test_muon_newton_schulz_in_fp32_matches_torchs_bf16_and_is_used_where_bf16_is_slow(monkeypatch):
    coeffs, (a, b, c) = (3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315)
    for shape in ((96, 32), (32, 96)):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        X = g.bfloat16().T if shape[0] > shape[1] else g.bfloat16()      # torch.optim.Muon's iteration, in bf16
        X = X / X.norm()
        for _ in range(5):
            A = X @ X.T
            X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
        want = (X.T if shape[0] > shape[1] else X).float()
        got = train.newton_schulz_fp32(g, coeffs, 5, 1e-7)
        assert got.shape == shape and got.dtype == torch.float32
        assert (got - want).abs().max() < 0.02 and want.abs().max() > 0.1             # bf16 rounding apart
        sv = torch.linalg.svdvals(got)
        assert sv.min() > 0.3 and sv.max() < 1.3                                      # orthogonalised
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", None)      # restored after the test
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    train.make_optimizers(tiny(), train.get_args(["--optimizer", "muon"]), cuda=False)
    assert torch.optim._muon._zeropower_via_newtonschulz is train.newton_schulz_fp32


def test_lr_warms_up_then_decays_linearly_to_lr_min():
    args = train.get_args(["--lr", "1e-3", "--lr-min", "1e-5", "--warmup", "10"])
    assert train.lr_at(0, 0.0, args) == pytest.approx(1e-4)                # (step + 1) / warmup
    assert train.lr_at(9, 0.0, args) == pytest.approx(1e-3)
    assert train.lr_at(10, 0.5, args) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down
    assert train.lr_at(10_000, 1.0, args) == pytest.approx(1e-5)
    assert train.lr_at(10_000, 1.7, args) == pytest.approx(1e-5)           # never below lr_min


def test_ema_warm_up_follows_1_plus_n_over_10_plus_n_then_the_decay():
    ema, net = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(0.0)
    net.weight.data.fill_(1.0)
    models.ema_update(ema, net, 0.999, step=0)          # decay' = min(0.999, 1/10): moves 90% of the way
    assert ema.weight.item() == pytest.approx(0.9)
    ema.weight.data.fill_(0.0)
    models.ema_update(ema, net, 0.999, step=10_000)     # warm-up over: 0.999
    assert ema.weight.item() == pytest.approx(0.001)


class FakeDDP(torch.nn.Module):
    """Records which micro-steps ran inside no_sync."""

    def __init__(self, net):
        super().__init__()
        self.net, self.synced, self.inside = net, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        yield
        self.inside = False

    def forward(self, *a):
        self.synced.append(not self.inside)
        return self.net(*a)


def test_accumulated_micro_steps_give_the_mean_gradient_and_sync_only_on_the_last():
    net = tiny()
    method = losses.FlowMatching(null_tok(6), 0.0, generator=torch.Generator().manual_seed(0))
    x = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ddp = FakeDDP(net)
    losses_k = []
    for i, x0 in enumerate(x):
        loss, _ = train.micro_step(method, ddp, x0, ["a"] * 4, 0.0, accum=3, sync=i == 2, autocast=contextlib.nullcontext())
        losses_k.append(loss.detach())
    assert ddp.synced == [False, False, True]          # all-reduce once, on the last micro-batch
    accumulated = [p.grad.clone() for p in net.parameters()]
    # the same three batches and draws, as one mean loss
    net.zero_grad()
    method = losses.FlowMatching(null_tok(6), 0.0, generator=torch.Generator().manual_seed(0))
    total = sum(method.loss(net, x0, ["a"] * 4, 0.0)[0] for x0 in x) / 3
    total.backward()
    assert total.item() == pytest.approx(torch.stack(losses_k).mean().item(), rel=1e-6)
    for a, b in zip(accumulated, (p.grad for p in net.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_fake_branch_trains_next_step_on_this_steps_landings():
    net, B = tiny(), 8
    ema = copy.deepcopy(net).requires_grad_(False)
    tok = lambda caps: torch.tensor([[1 + len(c) % 7] * 6 if c else [0] * 6 for c in caps])
    method = losses.SelfE(tok, 0.0, ema, net, tau_anneal=0.0, fake_start=0.5,
                          generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(B, 3, 8, 8)
    method.loss(net, x0, ["a red circle"] * B, 0.4)
    assert method.rider is None                         # before fake_start: nothing is handed on
    _, parts = method.loss(net, x0, ["a red circle"] * B, 0.6)
    rider = method.rider
    assert parts["fake"] == 0.0 and rider["x"].shape == (B // 4, 3, 8, 8)   # made now, used next step
    assert torch.equal(rider["ids"], tok(["fake image a red circle"] * (B // 4)))
    calls = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    _, parts = method.loss(net, x0, ["a red circle"] * B, 0.7)
    hook.remove()
    assert calls[0] == B + B // 4 and parts["fake"] > 0     # the riders rode in the pass with gradient


def test_sampling_defaults_per_method_and_explicit_values_win():
    # each method's sampler, as README and the paper give it (not read back from sampler.DEFAULTS)
    assert sample.sampling_defaults({"method": "selfe"}) == dict(omega=1.0, eta=1.0, s_mode="next")
    assert sample.sampling_defaults({"method": "flow"}) == dict(omega=2.0, eta=0.0, s_mode="same")
    assert sample.sampling_defaults({"method": "meanflow"}) == dict(omega=1.0, eta=0.0, s_mode="next")
    assert sample.sampling_defaults({"method": "selfe", "omega": 3.0})["omega"] == 3.0   # the run's --omega
    assert sample.sampling_defaults({"method": "selfe", "cfg": 3.0})["omega"] == 3.0     # ... as older runs named it
    got = sample.sampling_defaults({"method": "selfe", "omega": 3.0}, omega=1.5, eta=0.0, s_mode=0.0)
    assert got == dict(omega=1.5, eta=0.0, s_mode=0.0)                                 # 0.0 is a value
    assert sampler.target_time(0.8, 0.2, 0.0) == 0.2 and sampler.target_time(0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert sampler.target_time(0.8, 0.2, "same") == 0.8


def test_grid_labels_show_the_whole_prompt():
    long = "a blue triangle and a yellow circle left of a green square"
    images = {1: np.full((2, 32, 32, 3), 255, np.uint8)}
    ink = lambda p: (np.asarray(sample.grid_image(images, [p], [1], 2))[:, :200] < 128).any(-1)
    rows_long, rows_short = ink(long).any(1).nonzero()[0], ink("a red circle").any(1).nonzero()[0]
    assert rows_long.max() - rows_long.min() > 1.5 * (rows_short.max() - rows_short.min())   # two lines
    assert ink(long).sum() > 3 * ink("a red circle").sum()                   # the whole text, not 34 characters
