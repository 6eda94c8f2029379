"""Packaging: a light core import, lazy subpackages, the lab extra, ``python -m normlab``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_dependencies_are_torch_and_what_it_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"])
    assert names == ["ninja", "numpy", "torch", "tqdm"]
    lab = {d.split(">")[0] for d in project["optional-dependencies"]["lab"]}
    assert {"scipy", "scikit-learn", "matplotlib", "typer", "rich", "filelock"} <= lab


def test_import_normlab_is_light_and_subpackages_load_lazily() -> None:
    done = _run(
        "import sys, normlab\n"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'scipy', 'rich', 'typer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'normlab.init' not in sys.modules\n"
        "normlab.init.xavier_uniform_, normlab.preprocessing.Standardizer\n"
        "normlab.nn.utils.fold_batchnorm, normlab.diagnostics.LayerMonitor\n"
        "print('ok')"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_lab_without_its_extra_names_the_install_command() -> None:
    done = _run("import sys; sys.modules['sklearn'] = None; import normlab.lab")
    assert done.returncode == 1
    assert (
        "normlab.lab needs the lab extra (missing: scikit-learn): pip install 'normlab[lab]'"
        in done.stderr
    )


def test_command_line_without_its_extra_says_so_in_one_line() -> None:
    done = _run(
        "import sys; sys.modules['typer'] = None; from normlab.__main__ import main; main()"
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "normlab: the command line needs the lab extra (typer): pip install 'normlab[lab]'. "
        "Without it: python -m normlab.kernels build|status."
    )


def test_python_dash_m_normlab_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("normlab ")


def test_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "the normlab authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
