"""Run by tests/test_scale.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Three Self-E steps with DDP, each rank on its own half of the data; rank 0 repeats them in one process on
the combined batch (same images, captions, times and noise). Parameters must be identical across ranks
and equal (within tolerance) to the single-process run."""
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import selfe, step_inputs, tiny_dit  # noqa: E402  (conftest puts the repository root on the path)

B = 4  # per rank


def make_batch(rank, step):
    return step_inputs(B, seed=100 * step + rank)


def ema_update(ema, net):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p, 0.5)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    net = tiny_dit()  # off the zero init, so that every term carries gradient
    ref, ema = copy.deepcopy(net), copy.deepcopy(net).requires_grad_(False)
    ema_ref = copy.deepcopy(ema)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)  # linear in the gradient: a fair comparison (Adam is not)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    method, method_ref = selfe(ema, net), selfe(ema_ref, ref)
    for step in range(3):
        x0, ids, t, s, jump, eps, eps2 = make_batch(rank, step)
        loss, _, _ = method.step_loss(ddp, x0, ids, t, s, jump, eps, eps2)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema_update(ema, net)
        if rank == 0:  # the same step in one process, on the combined batch of both ranks
            b0, b1 = make_batch(0, step), make_batch(1, step)
            jump = torch.cat([b0[4], b1[4] + B])  # both ranks' jumps, rank 1's indices shifted
            x0, ids, t, s, _, eps, eps2 = (torch.cat([u, v]) for u, v in zip(b0, b1))
            loss, _, _ = method_ref.step_loss(ref, x0, ids, t, s, jump, eps, eps2)
            loss.backward()
            opt_ref.step()
            opt_ref.zero_grad()
            ema_update(ema_ref, ref)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "parameters differ across ranks"
    if rank == 0:
        ref_flat = torch.cat([p.detach().flatten() for p in ref.parameters()])
        err = (flat - ref_flat).abs().max().item()
        assert err < 1e-5, f"DDP and single-process parameters differ by {err}"
        print(f"DDP OK: ranks identical, max |DDP - single| = {err:.2e}")
    dist.barrier()  # rank 1 must not tear down while rank 0 is still checking (it aborted once in CI)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
