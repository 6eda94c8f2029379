"""normlab: input standardization, weight initialization and batch normalization for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("normlab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from . import functional, nn

__all__ = ["__version__", "functional", "nn"]
