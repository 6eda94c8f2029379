"""SyncBatchNorm with process_group subgroups: 4 gloo processes in two groups of 2. Each group's
statistics span its own two processes only — equal to single-process BatchNorm over that
group's data — and accumulate_batchnorm / revert_sync_batchnorm work per group."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.nn as nlnn
from normlab.nn.utils import accumulate_batchnorm

WORLD = 4
# each group's batch of 8 samples, split over its two ranks (group 1 unevenly)
SPLITS = {0: (0, 4), 1: (4, 8), 2: (0, 5), 3: (5, 8)}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _group_data(group: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + group)
    scale, shift = (1.0, 0.0) if group == 0 else (3.0, 2.0)  # the groups see different data
    x = torch.randn(8, 3, 4, 4, generator=gen) * scale + shift
    return x, torch.randn(8, 3, 4, 4, generator=gen)


def _affine(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _worker(rank: int, world: int, out: str) -> None:
    store = dist.FileStore(str(Path(out, "store")), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
        g = rank // 2
        mine = groups[g]
        x, grad = _group_data(g)
        lo, hi = SPLITS[rank]

        # the oracle: single-process BatchNorm over the group's whole batch, two steps
        ref = _affine(nn.BatchNorm2d(3))
        for _ in range(2):
            xr = x.clone().requires_grad_()
            yr = ref(xr)
            (yr * grad).sum().backward()

        sync = _affine(nlnn.SyncBatchNorm(3, process_group=mine))
        for _ in range(2):
            xl = x[lo:hi].clone().requires_grad_()
            y = sync(xl)
            (y * grad[lo:hi]).sum().backward()
        torch.testing.assert_close(y.detach(), yr.detach()[lo:hi], **TOL)
        torch.testing.assert_close(xl.grad, xr.grad[lo:hi], **TOL)
        dw = sync.weight.grad.clone()
        dist.all_reduce(dw, group=mine)  # per-rank sums: their sum over the group is the batch's
        torch.testing.assert_close(dw, ref.weight.grad, **TOL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(sync, name), getattr(ref, name), **TOL)
        # ... and not shared with the other group: the two groups' statistics differ
        means = [torch.empty(3) for _ in range(world)]
        dist.all_gather(means, sync.running_mean.clone())
        assert torch.equal(means[2 * g], means[2 * g + 1])
        assert not torch.allclose(means[0], means[2], atol=0.1)

        # convert_sync_batchnorm(model, group): the group travels with every converted layer
        torch.manual_seed(0)  # the same convolution on every rank
        model = nlnn.SyncBatchNorm.convert_sync_batchnorm(
            nn.Sequential(nn.Conv2d(3, 3, 1), _affine(nn.BatchNorm2d(3))), process_group=mine
        )
        assert model[1].process_group is mine
        twin = nn.Sequential(nn.Conv2d(3, 3, 1), _affine(nn.BatchNorm2d(3)))
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x[lo:hi]), twin(x)[lo:hi], **TOL)
        torch.testing.assert_close(model[1].running_var, twin[1].running_var, **TOL)

        # accumulate_batchnorm: two micro-batches per rank, one update equal to one forward of
        # everything the group saw (both micro-batches on both ranks)
        acc = _affine(nlnn.SyncBatchNorm(3, process_group=mine, momentum=None))
        whole = _affine(nn.BatchNorm2d(3, momentum=None))
        micro = [x[lo:hi], x[lo:hi] * 0.5 + 1]
        with accumulate_batchnorm(acc):
            for part in micro:
                acc(part)
        everything = torch.cat([x * 1.0, x * 0.5 + 1])  # (order does not matter)
        whole(everything)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(acc, name), getattr(whole, name), **TOL)

        # revert_sync_batchnorm: back to the single-process layer, same state, same eval output
        back = nlnn.SyncBatchNorm.revert_sync_batchnorm(model)
        assert type(back[1]) is nlnn.BatchNorm2d and back[1].running_var is model[1].running_var
        back.eval()
        torch.testing.assert_close(back(x), twin.eval()(x), **TOL)

        Path(out, f"ok{rank}").write_text("ok")
        dist.barrier()  # nobody tears gloo down while another rank still reads from it
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_subgroups_four_processes(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.time() + 150
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("SyncBatchNorm subgroup test hung (a collective was never matched)")
    assert sorted(p.name for p in tmp_path.glob("ok*")) == [f"ok{r}" for r in range(WORLD)]
