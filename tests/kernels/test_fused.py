"""The fused C++ kernels against torch: the foundation's parity table, numerics, fallbacks, BN+act."""

from __future__ import annotations

import pytest
import torch

import normlab.nn as nlnn
from normlab.functional import Activation, batch_norm, batch_norm_train, resolve_kernel
from normlab.functional._backend import FUSED_MIN_NUMEL, FUSED_NCHW_FP32_MIN_NUMEL
from normlab.kernels import FusedKernel, KernelError, _build, fused_available

pytestmark = pytest.mark.skipif(
    not fused_available(), reason="no C++ compiler/ninja: the fused kernels cannot be built here"
)

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_BN[5] = torch.nn.BatchNorm3d
OURS_BN = {2: nlnn.BatchNorm1d, 3: nlnn.BatchNorm1d, 4: nlnn.BatchNorm2d, 5: nlnn.BatchNorm3d}


def _input(shape: tuple[int, ...], layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        return x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    if layout == "noncontiguous":  # every other column of a wider tensor
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2]
    return x


PARITY_CASES = [
    *[((n, 5), "contiguous") for n in (2, 3, 64)],
    *[((n, 4, 7), "contiguous") for n in (2, 3, 64)],
    *[((n, 3, h, w), "contiguous") for n in (2, 3, 64) for h, w in ((1, 1), (7, 5), (32, 32))],
    ((2, 3, 4, 5, 3), "contiguous"),
    ((3, 4, 7, 5), "channels_last"),
    ((2, 8, 32, 32), "channels_last"),
    ((2, 3, 4, 5, 3), "channels_last"),
    ((3, 4, 7, 10), "noncontiguous"),
    ((3, 4, 12), "noncontiguous"),
]


@pytest.mark.parametrize(("shape", "layout"), PARITY_CASES, ids=lambda v: str(v))
def test_module_parity_with_torch(shape: tuple[int, ...], layout: str) -> None:
    """Train fwd/bwd, running buffers, then eval: fused BatchNorm* vs torch.nn.BatchNorm*."""
    x = _input(shape, layout)
    ref = TORCH_BN[len(shape)](shape[1])
    ours = OURS_BN[len(shape)](shape[1], backend="fused")
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    yr, yo = ref(xr), ours(xo)
    torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
    if layout == "channels_last":
        assert yo.stride() == yr.stride()
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yo.backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_parity(dtype: torch.dtype, tol: float, layout: str) -> None:
    """fp32 parameters on bf16/fp16 input (torch's mixed-dtype BN); statistics in fp32."""
    x = _input((4, 6, 9, 7), layout, dtype)
    ref, ours = torch.nn.BatchNorm2d(6), nlnn.BatchNorm2d(6, backend="fused")
    xr = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    yr, yo = ref(xr), ours(xo)
    assert yo.dtype == dtype
    torch.testing.assert_close(yo, yr, rtol=tol, atol=tol)
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yo.backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-4)
    _, mean, var, invstd = FusedKernel.forward_train(x, None, None, 1e-5)
    assert mean.dtype == var.dtype == invstd.dtype == torch.float32


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_has_no_cancellation(layout: str) -> None:
    """1e4 + N(0, 1): the variance and output match a float64 reference (no E[x²]−E[x]²)."""
    g = torch.Generator().manual_seed(0)
    x64 = 1e4 + torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
    x = _input((8, 4, 16, 16), "contiguous").copy_(x64)  # fp32, layout below
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y, _, var, _ = FusedKernel.forward_train(x, None, None, 1e-5)
    xd = x.double()
    ref_var = xd.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)
    ref_y = torch.nn.functional.batch_norm(xd, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y.double(), ref_y, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("shape", "layout"), PARITY_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_stats_match_forward_and_float64(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype
) -> None:
    """``stats`` (Batch Renorm's statistics pass) = the forward's statistics = float64 (1e4 offset)."""
    x = (_input(shape, layout).double() + 1e4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    mean, var = FusedKernel.stats(x)
    _, fmean, fvar, _ = FusedKernel.forward_train(x, None, None, 1e-5)
    assert mean.dtype == fmean.dtype and torch.equal(mean, fmean) and torch.equal(var, fvar)
    dims = (0, *range(2, x.dim()))
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(dims), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), xd.var(dims, unbiased=False), rtol=1e-4, atol=1e-6)


