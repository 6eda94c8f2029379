"""normlab.functional.batch_norm against torch.nn.functional.batch_norm and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

from normlab.functional import batch_norm, batch_norm_train

BACKENDS = ["auto", "reference", "native"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3), (2, 4, 2, 3, 2)])
def test_matches_torch_functional(backend: str, training: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4, backend=backend)
    y2 = tF.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-4)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(backend: str, affine: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add_(0.5).requires_grad_(affine)
    b = torch.randn(3, dtype=torch.float64, requires_grad=affine)
    args = (x, w, b) if affine else (x,)

    def f(
        x: torch.Tensor, w: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        return batch_norm(x, None, None, w, b, True, backend=backend)

    # fast mode: a random projection of the Jacobian (torch's own option for slow gradchecks;
    # full second-order checks on ATen's composite double backward took ~15 s a case)
    assert torch.autograd.gradcheck(f, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, args, fast_mode=True)


def test_gradcheck_masked() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    mask[0, :2] = True

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, None, None, w, b, True, mask=mask)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # masked positions carry no gradient to x
    f(x, w, b).sum().backward()
    assert x.grad is not None
    assert torch.all(x.grad.transpose(0, 1)[:, ~mask] == 0)


def test_closed_form_backward_matches_autograd_of_reference_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    g = torch.randn(8, 3, 4, 4)
    y = batch_norm(x, None, None, w, b, True, backend="reference")
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), keepdim=True, correction=0)
    y_ref = (x - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, w, b), g)
    for a, r in ((dx, rx), (dw, rw), (db, rb)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_vmap_and_grad_through_batch_norm_train() -> None:
    torch.manual_seed(0)
    xs = torch.randn(4, 6, 3)  # 4 independent models' batches
    ws = torch.rand(4, 3) + 0.5

    def loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, _, _ = batch_norm_train(x, w, None, 1e-5)
        return (y**3).sum()

    grads = torch.func.vmap(torch.func.grad(loss))(ws, xs)
    for k in range(4):
        w = ws[k].clone().requires_grad_()
        ref = tF.batch_norm(xs[k], None, None, w, None, True)
        (g,) = torch.autograd.grad((ref**3).sum(), w)
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-5)


def test_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(
        ValueError,
        match="backend must be one of 'auto', 'reference', 'native', 'fused', got 'fast'",
    ):
        batch_norm(x, None, None, training=True, backend="fast")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm(torch.randn(4), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(
        ValueError, match="nonfinite must be one of 'skip', 'raise', 'propagate', got 'warn'"
    ):
        batch_norm(x, torch.zeros(3), torch.ones(3), training=True, nonfinite="warn")  # type: ignore[arg-type]


def test_nonfinite_policies_in_functional() -> None:
    x = torch.randn(4, 3)
    x[0, 0] = float("inf")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(
        RuntimeWarning,
        match=r"in channel\(s\) 0 in training; those channels' running statistics were left unchanged",
    ):
        batch_norm(x, rm, rv, training=True, nonfinite="skip")
    assert rm[0] == 0 and rv[0] == 1  # the poisoned channel is untouched
    torch.testing.assert_close(rm[1:], 0.1 * x[:, 1:].mean(0))  # the others moved
    with pytest.raises(
        FloatingPointError, match=r"non-finite batch statistics \(NaN/Inf\) in channel\(s\) 0"
    ):
        batch_norm(x, rm, rv, training=True, nonfinite="raise")
