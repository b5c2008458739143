"""The GPU path's faults that a CPU can show (issue: the GPU path a user can trust): a resumed run keeps its own
precision, two SIGTERMs a moment apart still save, new ranks get their own random streams, --out is checked to be
one folder for every rank, the loss parts stay on the device, and MeanFlow's JVP runs in fp32 inside bf16."""
import os
import signal
import time

import pytest
import torch

import levers
import losses
import train
from conftest import SMALL as FLAGS, ckpt_step, cli, null_tok, selfe, spawn, spawn_signalled, step_inputs, tiny_dit

SMALL = [f for f in FLAGS if f not in ("--precision", "fp32")] + ["--batch-size", "8"]  # the precision is the test's


def weights(path):
    ck = torch.load(path, weights_only=True)
    return {f"{k}.{n}": v for k in ("model", "ema") for n, v in ck[k].items()}


def test_a_resumed_run_keeps_its_own_precision(tmp_path):
    """bf16 for 6 steps straight, against bf16 stopped by SIGTERM after step 3 and resumed WITHOUT --precision:
    bit for bit (before the fix the resumed half took the device's default, fp32 on a CPU: 3.6e-4 apart)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    steps = ["--precision", "bf16", "--max-steps", "6", "--ckpt-every", "1000"]
    assert cli("train", *SMALL, *steps, "--out", a).returncode == 0
    p = spawn_signalled(signal.SIGTERM, 3, *SMALL, *steps, "--out", b, threads=torch.get_num_threads())
    assert p.returncode == 128 + signal.SIGTERM and ckpt_step(os.path.join(b, "ckpt.pt")) == 3, p.stderr[-2000:]
    r = cli("train", "--resume", "--out", b)
    assert "done: 6 steps" in r.stdout and "| bf16 |" in r.stdout, r.stdout[-1000:] + r.stderr[-2000:]
    A, B = weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt"))
    assert all(torch.equal(A[k], B[k]) for k in A), "a bf16 run resumed differs from the straight run"


def test_two_sigterms_a_moment_apart_still_save(tmp_path):
    """What Slurm and torchrun do: the job's processes each get SIGTERM, 0.3 s apart here. The run saves and stops."""
    out = str(tmp_path / "run")
    p = spawn_signalled(signal.SIGTERM, 4, *FLAGS, "--batch-size", "8", "--max-steps", "50", "--ckpt-every", "1000",
                        "--out", out, on="twice")
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert ckpt_step(os.path.join(out, "ckpt.pt")) == 4 and "not saved" not in p.stderr + p.stdout


