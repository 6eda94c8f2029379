"""The lab: experiments that test the published claims about normalization and initialization.

``normlab lab run all --quick`` runs them; ``normlab lab report`` writes the report.
"""

from .data import DATASETS, Dataset, DatasetError, distort, load_dataset

__all__ = ["DATASETS", "Dataset", "DatasetError", "distort", "load_dataset"]
