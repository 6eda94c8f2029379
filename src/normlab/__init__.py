"""normlab: input standardization, weight initialization and batch normalization for PyTorch.

``import normlab`` loads the layers (:mod:`normlab.nn`) and the math (:mod:`normlab.functional`);
:mod:`normlab.init`, :mod:`normlab.preprocessing`, :mod:`normlab.diagnostics` and
:mod:`normlab.lab` load on first use (``normlab.init.xavier_uniform_`` works without an import).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("normlab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from . import functional, nn

__all__ = ["__version__", "diagnostics", "functional", "init", "lab", "nn", "preprocessing"]

_LAZY = ("init", "preprocessing", "diagnostics", "lab")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
