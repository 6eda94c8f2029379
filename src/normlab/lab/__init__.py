"""The lab: experiments that test the published claims about normalization and initialization.

``normlab lab run all --quick`` runs them; ``normlab lab report`` writes the report.
"""

import importlib

_NEEDS = {
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "filelock": "filelock",
}


def _missing() -> list[str]:
    missing = []
    for module, package in _NEEDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


if _missing():
    raise ImportError(
        f"normlab.lab needs the lab extra (missing: {', '.join(_missing())}): "
        "pip install 'normlab[lab]'"
    )

from .data import DATASETS, Dataset, DatasetError, distort, load_dataset  # noqa: E402

__all__ = ["DATASETS", "Dataset", "DatasetError", "distort", "load_dataset"]
