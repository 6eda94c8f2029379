"""``normlab bench`` runs on a tiny config and produces sane columns (never a timing assertion)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import normlab
from normlab.bench import (
    BenchOptions,
    Result,
    Traffic,
    _alloc,
    _bn,
    floor_op,
    geomean_ratios,
    plot_ratios,
    run_cases,
    time_many,
)
from normlab.bench._model import model_cases
from normlab.cli import app
from normlab.perf import tune_cpu_allocator

TINY = BenchOptions(quick=True, repeats=3, warmup=1)
TINY_SHAPES = [(4, 3, 6, 5), (3, 4, 7), (16, 8)]


def _check_sane(results: list[Result]) -> None:
    assert results
    for r in results:
        assert r.baseline_ms > 0 and r.normlab_ms > 0
        assert r.ratio == pytest.approx(r.normlab_ms / r.baseline_ms)
        assert r.floor_ms is not None and r.floor_ms > 0
        assert r.normlab_eff == pytest.approx(r.floor_ms / r.normlab_ms)
        assert r.baseline_eff == pytest.approx(r.floor_ms / r.baseline_ms)


def test_bn_cases_cover_modes_layouts_and_dtypes() -> None:
    cases = _bn.bn_cases(TINY, shapes=TINY_SHAPES)
    # 4-D shapes in both layouts, every shape in fp32 and bf16, three modes each
    assert len(cases) == (2 + 1 + 1) * 2 * 3
    assert {c.mode for c in cases} == {"train fwd", "train fwd+bwd", "eval fwd"}
    names = {c.name for c in cases}
    assert "(4, 3, 6, 5) NHWC bf16" in names and "(16, 8) contig fp32" in names
    _check_sane(run_cases(cases, TINY))


def test_full_config_has_resnet50_stages() -> None:
    shapes = {shape for shape, _, _ in _bn.configs(BenchOptions())}
    assert set(_bn.RESNET50_SHAPES) <= shapes
    assert any(len(s) == 3 for s in shapes) and any(len(s) == 2 for s in shapes)


def test_act_and_variant_cases_run() -> None:
    act = _bn.act_cases(TINY, shapes=[(4, 3, 6, 5)])  # quick: leaky_relu only
    assert {c.name for c in act} == {
        f"leaky_relu (4, 3, 6, 5) {layout} {dtype}"
        for layout in ("NCHW", "NHWC")
        for dtype in ("fp32", "bf16")
    }
    full = _bn.act_cases(BenchOptions(quick=False, repeats=3), shapes=[(4, 3, 6, 5)])
    assert {c.name.split()[0] for c in full} == {"leaky_relu", "relu", "silu"}
    _check_sane(run_cases(act[:3], TINY))
    variants = _bn.variant_cases(TINY, shapes=[(4, 3, 6, 5)])
    assert all(c.baseline_label == "normlab BN" for c in variants)


@pytest.mark.parametrize("activation", list(_bn.ACTIVATIONS))
def test_bench_bn_act_module_matches_torch(activation: str) -> None:
    x = torch.randn(4, 3, 6, 5)
    ours = normlab.nn.BatchNormAct2d(3, activation=activation)
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(3), _bn.ACTIVATIONS[activation]())
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref[0].running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_model_case_runs_and_starts_from_the_same_loss() -> None:
    (case,) = model_cases(TINY)
    loss_ref, loss_ours = case.baseline(), case.candidate()
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-5)


def test_time_many_and_floor() -> None:
    calls: list[str] = []
    medians = time_many([lambda: calls.append("a"), lambda: calls.append("b")], repeats=4, warmup=1)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    assert calls.count("a") == calls.count("b") == 5
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # the first side rotates
    x = torch.randn(10)
    floor_op(Traffic(x, copies=1, reads=2))()


def test_geomean_ratios() -> None:
    rs = [Result("s", "n", "m", 1.0, r, r, 3) for r in (0.5, 2.0, 1.0)]
    assert geomean_ratios(rs) == pytest.approx(1.0)
    assert math.isnan(geomean_ratios([]))


def test_plot(tmp_path: Path) -> None:
    rs = [Result("s", "n", m, 1.0, 0.8, 0.8, 3) for m in ("train fwd", "eval fwd")]
    path = plot_ratios(rs, tmp_path / "r.png")
    assert path.stat().st_size > 1000


def test_cli_bench_tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(_bn, "_QUICK_SHAPES", [(4, 3, 6, 5)])
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--quick",
            "--suite",
            "batchnorm",
            "--repeats",
            "3",
            "--no-tune-allocator",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(" eff") == 2  # base and normlab efficiency (two-line headers)
    assert "geometric-mean ratio" in result.output
    payload = json.loads(out_json.read_text())
    assert payload["meta"]["allocator"] == "default"
    meta = payload["meta"]  # the machine the timings belong to
    assert meta["torch"] == torch.__version__ and meta["cores"] >= 1 and meta["cpu"]
    _check_sane([Result(**r) for r in payload["results"]])
    assert out_png.exists()


def test_allocator_child_process(tmp_path: Path) -> None:
    """The allocator suite's child: tuned malloc, then both implementations timed."""
    cmd = [sys.executable, "-m", "normlab.bench._alloc", "--shape", "4", "3", "6", "5"]
    out = subprocess.run([*cmd, "--repeats", "3", "--tune"], check=True, capture_output=True)
    times = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert set(times) == {"torch", "normlab"} and all(v > 0 for v in times.values())
    assert _alloc.allocator_results.__doc__


def test_tune_cpu_allocator_in_child() -> None:
    code = "from normlab.perf import tune_cpu_allocator as t; print(t().applied)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")


def test_tune_cpu_allocator_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"trim_threshold must be in \[0, 2147483647\], got -1"):
        tune_cpu_allocator(trim_threshold=-1)


def test_lab_floor_runs_the_steps_products_and_the_cases_train(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lab suite's floor does the step's products (a conv net's convolutions and its head's bmm)
    on tensors of the step's shapes; both sides of a case take a training step."""
    from normlab.bench._lab import lab_cases, product_floor
    from normlab.lab.ensemble import Ensemble
    from normlab.lab.models import convnet

    ens = Ensemble([convnet((1, 8, 8), 10, channels=(2, 4), seed=s) for s in range(3)])
    floor = product_floor(ens, torch.rand(3, 5, 64))
    with torch.profiler.profile() as prof:
        floor()
    calls = [e.name for e in prof.events()]
    assert calls.count("aten::convolution_backward") == 2 and "aten::bmm" in calls
    monkeypatch.setattr("normlab.bench._lab.K", 2)
    case = lab_cases(BenchOptions(quick=True))[1]  # the ConvNet
    assert "ConvNet" in case.name
    before = [p.detach().clone() for p in case.candidate.__defaults__[0].parameters()]  # type: ignore[union-attr]
    case.candidate()
    case.baseline()
    after = list(case.candidate.__defaults__[0].parameters())  # type: ignore[union-attr]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert case.floor is not None and case.suite == "lab"
