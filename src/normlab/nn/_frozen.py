r"""``FrozenBatchNorm1d/2d/3d``: batch norm with fixed statistics and affine parameters (detectron2 semantics).

.. math:: y = f\big(x \cdot s + (\beta - \mu s)\big),\qquad s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}

Everything is a buffer (``weight``, ``bias``, ``running_mean``, ``running_var``): nothing
trains, nothing updates, and ``train()`` changes nothing — the usual choice for a pretrained
backbone fine-tuned with tiny per-GPU batches (detectron2). ``activation`` (optional) keeps a
``BatchNormAct`` frozen with its activation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..functional import LayerSpec, batch_norm_layer
from ..functional._checks import check_eps, check_num_features
from ._base import ActivationOptions, LayerDescription, _register, describe, layer_class
from ._convert import build_like, replace_batchnorms, transfer_state

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]

torch.fx.wrap("batch_norm_layer")  # one call_function node in a torch.fx graph


class _FrozenBatchNorm(ActivationOptions, nn.Module):
    kind: ClassVar[str] = "frozen"
    spatial: ClassVar[int | None] = None
    OPTIONS: ClassVar[dict[str, Any]] = {"channel_axis": 1, **ActivationOptions.ACTIVATION_OPTIONS}
    _version = 3

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        channel_axis: int = 1,
    ) -> None:
        """Create the layer (the arguments are described in the class docstring)."""
        super().__init__()
        check_num_features(num_features)
        if channel_axis not in (1, -1):
            raise ValueError(f"channel_axis must be 1 or -1, got {channel_axis!r}")
        self._set_activation(activation, negative_slope, alpha)
        self.num_features, self.eps, self.channel_axis = num_features, check_eps(eps), channel_axis
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def describe(self) -> LayerDescription:
        """This layer's kind, rank and constructor arguments (see :func:`normlab.nn.describe`).

        Returns
        -------
        LayerDescription

        Examples
        --------
        >>> import normlab
        >>> normlab.nn.FrozenBatchNorm2d(3).describe().kind
        'frozen'
        """
        config = {"num_features": self.num_features, "eps": self.eps}
        config.update({name: getattr(self, name) for name in self.OPTIONS})
        return LayerDescription(self.kind, self.spatial, config)

    def forward(self, x: Tensor) -> Tensor:
        """``f(x·s + (β − μ·s))``: batch norm in eval mode with the frozen buffers.

        Parameters
        ----------
        x : Tensor, shape (N, C, *)
            ``(N, *, C)`` with ``channel_axis=-1``.

        Returns
        -------
        Tensor
            The input's shape.

        Examples
        --------
        >>> import torch, normlab
        >>> frozen = normlab.nn.FrozenBatchNorm1d(3)        # identity statistics
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(frozen(x), x, atol=1e-4)
        True
        """
        spec = LayerSpec(
            name=f"{type(self).__name__}({self.num_features})",
            num_features=self.num_features,
            training=False,
            eps=self.eps,
            channel_axis=self.channel_axis,
            act=self.act,
        )
        return batch_norm_layer(
            x, None, self.running_mean, self.running_var, None, self.weight, self.bias, spec
        )

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
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm checkpoint loads as is
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}" + self._activation_repr()
        return text + (", channel_axis=-1" if self.channel_axis == -1 else "")

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every batch norm of this class's rank in ``module`` (torch's, normlab's with
        every variant; ``SyncBatchNorm`` counts as the rank it replaced, else as this one) by a
        frozen copy, keeping its activation and ``channel_axis`` — detectron2's semantics for
        ``FrozenBatchNorm2d``, and the same for the 1d and 3d classes.

        Values are preserved, so eval outputs are unchanged.

        Parameters
        ----------
        module : nn.Module
            A model, or a single batch-norm layer.

        Returns
        -------
        nn.Module
            A *new* frozen layer when ``module`` itself is a batch norm, otherwise ``module``
            with its children replaced in place.

        Raises
        ------
        ValueError
            A layer to freeze tracks no running statistics, or has an option the frozen layer
            cannot represent (the message names the layer and the option).

        Examples
        --------
        >>> import torch, normlab
        >>> bn = normlab.nn.BatchNormAct2d(4).eval()
        >>> frozen = normlab.nn.FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
        >>> frozen
        FrozenBatchNorm2d(4, eps=1e-05, activation='leaky_relu', negative_slope=0.01)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6)
        True
        """

        def freeze(bn: nn.Module, path: str) -> nn.Module | None:
            description = describe(bn)
            spatial = description.spatial
            if spatial is None:  # rank-agnostic (SyncBatchNorm): the rank it replaced, else ours
                spatial = getattr(bn, "_source_spatial", None) or cls.spatial
            if description.kind == "frozen" or spatial != cls.spatial:
                return None
            target = layer_class("frozen", spatial)
            frozen = build_like(bn, target, path=path)
            if getattr(bn, "running_mean", None) is None:
                raise ValueError(f"cannot freeze {path}: it tracks no running statistics")
            transfer_state(bn, frozen, path=path, share=False)
            return frozen

        return replace_batchnorms(module, freeze)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm1d: loads a BatchNorm1d state dict; ``(N, C)`` or ``(N, C, L)`` input.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance (default 1e-5).
    activation : str
        ``None`` (default): no activation;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    channel_axis : {1, -1}
        ``-1`` takes channels-last input such as ``(N, L, C)``.

    Examples
    --------
    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> model = normlab.nn.FrozenBatchNorm1d.convert_frozen_batchnorm(model)
    >>> model[1], model(torch.randn(2, 4)).shape
    (FrozenBatchNorm1d(3, eps=1e-05), torch.Size([2, 3]))
    """

    spatial = 1


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers; loads a BatchNorm2d
    state dict (detectron2's ``FrozenBatchNorm2d``). Takes ``(N, C, H, W)`` input and returns
    the same shape; nothing in it trains or updates, and ``train()`` changes nothing.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance (default 1e-5).
    activation : str
        ``None`` (default): no activation;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    channel_axis : {1, -1}
        ``-1`` takes channels-last input such as ``(N, L, C)``.

    Examples
    --------
    >>> import torch, normlab
    >>> bn = torch.nn.BatchNorm2d(4).eval()
    >>> frozen = normlab.nn.FrozenBatchNorm2d(4)
    >>> frozen.load_state_dict(bn.state_dict())
    <All keys matched successfully>
    >>> list(frozen.parameters())
    []
    """

    spatial = 2


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm3d: loads a BatchNorm3d state dict; ``(N, C, D, H, W)`` input.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels.
    eps : float
        Added to the variance (default 1e-5).
    activation : str
        ``None`` (default): no activation;
        one of ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"``.
    negative_slope : float
        ``leaky_relu``'s slope for negative inputs (default 0.01).
    alpha : float
        ``elu``'s scale for negative inputs (default 1.0).
    channel_axis : {1, -1}
        ``-1`` takes channels-last input such as ``(N, L, C)``.

    Examples
    --------
    >>> import torch, normlab
    >>> normlab.nn.FrozenBatchNorm3d(2)(torch.randn(1, 2, 2, 2, 2)).shape
    torch.Size([1, 2, 2, 2, 2])
    """

    spatial = 3
