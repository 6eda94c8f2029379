"""Input preprocessing: the streaming :class:`Standardizer`."""

from ._standardizer import NanPolicy, Standardizer

__all__ = ["NanPolicy", "Standardizer"]
