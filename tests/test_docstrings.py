"""The API reference: every public class and function documents its arguments, what it returns
and a short example (numpy style); the examples themselves run as doctests (``pytest``
collects ``src/normlab``), and ``make docs`` builds the reference with ``--strict``."""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from torch import nn

MODULES = (
    "normlab.nn",
    "normlab.nn.utils",
    "normlab.functional",
    "normlab.init",
    "normlab.diagnostics",
    "normlab.kernels",
    "normlab.perf",
)
# documented by the helpers who own them (their modules are rewritten elsewhere)
ELSEWHERE = {"normlab.init.lsuv_"}


def _public() -> Iterator[tuple[str, Any]]:
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            qualified = f"{module_name}.{name}"
            if qualified in ELSEWHERE:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
                yield qualified, obj


def _sections(doc: str) -> set[str]:
    lines = inspect.cleandoc(doc).splitlines()
    return {
        lines[i].strip()
        for i in range(len(lines) - 1)
        if lines[i].strip() and set(lines[i + 1].strip()) == {"-"}
    }


def _parameters(fn: Callable[..., Any]) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters if p not in ("self", "cls")]


def _documented_parameters(doc: str) -> set[str]:
    """The names the Parameters section documents (``a, b : type`` documents both)."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i in range(len(lines) - 1) if lines[i].strip() == "Parameters") + 2
    except StopIteration:
        return set()
    names: set[str] = set()
    for line in lines[start:]:
        if line and set(line.strip()) == {"-"}:  # the next section's underline
            break
        if line and not line[0].isspace():
            names |= {n.strip().lstrip("*") for n in line.split(" : ")[0].split(",")}
    return names


def _returns_something(fn: Callable[..., Any]) -> bool:
    try:
        hints = typing.get_type_hints(inspect.unwrap(fn))
    except Exception:
        return inspect.signature(fn).return_annotation not in (
            None,
            "None",
            inspect.Signature.empty,
        )
    return hints.get("return", type(None)) is not type(None)


PUBLIC = dict(_public())


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_object_has_a_numpy_docstring_with_an_example(name: str) -> None:
    obj = PUBLIC[name]
    doc = obj.__doc__ or ""
    sections = _sections(doc)
    assert "Examples" in sections and ">>>" in doc, f"{name}: no Examples section"
    if inspect.isclass(obj):
        init_params = _parameters(obj) if obj.__init__ is not object.__init__ else []
        if init_params and not typing.get_origin(obj) and "Protocol" not in str(obj.__mro__):
            assert sections & {"Parameters", "Attributes"}, f"{name}: no Parameters section"
        if "Parameters" in sections:
            missing = set(init_params) - _documented_parameters(doc)
            assert not missing, f"{name}: parameters not documented: {sorted(missing)}"
    else:
        if _parameters(obj):
            assert "Parameters" in sections, f"{name}: no Parameters section"
            missing = set(_parameters(obj)) - _documented_parameters(doc)
            assert not missing, f"{name}: parameters not documented: {sorted(missing)}"
        if _returns_something(obj):
            assert sections & {"Returns", "Yields"}, f"{name}: no Returns section"


def _own_methods() -> Iterator[tuple[str, Any]]:
    for name, cls in PUBLIC.items():
        if not inspect.isclass(cls):
            continue
        own = [base for base in cls.__mro__ if base.__module__.startswith("normlab")]
        for attr, value in {k: v for base in reversed(own) for k, v in vars(base).items()}.items():
            if attr.startswith("_"):
                continue
            fn = value.__func__ if isinstance(value, classmethod | staticmethod) else value
            if isinstance(fn, property):
                fn = fn.fget
            if not callable(fn):
                continue
            if any(hasattr(base, attr) for base in (nn.Module, tuple, object)):
                continue  # torch's own methods (extra_repr, …) and tuple's are documented there
            yield f"{name}.{attr}", fn


METHODS = dict(_own_methods())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_public_method_has_its_own_docstring(name: str) -> None:
    assert (METHODS[name].__doc__ or "").strip(), f"{name}: no docstring"


def test_help_of_a_layer_shows_normlab_s_constructor_docstring() -> None:
    """``help(normlab.nn.BatchNorm2d)`` used to show nn.Module's boilerplate ``__init__`` doc."""
    import normlab

    for cls in (normlab.nn.BatchNorm2d, normlab.nn.BatchRenorm2d, normlab.nn.FrozenBatchNorm2d):
        assert "the class docstring" in (inspect.getdoc(cls.__init__) or ""), cls
        assert "Parameters" in _sections(cls.__doc__ or "")