def test_gradcheck_float64() -> None:
    x = torch.randn(3, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm_train(x, w, b, 1e-5, backend="fused")[0], (x, w, b)
    )


def test_eval_is_differentiable() -> None:
    """Eval mode with requires_grad (e.g. fine-tuning frozen BN) gives torch's gradients."""
    ref, ours = torch.nn.BatchNorm2d(3).eval(), nlnn.BatchNorm2d(3, backend="fused").eval()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref(xr).sum().backward()
    ours(xo).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_functional_batch_norm_matches_torch() -> None:
    x = _input((5, 3, 6, 4), "contiguous")
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, training=True, momentum=0.3, backend="fused")
    yr = torch.nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=0.3)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 16, 64, 64)], ids=str)
def test_batch_norm_act_matches_torch(layout: str, shape: tuple[int, ...]) -> None:
    """One-pass BN + leaky ReLU (the ``BatchNormAct*`` entry point) vs torch's two modules."""
    x = _input(shape, layout)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    refs = [t.clone().requires_grad_(True) for t in (x, w, b)]
    leaky = Activation("leaky_relu", 0.1)
    z, mean, _ = batch_norm_train(*leaves, 1e-5, activation=leaky, backend="fused")
    zr = torch.nn.functional.leaky_relu(
        torch.nn.functional.batch_norm(refs[0], None, None, refs[1], refs[2], True), 0.1
    )
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(z)
    z.backward(dy)
    zr.backward(dy)
    for ours, ref in zip(leaves, refs):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-3)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    ze = FusedKernel.forward_eval(x, rm, rv, w, b, 1e-5, leaky)
    zre = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(x, rm, rv, w, b), 0.1)
    torch.testing.assert_close(ze, zre, rtol=1e-5, atol=1e-5)
    assert not mean.requires_grad


def test_mask_is_rejected() -> None:
    x = torch.randn(4, 3, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="backend='fused' does not support mask"):
        batch_norm_train(x, None, None, 1e-5, mask=mask, backend="fused")


