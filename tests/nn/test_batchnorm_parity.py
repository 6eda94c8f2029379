"""The parity table: normlab BatchNorm* against torch.nn.BatchNorm* (torch is the oracle).

Each row trains both modules for 5 steps on the same inputs and compares outputs,
input/weight/bias gradients and running buffers, then compares eval outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import normlab.nn as nlnn

TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
OURS_BN = {2: nlnn.BatchNorm1d, 3: nlnn.BatchNorm1d, 4: nlnn.BatchNorm2d, 5: nlnn.BatchNorm3d}


@dataclass(frozen=True)
class Row:
    shape: tuple[int, ...]
    layout: str = "contiguous"  # contiguous | channels_last | noncontiguous
    dtype: torch.dtype = torch.float32
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.shape}-{self.layout}-{dt}-{extra}"


ROWS = [
    # N in {2, 3, 64} x spatial {1x1, 7x5, 32x32}
    *[Row((n, 4, h, w)) for n in (2, 3, 64) for (h, w) in ((1, 1), (7, 5))],
    Row((2, 3, 32, 32)),
    Row((3, 3, 32, 32)),
    Row((64, 3, 32, 32)),
    # (N, C) and (N, C, L), 3d
    Row((2, 5)),
    Row((64, 16)),
    Row((3, 6, 11)),
    Row((2, 3, 4, 5, 3)),
    # layouts
    Row((8, 6, 7, 5), "channels_last"),
    Row((4, 5, 3, 4, 6), "channels_last"),
    Row((8, 6, 7, 5), "noncontiguous"),
    Row((6, 5, 9), "noncontiguous"),
    # momentum, flags
    *[Row((8, 4, 3, 3), kwargs={"momentum": m}) for m in (0.1, None, 0.0)],
    Row((8, 4, 3, 3), kwargs={"affine": False}),
    Row((8, 4, 3, 3), kwargs={"track_running_stats": False}),
    Row((16, 7), kwargs={"affine": False, "momentum": None}),
    Row((8, 4, 3, 3), kwargs={"eps": 1e-3}),
    # low precision input, fp32 parameters
    Row((8, 4, 5, 5), dtype=torch.bfloat16),
    Row((8, 4, 5, 5), dtype=torch.float16),
    Row((16, 8), dtype=torch.bfloat16),
]


def _make_input(row: Row, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if row.layout == "noncontiguous":  # every other element of the last axis
        big = torch.randn(*row.shape[:-1], row.shape[-1] * 2, generator=g) * 2 + 0.5
        x = big[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(row.shape, generator=g) * 2 + 0.5
    x = x.to(row.dtype)
    if row.layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _tols(dtype: torch.dtype) -> tuple[dict[str, float], dict[str, float]]:
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-4, "atol": 1e-4}
    # fp16/bf16 outputs are rounded to 8-11 bits: compare at that precision
    out = {"rtol": 1e-2, "atol": 2e-2} if dtype == torch.float16 else {"rtol": 2e-2, "atol": 5e-2}
    return out, {"rtol": 5e-2, "atol": 5e-2}


def _pair(row: Row, backend: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ndim = len(row.shape)
    ref = TORCH_BN[ndim](row.shape[1], **row.kwargs)
    ours = OURS_BN[ndim](row.shape[1], backend=backend, **row.kwargs)
    if ref.weight is not None:  # non-trivial affine parameters
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            ref.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("row", ROWS, ids=str)
def test_parity_with_torch(row: Row, backend: str) -> None:
    ref, ours = _pair(row, backend)
    out_tol, grad_tol = _tols(row.dtype)
    for step in range(5):
        x = _make_input(row, seed=step)
        xa = x.detach().clone().requires_grad_(True)
        xb = x.detach().clone().requires_grad_(True)
        ya, yb = ref(xa), ours(xb)
        assert yb.dtype == ya.dtype
        assert yb.shape == ya.shape
        if row.layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert yb.is_contiguous(memory_format=fmt), "output must keep channels_last"
        torch.testing.assert_close(yb.float(), ya.float(), **out_tol)
        g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(100 + step)).to(ya.dtype)
        ya.backward(g)
        yb.backward(g)
        assert xa.grad is not None and xb.grad is not None
        torch.testing.assert_close(xb.grad.float(), xa.grad.float(), **grad_tol)
        if ref.weight is not None:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **grad_tol)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **grad_tol)
            ref.zero_grad()
            ours.zero_grad()
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=1e-5, atol=1e-5)
    ref.eval()
    ours.eval()
    x = _make_input(row, seed=99)
    torch.testing.assert_close(ours(x).float(), ref(x).float(), **out_tol)


@pytest.mark.parametrize("backend", ["auto", "reference", "native"])
def test_state_dict_round_trip_both_ways(backend: str) -> None:
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5)
    ref.train()
    for _ in range(3):
        ref(torch.randn(4, 5, 3, 3))
    ours = nlnn.BatchNorm2d(5, backend=backend)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(6, 5, 4, 4)
    for mode in (True, False):
        for m in (ref, ours, back):
            m.train(mode)
        a, b, c = ref(x), ours(x), back(x)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
