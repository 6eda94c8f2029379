"""The API reference's docstring conversion (``make docs`` builds the site itself, --strict)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("griffe")
_PATH = Path(__file__).resolve().parents[1] / "docs" / "_ext" / "rst_roles.py"
_spec = importlib.util.spec_from_file_location("rst_roles", _PATH)
assert _spec is not None and _spec.loader is not None
rst_roles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rst_roles)


def test_roles_naming_public_normlab_objects_become_links() -> None:
    text = "See :class:`~normlab.nn.BatchNorm2d` and :func:`normlab.functional.batch_norm`."
    assert rst_roles.markdown(text) == (
        "See [`BatchNorm2d`][normlab.nn.BatchNorm2d] and "
        "[`normlab.functional.batch_norm`][normlab.functional.batch_norm]."
    )


def test_other_roles_become_code() -> None:
    text = ":class:`torch.nn.BatchNorm2d`, :meth:`paper_schedule`, :mod:`._build`, :math:`x^2`"
    assert rst_roles.markdown(text) == "`torch.nn.BatchNorm2d`, `paper_schedule`, `._build`, `x^2`"
    assert rst_roles.markdown(":class:`~normlab.lab.store._Private`") == "`_Private`"


def test_math_blocks_become_code_blocks() -> None:
    text = "Before.\n\n.. math::\n    y = x\n    z = y\n\nAfter.\n.. math:: a = b"
    assert rst_roles.markdown(text) == (
        "Before.\n\n```text\ny = x\nz = y\n```\n\nAfter.\n```text\na = b\n```\n"
    )
