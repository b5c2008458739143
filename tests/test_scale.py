"""Scale-out on a CPU-only machine: DDP with gloo (2 processes), bf16 autocast, torch.compile."""
import copy
import json
import os

import pytest
import torch

from conftest import selfe, spawn, step_inputs as tiny_step_inputs, tiny_dit as tiny_net

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # spawn adds python


@pytest.mark.slow
def test_ddp_matches_single_process_on_the_combined_batch():
    r = spawn(*TORCHRUN, "tests/ddp_check.py", timeout=300)
    assert r.returncode == 0 and "DDP OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.slow
def test_train_under_torchrun_then_resume_in_one_process(tmp_path):
    out = str(tmp_path / "run")
    args = ["train.py", "--batch-size", "8", "--max-minutes", "0", "--sample-every", "0", "--log-every", "2",
            "--ckpt-every", "2", "--grad-accum", "2", "--out", out]  # micro-steps under DDP: no_sync, then sync
    r = spawn(*TORCHRUN, *args, "--max-steps", "4", timeout=300, threads=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 4 and len(ck["rng"]) == 2            # both ranks' random streams are saved
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    r = spawn(*args, "--resume", "--max-steps", "6", timeout=300)
    assert r.returncode == 0 and "done: 6 steps" in r.stdout, r.stderr[-3000:]


def test_bf16_autocast_step_on_cpu():
    net = tiny_net()
    ema = copy.deepcopy(net).requires_grad_(False)
    inputs = tiny_step_inputs()
    loss32, _, _ = selfe(ema, net).step_loss(net, *inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _, _ = selfe(ema, net).step_loss(net, *inputs)
        assert net.x_embed(torch.randn(2, 48)).dtype == torch.bfloat16  # autocast is really on
    loss16.backward()
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights stay fp32


@pytest.mark.slow
def test_compiled_step_matches_eager_and_does_not_recompile():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    net = tiny_net()
    eager, ema = copy.deepcopy(net), copy.deepcopy(net).requires_grad_(False)
    compiled, ema_c = torch.compile(net), torch.compile(ema)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    graphs = []
    for step in range(3):
        inputs = tiny_step_inputs(seed=step)  # new data every step, same shapes
        loss, _, _ = selfe(ema_c, compiled).step_loss(compiled, *inputs)
        if step == 0:
            ref, _, _ = selfe(ema, eager).step_loss(eager, *inputs)
            assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, ref.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs  # no recompiles


@pytest.mark.slow
def test_meanflow_under_torchrun_takes_its_jvp_outside_ddp(tmp_path):
    """torch.func.jvp cannot run through a DDP module: MeanFlow's JVP runs on the plain module (no gradient) and
    the gradient pass goes through DDP, so the ranks stay in step (the checkpoint is rank 0's weights)."""
    out = str(tmp_path / "mf")
    r = spawn(*TORCHRUN, "train.py", "--method", "meanflow", "--batch-size", "8", "--max-steps", "3",
              "--max-minutes", "0", "--sample-every", "0", "--log-every", "1", "--out", out, timeout=300, threads=1)
    assert r.returncode == 0 and "done: 3 steps" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    rec = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(rec) == 3 and all(x["dudt"] > 0 for x in rec)
