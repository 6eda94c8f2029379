"""LayerMonitor: records against torch computations, hooks removed, csv/summary/plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from normlab.diagnostics import LayerMonitor


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 4), nn.Tanh()
    )


def _train(
    model: nn.Module, monitor: LayerMonitor | None, steps: int, x: Tensor
) -> list[dict[str, Tensor]]:
    """SGD steps on ``x``; returns each step's parameters before its forward (and their grads)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(steps):
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        model(x).square().mean().backward()
        history[-1].update({f"grad:{n}": p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return history


def test_records_match_torch_computations() -> None:
    model = _model()
    x = torch.randn(32, 5) * 4
    with LayerMonitor(model, every=2) as monitor:
        history = _train(model, monitor, 5, x)
    assert [r["step"] for r in monitor.records if r["layer"] == "0"] == [0, 2, 4]
    assert [r["layer"] for r in monitor.records[:6]] == ["0", "1", "2", "3", "4", "5"]
    for step in (2, 4):
        rows = {r["layer"]: r for r in monitor.records if r["step"] == step}
        params = history[step]
        h1 = x @ params["0.weight"].T + params["0.bias"]
        h2 = torch.relu(h1)
        h4 = torch.sigmoid(h2 @ params["2.weight"].T + params["2.bias"])
        h6 = torch.tanh(h4 @ params["4.weight"].T + params["4.bias"])
        q = torch.quantile(h1.flatten(), torch.tensor([0.15, 0.5, 0.85]))
        assert rows["0"]["mean"] == pytest.approx(float(h1.mean()), abs=1e-5)
        assert rows["0"]["std"] == pytest.approx(float(h1.std(correction=0)), rel=1e-5)
        assert [rows["0"][k] for k in ("q15", "q50", "q85")] == pytest.approx(q.tolist(), abs=1e-5)
        assert rows["1"]["dead"] == pytest.approx(float((h2 == 0).float().mean()))
        assert rows["3"]["saturated"] == pytest.approx(
            float(((h4 < 0.01) | (h4 > 0.99)).float().mean())
        )
        assert rows["5"]["saturated"] == pytest.approx(float((h6.abs() > 0.99).float().mean()))
        assert math.isnan(rows["0"]["dead"]) and math.isnan(rows["0"]["saturated"])
        grad = math.sqrt(
            float(params["grad:2.weight"].square().sum() + params["grad:2.bias"].square().sum())
        )
        assert rows["2"]["grad_norm"] == pytest.approx(grad, rel=1e-5)
        before, now = history[step - 1], history[step]
        num = sum(float((now[k] - before[k]).square().sum()) for k in ("2.weight", "2.bias"))
        den = sum(float(before[k].square().sum()) for k in ("2.weight", "2.bias"))
        assert rows["2"]["update_ratio"] == pytest.approx(math.sqrt(num / den), rel=1e-4)
        assert math.isnan(rows["1"]["grad_norm"]) and math.isnan(rows["1"]["update_ratio"])
    assert math.isnan(monitor.records[0]["update_ratio"])  # no previous step


def test_hooks_removed_on_exit_even_after_an_exception() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), LayerMonitor(model) as monitor:
        model(torch.randn(2, 5)).sum().backward()
        assert monitor.active
        raise RuntimeError("boom")
    assert not monitor.active
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    n = len(monitor.records)
    model(torch.randn(2, 5))
    assert len(monitor.records) == n


def test_layers_selection_csv_summary_and_plot(tmp_path: Path) -> None:
    model = _model()
    with LayerMonitor(model, layers=["0", "1"]) as monitor:
        _train(model, monitor, 3, torch.randn(8, 5))
    assert {r["layer"] for r in monitor.records} == {"0", "1"} and len(monitor.records) == 6
    path = monitor.to_csv(tmp_path / "layers.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 6 and float(rows[-1]["mean"]) == pytest.approx(monitor.records[-1]["mean"])
    assert list(rows[0]) == ["step", "layer", "type", "mean", "std", "q15", "q50", "q85", "saturated", "dead", "grad_norm", "update_ratio"]  # fmt: skip
    text = monitor.summary()
    assert "LayerMonitor: 3 step(s), every 1" in text and "Linear" in text and "ReLU" in text
    png = monitor.plot(tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monitor_errors() -> None:
    with pytest.raises(ValueError, match="every must be a positive integer, got 0"):
        LayerMonitor(_model(), every=0)
    with pytest.raises(ValueError, match="max_samples must be a positive integer, got 0"):
        LayerMonitor(_model(), max_samples=0)
    with pytest.raises(ValueError, match="the model has no submodule named 'fc'"):
        LayerMonitor(_model(), layers=["fc"])
    with pytest.raises(ValueError, match="no layers to monitor"):
        LayerMonitor(_model(), layers=[])
    monitor = LayerMonitor(_model())
    with monitor, pytest.raises(RuntimeError, match="LayerMonitor is already started"):
        monitor.start()
