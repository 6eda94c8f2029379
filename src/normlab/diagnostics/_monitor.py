"""``LayerMonitor``: per-step, per-layer activation and gradient statistics through hooks."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._table import render_table

__all__ = ["LayerMonitor"]

COLUMNS = (
    "step",
    "layer",
    "type",
    "mean",
    "std",
    "q15",
    "q50",
    "q85",
    "saturated",
    "dead",
    "grad_norm",
    "update_ratio",
)
_METRICS = COLUMNS[3:]
_NAN = float("nan")


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return None


class LayerMonitor:
    """Record activation and gradient statistics of ``model``'s layers, step by step.

    A *step* is one call of ``model`` (its forward); every ``every``-th step
    (steps 0, ``every``, ``2·every``, …) adds one record per monitored layer:

    * ``mean``, ``std`` (population), ``q15``/``q50``/``q85`` of the layer's
      output (first call in the step; quantiles from at most ``max_samples``
      evenly strided values);
    * ``saturated``: for ``nn.Sigmoid``/``nn.Tanh`` layers, the fraction of
      outputs within 1 % of the bounds (sigmoid ``< 0.01`` or ``> 0.99``, tanh
      ``|y| > 0.99``); ``dead``: for ``nn.ReLU``/``nn.ReLU6``, the fraction of
      zero outputs; NaN for other layers;
    * ``grad_norm``: ‖∂L/∂θ‖₂ over the layer's own parameters, as accumulated in
      ``.grad`` by the step's backward (NaN without backward or parameters);
    * ``update_ratio``: ‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖ between this step's and the
      previous step's forward — the size of the optimizer's update (NaN at the
      first step).

    Use as a context manager; hooks are removed on exit, also after an exception::

        with LayerMonitor(model) as monitor:
            for x, y in loader: ...
        print(monitor.summary()); monitor.to_csv("layers.csv"); monitor.plot("layers.png")

    Parameters
    ----------
    model : nn.Module
        The model whose forward defines a step.
    layers : iterable of str, optional
        Module paths to monitor; default every leaf module.
    every : int
        Record every ``every``-th step.
    max_samples : int
        Quantile sample size per layer and step.

    Attributes
    ----------
    records : list of dict
        One row per recorded step and layer: ``step``, ``layer``, ``type`` and the metrics.

    Raises
    ------
    ValueError
        ``every`` or ``max_samples`` below 1, an unknown layer path, or no layer to monitor.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from normlab.diagnostics import LayerMonitor
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with LayerMonitor(model, every=1) as monitor:
    ...     for _ in range(3):
    ...         opt.zero_grad()
    ...         model(torch.randn(16, 10)).square().mean().backward()
    ...         opt.step()
    >>> len(monitor.records), sorted(monitor.records[0])[:4]
    (9, ['dead', 'grad_norm', 'layer', 'mean'])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        every: int = 1,
        *,
        max_samples: int = 1 << 20,
    ) -> None:
        """Set up the monitor (the arguments are described in the class docstring)."""
        if every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be a positive integer, got {max_samples}")
        modules = dict(model.named_modules())
        if layers is None:
            names = [n for n, m in modules.items() if n and next(m.children(), None) is None]
        else:
            names = list(layers)
            for name in names:
                if name not in modules:
                    raise ValueError(f"LayerMonitor: the model has no submodule named {name!r}")
        if not names:
            raise ValueError("LayerMonitor: no layers to monitor")
        self.model = model
        self.layers: dict[str, nn.Module] = {n: modules[n] for n in names}
        self.every = every
        self.max_samples = max_samples
        self.records: list[dict[str, Any]] = []
        self._step = -1
        self._recording = False
        self._current: dict[str, dict[str, Any]] = {}
        self._grad_sq: dict[str, dict[int, float]] = {}
        self._snapshot: dict[str, list[Tensor]] | None = None
        self._handles: list[RemovableHandle] = []

    # --- lifecycle -------------------------------------------------------------
    def __enter__(self) -> LayerMonitor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Register the hooks (``__enter__`` does this).

        Raises
        ------
        RuntimeError
            The monitor is already started.

        Examples
        --------
        >>> import torch
        >>> from normlab.diagnostics import LayerMonitor
        >>> monitor = LayerMonitor(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> monitor.start(); monitor.active
        True
        >>> monitor.stop(); monitor.active
        False
        """
        if self._handles:
            raise RuntimeError("LayerMonitor is already started")
        self._handles.append(self.model.register_forward_pre_hook(self._on_step))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._activation_hook(name)))
            for index, p in enumerate(module.parameters(recurse=False)):
                if p.requires_grad:
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(self._grad_hook(name, index))
                    )

    def stop(self) -> None:
        """Remove every hook (``__exit__`` does this); see :meth:`start`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        """Whether hooks are registered; see :meth:`start`."""
        return bool(self._handles)

    # --- hooks -----------------------------------------------------------------
    def _params(self, name: str) -> list[Tensor]:
        return [p.detach() for p in self.layers[name].parameters(recurse=False)]

    def _on_step(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._step += 1
        self._recording = self._step % self.every == 0
        self._current = {}
        self._grad_sq = {}
        previous = self._snapshot
        self._snapshot = None
        if self._recording:
            for name, layer in self.layers.items():
                row: dict[str, Any] = {"step": self._step, "layer": name}
                row["type"] = type(layer).__name__
                row.update(dict.fromkeys(_METRICS, _NAN))
                if previous is not None and previous.get(name):
                    row["update_ratio"] = self._update_ratio(previous[name], self._params(name))
                self._current[name] = row
                self.records.append(row)
        if (self._step + 1) % self.every == 0:
            self._snapshot = {n: [p.clone() for p in self._params(n)] for n in self.layers}

    @staticmethod
    @torch.no_grad()
    def _update_ratio(before: list[Tensor], after: list[Tensor]) -> float:
        diff = sum(float((a.float() - b.float()).square().sum()) for a, b in zip(after, before))
        ref = sum(float(b.float().square().sum()) for b in before)
        return math.sqrt(diff) / math.sqrt(ref) if ref > 0 else _NAN

    def _activation_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            row = self._current.get(name)
            y = _first_tensor(output)
            if row is None or y is None or not y.is_floating_point() or not math.isnan(row["mean"]):
                return
            row.update(self._activation_stats(module, y.detach()))

        return hook

    @torch.no_grad()
    def _activation_stats(self, module: nn.Module, y: Tensor) -> dict[str, float]:
        flat = y.float().flatten()  # (numel,)
        if flat.numel() == 0:
            return {}
        stride = max(1, math.ceil(flat.numel() / self.max_samples))
        sample = flat[::stride]
        q = torch.quantile(sample, torch.tensor([0.15, 0.5, 0.85], device=flat.device))
        nan = torch.tensor(_NAN, device=flat.device)
        if isinstance(module, nn.Sigmoid):
            saturated = ((flat < 0.01) | (flat > 0.99)).float().mean()
        elif isinstance(module, nn.Tanh):
            saturated = (flat.abs() > 0.99).float().mean()
        else:
            saturated = nan
        dead = (flat == 0).float().mean() if isinstance(module, (nn.ReLU, nn.ReLU6)) else nan
        values = torch.stack(
            [flat.mean(), flat.std(correction=0), q[0], q[1], q[2], saturated, dead]
        ).tolist()  # one host sync
        return dict(zip(("mean", "std", "q15", "q50", "q85", "saturated", "dead"), values))

    def _grad_hook(self, name: str, index: int) -> Any:
        def hook(p: Tensor) -> None:
            row = self._current.get(name)
            if row is None or p.grad is None:
                return
            self._grad_sq.setdefault(name, {})[index] = float(p.grad.float().square().sum())
            row["grad_norm"] = math.sqrt(sum(self._grad_sq[name].values()))

        return hook

    # --- output ----------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`records` (columns ``step, layer, type, mean, …``) to ``path``.

        Parameters
        ----------
        path : str or Path
            The CSV file to write.

        Returns
        -------
        Path

        Examples
        --------
        >>> import tempfile, torch
        >>> from normlab.diagnostics import LayerMonitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with LayerMonitor(model) as monitor:
        ...     _ = model(torch.randn(4, 2))
        >>> path = monitor.to_csv(tempfile.mkdtemp() + "/layers.csv")
        >>> path.read_text().splitlines()[0][:22]
        'step,layer,type,mean,s'
        """
        path = Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def summary(self) -> str:
        """Per layer, the mean of each metric over the recorded steps (NaNs ignored), as a table.

        Returns
        -------
        str

        Examples
        --------
        >>> import torch
        >>> from normlab.diagnostics import LayerMonitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with LayerMonitor(model) as monitor:
        ...     _ = model(torch.randn(4, 2))
        >>> print(monitor.summary().splitlines()[0])
        LayerMonitor: 1 step(s), every 1; means over recorded steps
        """
        rows = []
        for name, layer in self.layers.items():
            mine = [r for r in self.records if r["layer"] == name]
            cells: list[object] = [name, type(layer).__name__, len(mine)]
            for metric in _METRICS:
                values = [r[metric] for r in mine if not math.isnan(r[metric])]
                cells.append(f"{sum(values) / len(values):.4g}" if values else "-")
            rows.append(cells)
        return render_table(
            f"LayerMonitor: {self._step + 1} step(s), every {self.every}; means over recorded steps",
            ["layer", "type", "steps", *_METRICS],
            rows,
        )

    def plot(self, path: str | Path) -> Path:
        """Save a figure of std, dead/saturated fraction, gradient norm and update ratio per step.

        Needs matplotlib (the lab extra).

        Parameters
        ----------
        path : str or Path
            The image file (png, svg, pdf).

        Returns
        -------
        Path

        Examples
        --------
        >>> import tempfile, torch
        >>> from normlab.diagnostics import LayerMonitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> with LayerMonitor(model) as monitor:
        ...     _ = model(torch.randn(4, 2))
        >>> monitor.plot(tempfile.mkdtemp() + "/layers.png").suffix
        '.png'
        """
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        path = Path(path)
        fig = Figure(figsize=(12, 8), layout="constrained")
        axes = fig.subplots(2, 2)
        panels = [
            ("std", "activation std", False),
            ("grad_norm", "gradient norm", True),
            ("update_ratio", "update ratio ‖Δθ‖/‖θ‖", True),
            ("dead|saturated", "dead (ReLU) / saturated (sigmoid, tanh) fraction", False),
        ]
        for ax, (metric, title, log) in zip(axes.flat, panels):
            for name in self.layers:
                mine = [r for r in self.records if r["layer"] == name]
                for key in metric.split("|"):
                    points = [(r["step"], r[key]) for r in mine if not math.isnan(r[key])]
                    if points:
                        steps, values = zip(*points)
                        ax.plot(steps, values, label=f"{name} {key}" if "|" in metric else name)
            ax.set_title(title)
            ax.set_xlabel("step")
            if log and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")
        if axes.flat[0].lines:
            axes.flat[0].legend(fontsize="small", ncol=2)
        fig.savefig(path)
        return path
