"""``backend="fused"``: normlab's own C++/OpenMP batch-norm kernels, JIT-compiled on first use.

The source (``batch_norm_cpu.cpp``, next to this file) is compiled once with
:func:`torch.utils.cpp_extension.load` (``-O3 -march=native -fopenmp``) into a
per-user cache — ``$NORMLAB_KERNEL_CACHE`` or ``~/.cache/normlab/kernels`` — keyed
by the source, the torch version and the CPU's instruction set, so a later
process (or another machine sharing the cache) never loads a stale or illegal
binary. Where no compiler (or ``ninja``) exists, or the build fails, every call
falls back to ATen (``"native"``) and says so once at debug log level.

What is fused (see the .cpp header for the math):

* train forward: one read of ``x`` from memory for shifted per-channel sums, one
  more (from cache on NCHW) to write ``y = (x - mean) * gamma * invstd + beta``;
* train backward: one pass for ``sum(dy)`` and ``sum(dy * (x - mean))``, one to
  write ``dx = k1 * dy + k2 * (x - mean) + k3``;
* eval forward: one pass;
* each optionally followed by a leaky ReLU (``negative_slope``), applied in the
  same pass — the entry point for ``BatchNormAct*``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._native import NativeKernel

__all__ = [
    "FusedKernel",
    "batch_norm_act_train",
    "fused_available",
    "fused_forward_eval",
    "fused_serves",
    "invert_batch_norm_act",
    "load_fused",
]

log = logging.getLogger("normlab")

_SOURCE = Path(__file__).with_name("batch_norm_cpu.cpp")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (``-march=native`` binaries are only valid on the same ISA)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$NORMLAB_KERNEL_CACHE`` or ``~/.cache/normlab/kernels``)."""
    root = os.environ.get("NORMLAB_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "normlab" / "kernels"


@functools.cache
def load_fused() -> Any | None:
    """Compile (first call in any process) or load the extension; ``None`` if that is impossible.

    Returns the ``torch.ops.normlab_fused`` namespace. Failures are logged once at
    debug level and never raised: callers fall back to ATen.
    """
    key = hashlib.sha256(
        _SOURCE.read_bytes()
        + " ".join(_FLAGS).encode()
        + torch.__version__.encode()
        + _cpu_fingerprint().encode()
    ).hexdigest()[:16]
    name = f"normlab_fused_{key}"
    build = cache_dir() / name
    try:
        if shutil.which("ninja") is None and not _venv_ninja():
            raise RuntimeError("ninja is not installed")
        from torch.utils import cpp_extension

        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.normlab_fused
    except Exception as err:  # no compiler, no ninja, build error: ATen serves instead
        log.debug("normlab: fused kernels unavailable (%s); falling back to 'native'", err)
        return None


def _venv_ninja() -> bool:
    """``ninja`` installed in this Python's environment but its bin/ not on PATH."""
    import sys

    candidate = Path(sys.executable).with_name("ninja")
    if candidate.exists():
        os.environ["PATH"] = f"{candidate.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return True
    return False


def fused_available() -> bool:
    """Whether the fused kernels are compiled (compiling them now if needed)."""
    return load_fused() is not None


def fused_serves(x: Tensor) -> bool:
    """Whether the compiled kernels can run on ``x`` (CPU, a float dtype, non-empty, ≥ 2-D)."""
    return _supported(x) is not None


def _supported(x: Tensor) -> Any | None:
    """The ops namespace when ``x`` can run on the fused kernels, else ``None`` (use ATen)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() == 0 or x.dim() < 2:
        return None
    return load_fused()


class FusedKernel:
    """normlab's C++/OpenMP batch norm behind the kernel interface (``backend="fused"``).

    Same contract as the reference kernel: ``(N, C, *)`` input in any layout
    (NCHW and channels_last run natively, anything else is made contiguous),
    statistics in float32 for fp16/bf16 input (else the input dtype), biased
    ``var``. No mask support (``resolve_kernel`` routes masked input elsewhere).
    Inputs it cannot serve (non-CPU, integer, empty) and a missing compiler fall
    back to :class:`NativeKernel`.
    """

    name = "fused"

    @staticmethod
    def forward_train(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        mask: Tensor | None = None,
        negative_slope: float | None = None,
        chunks: list[int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(y, mean, var_biased, invstd)``; ``y`` passes a leaky ReLU when ``negative_slope`` is set.

        ``chunks``: sizes of consecutive batch chunks, each normalized with its own statistics
        (Ghost BN's virtual batches), run on views of ``x`` in one C++ call; the statistics are
        then ``(len(chunks)·C,)``, chunk-major. Needs the compiled kernels.
        """
        if mask is not None:
            raise ValueError("the 'fused' backend does not support mask; use backend='reference'")
        ops = _supported(x)
        if ops is None and chunks is not None:
            raise RuntimeError(
                "chunked batch norm needs the compiled kernels and a CPU float input"
            )
        if ops is None:
            if negative_slope is not None:
                y, mean, var, invstd = NativeKernel.forward_train(x, weight, bias, eps)
                return torch.nn.functional.leaky_relu(y, negative_slope), mean, var, invstd
            return NativeKernel.forward_train(x, weight, bias, eps)
        y, mean, var, invstd = ops.forward_train(x, weight, bias, eps, negative_slope, chunks)
        return y, mean, var, invstd

    @staticmethod
    def backward_train(
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        needs: tuple[bool, bool, bool],
        mask: Tensor | None = None,
        bias: Tensor | None = None,
        negative_slope: float | None = None,
        chunks: list[int] | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Closed-form ``(dx, dweight, dbias)`` in two passes; ``bias``/``negative_slope`` for BN+act,
        ``chunks`` as in :meth:`forward_train` (γ/β gradients summed over the chunks)."""
        if mask is not None:
            raise ValueError("the 'fused' backend does not support mask; use backend='reference'")
        ops = _supported(x)
        if ops is None and chunks is not None:
            raise RuntimeError(
                "chunked batch norm needs the compiled kernels and a CPU float input"
            )
        if ops is None:
            if negative_slope is not None:
                raise RuntimeError("fused BN+activation backward needs the compiled kernels")
            return NativeKernel.backward_train(dy, x, weight, mean, invstd, needs)
        want_w = needs[1] and weight is not None
        dx, dw, db = ops.backward_train(
            dy, x, weight, bias, mean, invstd, negative_slope, [needs[0], want_w, needs[2]], chunks
        )
        if weight is not None:  # grads in the parameters' dtype (fp32 stats for bf16 input)
            dw = dw.to(weight.dtype) if want_w else None
            db = db.to(weight.dtype) if needs[2] else None
        return (dx if needs[0] else None, dw if want_w else None, db if needs[2] else None)

    @staticmethod
    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, biased var)`` in one pass of shifted sums (the forward's reduction alone)."""
        ops = _supported(x)
        if ops is None:
            return NativeKernel.stats(x)
        mean, var = ops.stats(x)
        return mean, var

    @staticmethod
    def forward_eval(
        x: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        """``(x - running_mean) * weight / sqrt(running_var + eps) + bias`` in one pass.

        Differentiable: when autograd records (any of ``x``, ``weight``, ``bias``
        requires grad), ATen's ``batch_norm`` serves the call instead.
        """
        return fused_forward_eval(x, running_mean, running_var, weight, bias, eps)


def fused_forward_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    negative_slope: float | None = None,
) -> Tensor:
    """Eval-mode batch norm (optionally + leaky ReLU) in one pass; ATen when a gradient is needed."""
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    ops = None if records else _supported(x)
    if ops is None:
        y = NativeKernel.forward_eval(x, running_mean, running_var, weight, bias, eps)
        return y if negative_slope is None else torch.nn.functional.leaky_relu(y, negative_slope)
    out: Tensor = ops.forward_eval(x, running_mean, running_var, weight, bias, eps, negative_slope)
    return out


class _BatchNormActTrain(torch.autograd.Function):
    """Training batch norm followed by a leaky ReLU, forward and backward each in one fused kernel."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        negative_slope: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = FusedKernel.forward_train(
            x, weight, bias, eps, negative_slope=negative_slope
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        ctx.negative_slope = negative_slope
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dx, dw, db = FusedKernel.backward_train(
            dy, x, weight, mean, invstd, needs, bias=bias, negative_slope=ctx.negative_slope
        )
        return dx, dw, db, None, None


def invert_batch_norm_act(
    y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    negative_slope: float,
) -> Tensor | None:
    """The batch-norm input rebuilt from ``y = leaky_relu(BN(x))`` in one pass (InPlace-ABN's
    backward), or ``None`` where the compiled kernels cannot serve ``y``.

    ``x = mean + (u − β) / (γ·invstd)`` with ``u = y`` for ``y > 0`` and ``y / negative_slope``
    otherwise (``negative_slope = 1``: no activation). ``γ`` must be kept away from 0 by the caller.
    """
    ops = _supported(y)
    if ops is None:
        return None
    x: Tensor = ops.invert_act(y, mean, invstd, weight, bias, negative_slope)
    return x


def batch_norm_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``leaky_relu(batch_norm_train(x), negative_slope)`` as one fused op: ``(z, mean, var_biased)``.

    .. math:: z = \mathrm{LeakyReLU}_{a}\big(\gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta\big)

    ``negative_slope = 0`` is ReLU. Only ``z`` has a gradient; the backward
    recomputes the activation's mask from ``x`` instead of storing ``y``.
    Requires the compiled kernels (see :func:`fused_available`).
    """
    z, mean, var = _BatchNormActTrain.apply(x, weight, bias, eps, negative_slope)
    return z, mean, var
