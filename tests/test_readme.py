"""The README's examples run, and say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first_block is not None
    commands = [
        line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()
    ]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_readme_names_exist() -> None:
    """Every ``normlab.x.y`` the README names resolves, and so does every ``Layer.method(``
    (``convert_frozen_batchnorm`` is a classmethod of ``FrozenBatchNorm2d``, not a function)."""
    import importlib

    import normlab

    text = README.read_text()
    for dotted in sorted(set(re.findall(r"`(normlab(?:\.\w+)+)", text))):
        parts, obj = dotted.split("."), None
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            break
        assert obj is not None, dotted
    methods = set(re.findall(r"`([A-Z]\w+)\.(\w+)\(", text))
    assert methods, "the README names no layer methods any more; update this test"
    for cls, method in methods:
        assert callable(getattr(getattr(normlab.nn, cls), method)), f"{cls}.{method}"
