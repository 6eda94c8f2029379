"""BatchRenorm and GhostBatchNorm against torch's BatchNorm and autograd references."""

from __future__ import annotations

import pytest
import torch

import normlab.nn as nlnn
from normlab.functional import batch_norm_train, ghost_chunks
from normlab.kernels import fused_available


def _set_affine(*mods: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    w, b = (
        torch.rand(mods[0].num_features, generator=g) + 0.5,
        torch.randn(mods[0].num_features, generator=g),
    )
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
            m.bias.copy_(b)


# --- BatchRenorm ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "ref_cls", "shape"),
    [
        (nlnn.BatchRenorm1d, torch.nn.BatchNorm1d, (16, 5)),
        (nlnn.BatchRenorm2d, torch.nn.BatchNorm2d, (8, 5, 4, 3)),
        (nlnn.BatchRenorm3d, torch.nn.BatchNorm3d, (4, 5, 2, 3, 2)),
    ],
)
def test_renorm_with_unit_limits_is_batchnorm(
    cls: type, ref_cls: type, shape: tuple[int, ...]
) -> None:
    ours, ref = cls(5, r_max=1.0, d_max=0.0), ref_cls(5)
    _set_affine(ours, ref)
    for step in range(4):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "native", "fused"])
def test_renorm_matches_autograd_reference_when_r_d_are_active(backend: str) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    torch.manual_seed(0)
    m = nlnn.BatchRenorm1d(4, r_max=1.5, d_max=0.5, momentum=0.5, backend=backend)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([3.0, -3.0, 0.1, 0.0]))
        m.running_var.copy_(torch.tensor([0.1, 9.0, 1.0, 1.0]))
        m.weight.copy_(torch.rand(4) + 0.5)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x = (torch.randn(32, 4) * 2 + 0.5).requires_grad_()
    y = m(x)
    xr = x.detach().clone().requires_grad_()
    mu, var = xr.mean(0), xr.var(0, correction=0)
    sigma_b, sigma = torch.sqrt(var + m.eps), torch.sqrt(rv + m.eps)
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mu - rm) / sigma).clamp(-0.5, 0.5).detach()
    assert (r != 1).any() and (d != 0).any()  # the correction is active
    y_ref = m.weight * ((xr - mu) / sigma_b * r + d) + m.bias
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    # running statistics: the usual update, from the pre-step running values
    torch.testing.assert_close(m.running_mean, 0.5 * rm + 0.5 * mu.detach())


def test_renorm_mask_on_1d() -> None:
    m = nlnn.BatchRenorm1d(3, r_max=1.0, d_max=0.0)
    ref = torch.nn.BatchNorm1d(3)
    x = torch.randn(2, 3, 6)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    y = m(x, mask=mask)
    valid = torch.cat([x[0], x[1, :, :2]], dim=1).T
    torch.testing.assert_close(
        torch.cat([y[0], y[1, :, :2]], dim=1).T, ref(valid), rtol=1e-5, atol=1e-5
    )


def test_renorm_paper_schedule_and_limits() -> None:
    r_max, d_max = nlnn.BatchRenorm2d.paper_schedule()
    assert (r_max(0), d_max(0), r_max(4999)) == (1.0, 0.0, 1.0)
    assert r_max(40_000) == 3.0 and d_max(25_000) == 5.0 and r_max(10**6) == 3.0
    assert r_max(22_500) == pytest.approx(2.0) and d_max(15_000) == pytest.approx(2.5)
    m = nlnn.BatchRenorm2d(2, r_max=r_max, d_max=d_max)
    assert m.limits() == (1.0, 0.0)
    m.num_batches_tracked.fill_(40_000)
    assert m.limits() == (3.0, 5.0)
    assert "r_max=Ramp(start=1.0, end=3.0, start_step=5000, end_step=40000)" in repr(m)
    assert "r_max=schedule" in repr(nlnn.BatchRenorm2d(2, r_max=lambda step: 2.0))


