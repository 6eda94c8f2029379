r"""``FrozenBatchNorm2d``: BatchNorm with fixed statistics and affine parameters (detectron2 semantics).

.. math:: y = x \cdot s + (\beta - \mu s),\qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

Everything is a buffer (``weight``, ``bias``, ``running_mean``, ``running_var``):
nothing trains, nothing updates, and ``train()`` changes nothing — the usual choice
for a pretrained backbone fine-tuned with tiny per-GPU batches (detectron2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers; loads a BatchNorm2d state dict."""

    _version = 3

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm2d({self.num_features}) expects (N, {self.num_features}, ...) input, "
                f"got shape {tuple(x.shape)}"
            )
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        view = [1, -1] + [1] * (x.dim() - 2)
        return x * scale.view(view).to(x.dtype) + shift.view(view).to(x.dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d checkpoint loads as is
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d (torch's, normlab's, SyncBatchNorm) in ``module`` by a frozen copy.

        Values are preserved, so eval outputs are unchanged. Returns the converted
        module: a *new* ``FrozenBatchNorm2d`` when ``module`` itself is a BatchNorm,
        otherwise ``module`` with its children replaced in place.
        """
        if _is_bn2d(module):
            assert isinstance(module, _BatchNorm)
            frozen = cls(module.num_features, module.eps)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight.detach())
                    frozen.bias.copy_(module.bias.detach())
                if module.running_mean is not None and module.running_var is not None:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            ref = module.running_mean if module.running_mean is not None else module.weight
            return frozen.to(device=ref.device, dtype=ref.dtype) if ref is not None else frozen
        for name, child in module.named_children():
            new = cls.convert_frozen_batchnorm(child)
            if new is not child:
                setattr(module, name, new)
        return module


def _is_bn2d(m: nn.Module) -> bool:
    if isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm):
        return True
    return isinstance(m, _BatchNorm) and getattr(type(m), "_NDIM", ()) == (4,)