def test_auto_policy() -> None:
    big = torch.randn(FUSED_MIN_NUMEL // 16, 16)
    assert resolve_kernel("auto", big).name == "fused"
    assert resolve_kernel("auto", big.bfloat16()).name == "fused"
    assert resolve_kernel("auto", big.half()).name == "native"
    short = torch.randn(-(-FUSED_MIN_NUMEL // 196), 4, 7, 7).bfloat16()  # bf16 NCHW, 7x7 planes
    short_runs = bool(_build.host_function("short_runs")())  # the masked AVX-512 path is built
    assert resolve_kernel("auto", short).name == ("fused" if short_runs else "native")
    mid = torch.randn(-(-FUSED_MIN_NUMEL // 3136), 4, 28, 28).bfloat16()  # 784-value planes
    assert resolve_kernel("auto", mid).name == "native"
    nhwc = mid.contiguous(memory_format=torch.channels_last)
    assert resolve_kernel("auto", nhwc).name == "fused"
    small = torch.randn(8, 16)
    assert resolve_kernel("auto", small).name == "native"
    planes = torch.randn(8, 64, 14, 14)  # fp32 NCHW: fused from FUSED_NCHW_FP32_MIN_NUMEL
    assert planes.numel() >= FUSED_NCHW_FP32_MIN_NUMEL > planes[:2].numel()
    assert resolve_kernel("auto", planes).name == "fused"
    assert resolve_kernel("auto", planes[:2]).name == "native"
    assert (
        resolve_kernel("auto", planes.contiguous(memory_format=torch.channels_last)).name
        == "native"
    )
    assert resolve_kernel("auto", planes.bfloat16()).name == "native"
    assert resolve_kernel("auto", torch.randn(256, 64, 2, 2)).name == "native"  # 2x2 planes
    assert resolve_kernel("auto", small, variant=True).name == "fused"  # BN+act, Ghost, Renorm
    assert resolve_kernel("auto", small.half(), variant=True).name == "fused"
    mask = torch.ones(big.shape[0], dtype=torch.bool)
    assert resolve_kernel("auto", big, mask=mask).name == "reference"


def test_without_kernels_auto_uses_aten_and_fused_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: "auto" picks native with the same results; an explicit "fused" raises the reason."""
    monkeypatch.setattr(
        _build, "_load", lambda announce=True: (None, KernelError("ninja is not installed"))
    )
    big = torch.randn(FUSED_MIN_NUMEL // 16, 16)
    assert resolve_kernel("auto", big).name == "native"
    assert resolve_kernel("auto", big[:8], variant=True).name == "native"
    layer = nlnn.BatchNormAct2d(3)
    x = _input((4, 3, 5, 5), "contiguous")
    ref = torch.nn.functional.leaky_relu(
        torch.nn.functional.batch_norm(x, None, None, training=True), 0.01
    )
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        KernelError,
        match="backend='fused' was requested but the fused kernels cannot be used: ninja is not installed",
    ):
        nlnn.BatchNorm2d(3, backend="fused")(x)
    with pytest.raises(KernelError, match="cannot be used"):
        batch_norm(x, None, None, training=True, backend="fused")


def test_fused_refuses_inputs_it_does_not_serve() -> None:
    with pytest.raises(
        ValueError, match="backend='fused' serves non-empty CPU tensors of a floating dtype"
    ):
        resolve_kernel("fused", torch.zeros(0, 3))


def test_compile_failure_is_logged_once_at_debug(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(_build, "_MODULE", None)  # as in a fresh process
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path))
    ops, error = _build._load.__wrapped__()  # the uncached loader
    assert ops is None and "the build failed: no C++ compiler" in str(error)
    assert not error.refused  # a machine without a compiler: no warning, ATen serves


# above the 8 MB streaming-store threshold: planes of 49 (straddling vectors), 961, 2209
STREAMED = [(64, 700, 7, 7), (8, 300, 31, 31), (16, 64, 47, 47)]


@pytest.mark.parametrize("shape", STREAMED, ids=str)
def test_eval_streamed(shape: tuple[int, ...]) -> None:
    """Eval outputs written with streaming stores, planes not a multiple of the vector width."""
    x = _input(shape, "contiguous")
    c = shape[1]
    rm, rv, w, b = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    y = FusedKernel.forward_eval(x, rm, rv, w, b, 1e-5)
    torch.testing.assert_close(
        y, torch.nn.functional.batch_norm(x, rm, rv, w, b), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 32, 128, 136), (96, 32, 28, 28)], ids=str)
def test_train_streamed(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> None:
    """Train forward/backward on outputs large enough for streaming stores, vs torch.

    The forward oracle is torch in float64: over ~75k values per channel, ATen's own
    fp32 result drifts by up to 5e-5 when it runs single-threaded (its accumulation),
    more than the 1e-5 tolerance, while the fused kernel stays within 1e-6.
    """
    x = _input(shape, layout, dtype)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    y, mean, _, invstd = FusedKernel.forward_train(x, w, b, 1e-5)
    yr = torch.nn.functional.batch_norm(
        x.double(), None, None, w.double(), b.double(), training=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), yr.to(dtype).double(), rtol=tol, atol=tol)
    dy = torch.randn_like(x)
    dx, dw, db = FusedKernel.backward_train(dy, x, w, b, mean, invstd, (True, True, True))
    dxr, dwr, dbr = torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, mean, invstd, True, 1e-5, [True, True, True]
    )
    torch.testing.assert_close(dx, dxr, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(dw, dwr, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(db, dbr, rtol=1e-3, atol=1e-2)


# --- the running statistics' update in one C++ call (after a fused training step) --------------
@pytest.mark.parametrize("momentum", [0.1, 1.0, None], ids=["0.1", "1.0", "cumulative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_running_statistics_over_steps_match_torch(
    momentum: float | None, dtype: torch.dtype
) -> None:
    ref = torch.nn.BatchNorm1d(6, momentum=momentum, dtype=dtype)
    ours = nlnn.BatchNorm1d(6, momentum=momentum, backend="fused", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        x = (torch.randn(16, 6, generator=g, dtype=dtype) * (step + 1)) + step
        ref(x), ours(x)
    # the variances come from different reductions (float rounding of values up to ~25)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5


@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_one_call_update_agrees_with_the_tensor_path(policy: str) -> None:
    """The C++ ``update_running`` against :func:`update_running_stats_` on the same statistics."""
    import warnings

    from normlab.functional import update_running_stats_
    from normlab.functional._running import update_running_on_host_

    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(40, generator=g), torch.rand(40, generator=g) + 0.1
    mean[3], var[17], mean[30] = float("nan"), float("inf"), float("-inf")
    results = []
    for one_call in (True, False):
        g.manual_seed(1)
        rm, rv, count = (
            torch.randn(40, generator=g),
            torch.rand(40, generator=g) + 1,
            torch.tensor(4),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if one_call:
                    assert update_running_on_host_(
                        rm, rv, count, mean, var, 0.25, 16 / 15, nonfinite=policy, owner="layer"
                    )
                else:
                    update_running_stats_(
                        rm, rv, mean, var * (16 / 15), 0.25, nonfinite=policy, owner="layer"
                    )
                    count += 1
                raised = None
            except FloatingPointError as error:
                raised = str(error)
        messages = [str(w.message) for w in caught]
        results.append((rm, rv, raised, messages, int(count) if raised is None else None))
    (rm1, rv1, err1, msg1, _), (rm2, rv2, err2, msg2, _) = results
    torch.testing.assert_close(rm1, rm2, equal_nan=True)
    torch.testing.assert_close(rv1, rv2, equal_nan=True)
    assert err1 == err2 and msg1 == msg2
    if policy != "propagate":
        assert "3, 17, 30" in (err1 or msg1[0])


def test_one_call_update_checks_its_arguments() -> None:
    update = _build.host_function("update_running")
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="matching dtypes"):
        update(rm, rv, None, torch.zeros(3), torch.ones(3), 0.1, 1.0, 0)
    with pytest.raises(RuntimeError, match="needs num_batches_tracked"):
        update(rm, rv, None, torch.zeros(4), torch.ones(4), -1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="int64 scalar"):
        update(rm, rv, torch.zeros(2), torch.zeros(4), torch.ones(4), 0.1, 1.0, 0)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


@pytest.mark.parametrize("channels", [16, 48, 64, 128, 144], ids=str)  # 144: the generic loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_short_rows_statistics_match_float64(channels: int, dtype: torch.dtype) -> None:
    """channels_last / (N, C) with 16-128 channels keep their sums in registers: same statistics
    (float64 reference, a large mean without cancellation, NaN/Inf as torch)."""
    g = torch.Generator().manual_seed(channels)
    for rows in (1, 3, 64, 65, 1000):
        x = (torch.randn(rows, channels, generator=g, dtype=torch.float64) * 3 + 1e4).to(dtype)
        mean, var = FusedKernel.stats(x)
        ref = x.double()
        tol = 1e-6 if dtype == torch.float32 else 1e-4
        torch.testing.assert_close(mean.double(), ref.mean(0), rtol=tol, atol=0)
        torch.testing.assert_close(
            var.double(), ref.var(0, unbiased=False), rtol=1e-3, atol=1e-4 * (rows > 1)
        )
    images = torch.randn(4, channels, 5, 3, generator=g).to(dtype)
    images[1, 3, 2, 1], images[2, 5, 0, 0] = float("nan"), float("inf")
    images = images.contiguous(memory_format=torch.channels_last)
    mean, var = FusedKernel.stats(images)
    ref_mean, ref_var = torch.batch_norm_update_stats(images.float(), None, None, 0.0)
    torch.testing.assert_close(mean, ref_mean, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape", [(8, 32, 5, 7), (3, 64, 4, 4), (5, 128, 3, 3), (65, 16), (130, 112)], ids=str
)
def test_short_rows_backward_matches_torch(shape: tuple[int, ...]) -> None:
    """The backward's register sums (16-128 channels, channels_last or (N, C)) against torch."""
    layout = "channels_last" if len(shape) == 4 else "contiguous"
    x = _input(shape, layout)
    ref, ours = TORCH_BN[len(shape)](shape[1]), OURS_BN[len(shape)](shape[1], backend="fused")
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    ref(xr).backward(dy)
    ours(xo).backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("planes", [(7, 7), (3, 5), (15, 15), (16, 16)], ids=str)
@pytest.mark.parametrize("activation", [None, "leaky_relu", "silu"])
def test_short_planes_match_float64(
    dtype: torch.dtype, planes: tuple[int, int], activation: str | None
) -> None:
    """NCHW planes under 256 values (masked tails, vector sums across a channel's planes): train
    forward, backward and eval against torch in float64, Ghost chunks included."""
    g = torch.Generator().manual_seed(planes[0])
    x64 = torch.randn(6, 5, *planes, generator=g, dtype=torch.float64) * 2 + 3
    x = x64.to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(5, generator=g, dtype=torch.float64)

    def ref(inp: torch.Tensor, chunk: int) -> torch.Tensor:
        y = ref_pre(inp, chunk)
        if activation == "silu":
            return torch.nn.functional.silu(y)
        return y if activation is None else torch.nn.functional.leaky_relu(y, 0.01)

    def ref_pre(inp: torch.Tensor, chunk: int) -> torch.Tensor:
        return torch.cat(
            [
                torch.nn.functional.batch_norm(part, None, None, w, b, training=True, eps=1e-5)
                for part in inp.split(chunk)
            ]
        )

    act = None if activation is None else Activation(activation, 0.01)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    for chunk in (6, 3):  # one batch, then Ghost's two chunks of 3
        chunks = None if chunk == 6 else [3, 3]
        y, mean, _, invstd = FusedKernel.forward_train(
            x, w.to(dtype), b.to(dtype), 1e-5, act, chunks
        )
        xr = x.double().requires_grad_(True)
        yr = ref(xr, chunk)
        torch.testing.assert_close(y.double(), yr, **tol)
        dx, _, _ = FusedKernel.backward_train(
            dy, x, w.to(dtype), b.to(dtype), mean, invstd, (True, False, False), act, chunks
        )
        (gx,) = torch.autograd.grad(yr, xr, dy.double())
        # leaky ReLU's slope at z ~ 0 flips with the rounding of z: compare away from the kink
        kink = activation == "leaky_relu"
        away = ref_pre(x.double(), chunk).abs() > 0.05 if kink else torch.ones_like(gx).bool()
        torch.testing.assert_close(dx.double()[away], gx[away], **tol)
    rm, rv = x64.mean((0, 2, 3)), x64.var((0, 2, 3))
    z = FusedKernel.forward_eval(x, rm.float(), rv.float(), w.to(dtype), b.to(dtype), 1e-5, act)
    zr = torch.nn.functional.batch_norm(x.double(), rm, rv, w, b, training=False, eps=1e-5)
    if activation == "silu":
        zr = torch.nn.functional.silu(zr)
    elif activation == "leaky_relu":
        zr = torch.nn.functional.leaky_relu(zr, 0.01)
    torch.testing.assert_close(z.double(), zr, **tol)


def test_one_call_update_bumps_the_buffers_versions() -> None:
    """The C++ update writes in place as torch's ``lerp_`` would: autograd sees it (a graph that
    saved the running statistics then fails loudly instead of reading the new values)."""
    m = nlnn.BatchNorm2d(3, backend="fused")
    versions = (m.running_mean._version, m.running_var._version, m.num_batches_tracked._version)
    m(torch.randn(4, 3, 5, 5))
    after = (m.running_mean._version, m.running_var._version, m.num_batches_tracked._version)
    assert all(b > a for a, b in zip(versions, after))
    m.eval()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = m(x)  # saves the running statistics for its backward
    m.train()
    m(torch.randn(4, 3, 5, 5))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_one_call_update_judges_in_the_buffers_dtype(policy: str) -> None:
    """fp16 running buffers: a variance that only overflows fp16 (finite in the fp32 statistics)
    is non-finite for them, as on the tensor path; it must not be written as Inf."""
    m = nlnn.BatchNorm1d(2, backend="fused", nonfinite=policy).half()
    x = torch.tensor([[300.0, 1.0], [-300.0, 2.0], [300.0, 3.0], [-300.0, 4.0]]).half()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"channel\(s\) 0"):
            m(x)
        assert torch.equal(m.running_var, torch.ones(2).half())
        return
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 0"):
        m(x)
    assert torch.isfinite(m.running_var).all() and m.running_var[0] == 1
    assert m.running_mean[1] != 0  # the other channel moved