def test_renorm_errors() -> None:
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        nlnn.BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"r_max must be >= 1, got 0.5"):
        nlnn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be a finite number, got nan"):
        nlnn.BatchRenorm1d(3, d_max=float("nan"))
    m = nlnn.BatchRenorm1d(3, r_max=lambda step: 0.5)  # a schedule is checked when evaluated
    with pytest.raises(ValueError, match=r"need finite r_max >= 1 and d_max >= 0, got r_max=0.5"):
        m(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"):
        nlnn.BatchRenorm2d(3)(torch.randn(4, 3))


# --- GhostBatchNorm ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "v", "expected"),
    [
        (64, 32, [32, 32]),
        (70, 32, [32, 32, 6]),
        (65, 32, [32, 33]),
        (20, 32, [20]),
        (33, 32, [33]),
    ],
)
def test_chunk_sizes(n: int, v: int, expected: list[int]) -> None:
    assert ghost_chunks(n, v) == expected


@pytest.mark.parametrize("n", [64, 70, 65, 20, 33])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_ghost_equals_batchnorm_per_chunk(n: int, layout: str, backend: str) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    torch.manual_seed(n)
    x = torch.randn(n, 4, 3, 2) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ours = nlnn.GhostBatchNorm2d(4, virtual_batch_size=32, backend=backend)
    _set_affine(ours)
    xg = x.clone().requires_grad_()
    y = ours(xg)
    sizes = ghost_chunks(n, 32)
    ends = torch.tensor(sizes).cumsum(0).tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    means, vars_ = [], []
    refs = []
    for lo, hi in bounds:
        ref = torch.nn.BatchNorm2d(4, momentum=1.0)
        _set_affine(ref)
        refs.append(ref(x[lo:hi]))
        means.append(ref.running_mean)
        vars_.append(ref.running_var)
    torch.testing.assert_close(y, torch.cat(refs), rtol=1e-5, atol=1e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        ours.running_mean, 0.1 * torch.stack(means).mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        ours.running_var, 0.9 + 0.1 * torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6
    )
    # gradients: each chunk's BatchNorm gradient
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.clone().requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (ours.weight, ours.bias))
    ref_out = torch.cat(
        [torch.nn.functional.batch_norm(xr[lo:hi], None, None, w, b, True) for lo, hi in bounds]
    )
    ref_out.backward(g)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_ghost_is_batchnorm_when_virtual_batch_covers_the_batch() -> None:
    x = torch.randn(16, 5)
    a, b = nlnn.GhostBatchNorm1d(5, virtual_batch_size=16), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_ghost_errors() -> None:
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer >= 2, got 1"):
        nlnn.GhostBatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match=r"virtual_batch_size must be an integer >= 2, got 2\.5"):
        nlnn.GhostBatchNorm1d(3, virtual_batch_size=2.5)
    with pytest.raises(ValueError, match="GhostBatchNorm does not support mask"):
        nlnn.GhostBatchNorm1d(3)(torch.randn(4, 3, 2), mask=torch.ones(4, 2, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_ghost_without_affine_and_1d(backend: str) -> None:
    if backend == "fused" and not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    x = (torch.randn(40, 6) * 3 + 2).requires_grad_()
    ours = nlnn.GhostBatchNorm1d(6, affine=False, virtual_batch_size=16, backend=backend)
    y = ours(x)  # chunks 16, 16, 8
    xr = x.detach().clone().requires_grad_()
    ref = torch.cat(
        [torch.nn.functional.batch_norm(c, None, None, training=True) for c in xr.split(16)]
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    unbiased = torch.stack([c.detach().var(0) for c in xr.split(16)]).mean(0)
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * unbiased, rtol=1e-5, atol=1e-6)


def test_ghost_fused_path_supports_double_backward_and_returns_plain_stats() -> None:
    if not fused_available():
        pytest.skip("no C++ compiler/ninja: the fused kernels cannot be built here")
    x = torch.randn(12, 3, 2, 2, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    _, mean, var = batch_norm_train(
        x, w.requires_grad_(), b.requires_grad_(), 1e-5, chunks=[4, 8], backend="fused"
    )
    assert mean.shape == (2, 3) and not mean.requires_grad and not var.requires_grad

    def penalty(backend: str) -> list[torch.Tensor]:
        m = nlnn.GhostBatchNorm2d(3, virtual_batch_size=4, backend=backend).double()
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((m(xr) ** 3).sum(), xr, create_graph=True)
        gx.square().sum().backward()  # a gradient penalty: needs the double backward
        return [xr.grad, m.weight.grad, m.bias.grad]

    for got, want in zip(penalty("fused"), penalty("reference")):
        torch.testing.assert_close(got, want)
