r"""``replace_all_batch_norm_modules_``: batch norm without running statistics, for ``torch.func``.

``torch.func.vmap`` over a model whose batch norms update running buffers needs those buffers
batched too (one per ensemble member, as :func:`torch.func.stack_module_state` gives). The
other way, torch.func's "patching batch norm" recipe, is to stop tracking running statistics:
every layer then normalizes with the statistics of the batch it is given, in training and in
eval alike. This module gives that recipe torch's name and semantics for normlab's layers as
well as torch's, and refuses the one layer for which it would silently change the math (Batch
Renorm corrects the batch statistics *toward* the running ones).
"""

from __future__ import annotations

from torch import nn

from .._base import describe
from ._common import is_batchnorm, is_frozen_batchnorm

__all__ = ["replace_all_batch_norm_modules_"]


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """Stop every batch norm of ``root`` from tracking running statistics, in place.

    As :func:`torch.func.replace_all_batch_norm_modules_`: each layer that tracks running
    statistics gets ``running_mean = running_var = num_batches_tracked = None`` and
    ``track_running_stats = False``, so it normalizes with the batch's own statistics in
    training *and* in eval, and no forward writes a buffer (which is what
    ``torch.func.vmap`` over an ensemble needs when the buffers are not stacked). Works for
    torch's ``BatchNorm*``/``SyncBatchNorm`` and normlab's ``BatchNorm*``, ``BatchNormAct*``,
    ``GhostBatchNorm*``, ``SyncBatchNorm`` and ``SplitBatchNorm*`` (every split).
    ``FrozenBatchNorm*`` layers track nothing and are left alone.

    Parameters
    ----------
    root : nn.Module
        The model (or a single layer).

    Returns
    -------
    nn.Module
        ``root``.

    Raises
    ------
    ValueError
        ``root`` holds a ``BatchRenorm*`` layer: without running statistics it would become
        plain batch norm. Nothing is changed then. (Batch Renorm runs under ``vmap`` with its
        buffers stacked by :func:`torch.func.stack_module_state` instead.)

    Examples
    --------
    >>> import copy, torch, normlab
    >>> from torch.func import functional_call, stack_module_state, vmap
    >>> from normlab.nn.utils import replace_all_batch_norm_modules_
    >>> members = [torch.nn.Sequential(torch.nn.Linear(4, 8), normlab.nn.BatchNorm1d(8))
    ...            for _ in range(3)]
    >>> for m in members:
    ...     _ = replace_all_batch_norm_modules_(m)
    >>> params, buffers = stack_module_state(members)
    >>> base = copy.deepcopy(members[0]).to("meta")
    >>> x = torch.randn(16, 4)
    >>> out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    >>> torch.allclose(out, torch.stack([m(x) for m in members]), atol=1e-6)
    True
    """
    if not isinstance(root, nn.Module):
        raise TypeError(
            f"replace_all_batch_norm_modules_ expects an nn.Module, got {type(root).__name__}"
        )
    layers = [
        (name or "<model>", m)
        for name, m in root.named_modules()
        if is_batchnorm(m)
        and not is_frozen_batchnorm(m)
        and getattr(m, "track_running_stats", False)
    ]
    for name, m in layers:  # validate everything before changing anything
        if describe(m).kind == "renorm":
            raise ValueError(
                f"replace_all_batch_norm_modules_: {name} ({type(m).__name__}) corrects toward its "
                "running statistics and would become plain batch norm without them; vmap it with "
                "its buffers stacked (torch.func.stack_module_state) instead"
            )
    for _, m in layers:
        m.running_mean = None
        m.running_var = None
        m.num_batches_tracked = None
        m.track_running_stats = False
    return root
