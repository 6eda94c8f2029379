"""SyncBatchNorm over gloo, 2 processes on 127.0.0.1: equal to single-process BatchNorm on the whole batch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab.nn as nlnn

SPLITS = {"equal": (4, 4), "uneven": (5, 3), "empty_rank": (8, 0)}


def _reference(x: torch.Tensor, g: torch.Tensor, steps: int = 2) -> dict[str, torch.Tensor]:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        y = bn(xr)
        (y * g).sum().backward()
    return {
        "y": y.detach(),
        "dx": xr.grad,
        "dw": bn.weight.grad / steps,
        "rv": bn.running_var.clone(),
        "rm": bn.running_mean.clone(),
    }


def _worker(rank: int, world: int, out: str) -> None:
    # A FileStore rendezvous: no TCP port to pick, so no race with other processes for it.
    store = dist.FileStore(str(Path(out, "store")), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 3, 4, 4) * 2 + 1
        g = torch.randn(8, 3, 4, 4)
        ref = _reference(x, g)
        for name, (a, b) in SPLITS.items():
            lo, hi = (0, a) if rank == 0 else (a, a + b)
            sync = nlnn.SyncBatchNorm(3)
            with torch.no_grad():
                sync.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
                sync.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            for _ in range(2):
                xl = x[lo:hi].clone().requires_grad_()
                y = sync(xl)
                (y * g[lo:hi]).sum().backward()
            torch.testing.assert_close(y.detach(), ref["y"][lo:hi], rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(xl.grad, ref["dx"][lo:hi], rtol=1e-5, atol=1e-5, msg=name)
            dw = sync.weight.grad.clone() / 2
            dist.all_reduce(dw)  # local sums: their sum over ranks is the whole batch's gradient
            torch.testing.assert_close(dw, ref["dw"], rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(sync.running_var, ref["rv"], rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(sync.running_mean, ref["rm"], rtol=1e-5, atol=1e-5, msg=name)
        # a converted BN+act keeps its activation and equals BN + activation over the whole batch
        act = nlnn.SyncBatchNorm.convert_sync_batchnorm(nlnn.BatchNormAct2d(3, negative_slope=0.1))
        assert isinstance(act, nlnn.SyncBatchNorm) and act.activation == "leaky_relu"
        xl = x[rank * 4 : rank * 4 + 4].clone().requires_grad_()
        y = act(xl)
        xr = x.clone().requires_grad_()
        yr = nn.functional.leaky_relu(nn.BatchNorm2d(3)(xr), 0.1)
        torch.testing.assert_close(y, yr[rank * 4 : rank * 4 + 4], rtol=1e-5, atol=1e-5)
        (y * g[rank * 4 : rank * 4 + 4]).sum().backward()
        (yr * g).sum().backward()
        torch.testing.assert_close(xl.grad, xr.grad[rank * 4 : rank * 4 + 4], rtol=1e-5, atol=1e-5)
        # ranks that disagree on channels or dtype all raise, naming every rank's layout
        for mismatch in ("channels", "dtype"):
            layer = nlnn.SyncBatchNorm(3)
            bad = torch.randn(4, 4 if mismatch == "channels" else 3, 2, 2)
            if mismatch == "dtype":
                bad = bad.double()
            mine = bad if rank == 1 else torch.randn(4, 3, 2, 2)
            try:
                layer(mine)
            except ValueError as err:
                assert "the processes' inputs differ" in str(err), err
                assert "rank 0: 3 channels, torch.float32, 4D" in str(err), err
            else:
                raise AssertionError(f"a {mismatch} mismatch across ranks did not raise")
        # DistributedDataParallel wraps a converted model
        model = nlnn.SyncBatchNorm.convert_sync_batchnorm(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        )
        assert isinstance(model[1], nlnn.SyncBatchNorm)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(x[rank * 4 : rank * 4 + 4]).sum().backward()
        del ddp  # its reducer must not outlive the process group
        Path(out, f"ok{rank}").write_text("ok")
        # Both ranks reach here before either tears gloo down: a rank that closes its pairs
        # while the other still reads from them aborts the other (seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_two_processes(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("SyncBatchNorm test hung (a collective was never matched)")
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]


def test_single_process_is_batchnorm() -> None:
    x = torch.randn(6, 3, 2, 2)
    a, b = nlnn.SyncBatchNorm(3), nn.BatchNorm2d(3)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_convert_returns_new_module_for_a_root_batchnorm() -> None:
    bn = nn.BatchNorm1d(5)
    bn.running_mean.fill_(2.0)
    sync = nlnn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, nlnn.SyncBatchNorm) and sync is not bn
    assert torch.equal(sync.running_mean, bn.running_mean)