def test_a_second_ctrl_c_stops_at_once_only_after_a_pause():
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = train.StopRequest(patience=2.0)
        stop.handle(signal.SIGINT, None)
        stop.handle(signal.SIGINT, None)          # the same signal again at once: still saving
        stop.handle(signal.SIGTERM, None)
        assert stop.signal == "SIGINT"
        stop.at = time.monotonic() - 3.0          # a person presses Ctrl-C again, 3 s later
        with pytest.raises(SystemExit, match="second SIGINT; not saved"):
            stop.handle(signal.SIGINT, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_rank_the_checkpoint_has_no_stream_for_gets_its_own():
    gen0 = torch.Generator().manual_seed(0)
    torch.rand(10, generator=gen0)                # rank 0 of a 1-process run, some steps in
    ckpt = dict(rng=[gen0.get_state()], step=7)
    r0, r1, r2 = (train.rank_stream(0, r, ckpt) for r in range(3))
    assert torch.equal(r0.get_state(), gen0.get_state())                 # rank 0 continues its own stream
    draws = [torch.rand(8, generator=g) for g in (r0, r1, r2)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(torch.rand(8, generator=train.rank_stream(0, 1, ckpt)), draws[1])   # and reproducibly so
    fresh = [torch.rand(8, generator=train.rank_stream(0, r)) for r in (0, 1)]
    assert not torch.equal(fresh[0], fresh[1])


@pytest.mark.slow  # two torchrun starts
def test_resume_on_more_processes_gives_each_rank_its_own_draws(tmp_path):
    out = str(tmp_path / "run")
    args = ["train.py", *FLAGS, "--batch-size", "8", "--ckpt-every", "1000", "--out", out]
    assert spawn(*args, "--max-steps", "2", timeout=300).returncode == 0
    r = spawn("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--resume", "--out", out,
              "--max-steps", "4", timeout=300, threads=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rng = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1])   # before the fix: rank 1 replayed rank 0's stream


def test_a_rank_that_cannot_read_rank_0s_token_is_told(tmp_path):
    path = str(tmp_path / ".rank0_token")
    assert not train.shared_token_ok(path, "abc")          # node-local disk: rank 0's file is not there
    with open(path, "w") as f:
        f.write("another run")
    assert not train.shared_token_ok(path, "abc")          # an older file of another start
    with open(path, "w") as f:
        f.write("abc")
    assert train.shared_token_ok(path, "abc")


@pytest.mark.parametrize("kind", ["flow", "selfe", "flow-target", "fake", "meanflow"])
def test_the_loss_parts_stay_on_the_device(monkeypatch, kind):
    """No .item() inside a micro-step (each is a host-device sync on a GPU): the parts are tensors, read by train.py
    on logging steps only."""
    net = tiny_dit()
    ema = tiny_dit().requires_grad_(False)
    tok = lambda captions: torch.tensor([[0] * 6 if c == "" else [1 + i % 9] * 6 for i, c in enumerate(captions)])
    method = {"flow": lambda: losses.FlowMatching(tok, 0.0),
              "selfe": lambda: losses.SelfE(tok, 0.0, ema, net),
              "flow-target": lambda: levers.Levers(tok, 0.0, ema, net, flow_target=0.5, flow_steps=2),
              "fake": lambda: losses.SelfE(tok, 0.0, ema, net, fake_start=0.0),
              "meanflow": lambda: losses.MeanFlow(tok, 0.0, net, omega=2.0)}[kind]()
    x0 = torch.randn(8, 3, 8, 8)

    def no_sync(self):
        raise AssertionError(".item() in a training step")
    for progress in (0.5, 0.6):  # the fake term's riders join in the second step
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        loss, parts = method.loss(net, x0, ["a red circle"] * 8, progress)
        monkeypatch.undo()
        loss.backward()
    assert torch.isfinite(loss) and isinstance(parts["data"], torch.Tensor) and parts["data"].requires_grad is False
    assert isinstance(parts["data_t0"], torch.Tensor)


def test_time_bins_are_per_bin_means_with_nan_for_an_empty_bin():
    t = torch.tensor([0.1, 0.2, 0.6, 0.9])
    got = losses.bin_losses(t, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert torch.allclose(got[[0, 2, 3]], torch.tensor([2.0, 5.0, 7.0])) and torch.isnan(got[1])


def test_meanflow_jvp_runs_in_fp32_inside_bf16_autocast():
    net = tiny_dit()
    x0, ids, t, s, _, eps, _ = step_inputs(4)
    x_t, v = losses.add_noise(x0, eps, t), eps - x0
    _, want = losses.meanflow_dudt(net, x_t, t, s, ids, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.x_embed(torch.randn(2, net.x_embed.in_features)).dtype == torch.bfloat16  # autocast is on
        _, got = losses.meanflow_dudt(net, x_t, t, s, ids, v)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_self_e_step_reads_as_the_summary_with_the_hook_empty():
    """The paper's SelfE has no trajectory targets; the levers' hook is the only thing levers.py overrides."""
    net, ema = tiny_dit(), tiny_dit().requires_grad_(False)
    x0, ids, t, s, jump, eps, eps2 = step_inputs(8)
    assert selfe(ema, net).trajectory_targets(losses.add_noise(x0, eps, t), ids, t, s, jump) == []
    own = {k for k, v in vars(levers.Levers).items() if callable(v)}
    assert own == {"__init__", "slices", "times", "trajectory_targets"}
    m = levers.Levers(null_tok(), 0.0, ema, net, flow_target=0.5)
    assert len(m.trajectory_targets(losses.add_noise(x0, eps, t), ids, t, s, jump)) == 1
