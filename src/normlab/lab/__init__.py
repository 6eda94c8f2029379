"""The lab: experiments that test the published claims about normalization and initialization.

``normlab lab run all --quick`` runs them; ``normlab lab report`` writes the report.
"""

import importlib.util

_NEEDS = {
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "filelock": "filelock",
}


def _missing() -> list[str]:
    """The lab extra's packages that are not installed (found, not imported: the command line
    imports this package, and importing scikit-learn and matplotlib takes seconds)."""
    missing = []
    for module, package in _NEEDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken package, or sys.modules[module] is None
            found = False
        if not found:
            missing.append(package)
    return missing


if _missing():
    raise ImportError(
        f"normlab.lab needs the lab extra (missing: {', '.join(_missing())}): "
        "pip install 'normlab[lab]'"
    )

from .data import DATASETS, Dataset, DatasetError, distort, load_dataset  # noqa: E402

__all__ = ["DATASETS", "Dataset", "DatasetError", "distort", "load_dataset"]
