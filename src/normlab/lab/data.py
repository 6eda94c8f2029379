"""Datasets for the lab: embedded digits, IDX (Fashion-)MNIST, CIFAR-10 pickles, synthetic clusters.

Nothing ever downloads. Every dataset is returned as flattened float32 inputs in
``[0, 1]`` with int64 labels, plus the image shape to reshape them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "distort",
    "load_dataset",
    "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
DEBIAN_DIR = Path("/usr/share/datasets")
_HOW_TO_GET = (
    "normlab never downloads data. Get Fashion-MNIST with `make data` (Debian package "
    "dataset-fashion-mnist, needs root), or put the IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder "
    "and pass --data-dir (or set $NORMLAB_DATA)."
)


class DatasetError(RuntimeError):
    """A dataset is missing, truncated or corrupt; the message says which file and how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split: ``x_*`` ``(N, F)`` float32 in ``[0, 1]``, ``y_*`` ``(N,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    image_shape: tuple[int, ...]
    num_classes: int
    checksum: str

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def images(self, x: Tensor) -> Tensor:
        """``(N, F)`` → ``(N, C, H, W)`` (for CNNs)."""
        return x.view(x.shape[0], *self.image_shape)


def _checksum(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _make(
    name: str,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    image_shape: tuple[int, ...],
    num_classes: int,
) -> Dataset:
    return Dataset(
        name,
        torch.from_numpy(np.ascontiguousarray(xtr, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(ytr, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(xte, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(yte, dtype=np.int64)),
        image_shape,
        num_classes,
        _checksum(xtr, ytr, xte, yte),
    )


def _stratified_subset(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    if k >= len(y):
        return np.arange(len(y))
    idx, _ = train_test_split(np.arange(len(y)), train_size=k, stratify=y, random_state=seed)
    return np.sort(idx)


# --- digits ---------------------------------------------------------------------


def _digits() -> Dataset:
    """scikit-learn's 8×8 digits: fixed stratified split, 1297 train / 500 test (split seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=500, stratify=y, random_state=0)
    return _make("digits", xtr, ytr, xte, yte, (1, 8, 8), 10)


def _synthetic(
    n_train: int = 600, n_test: int = 300, features: int = 20, classes: int = 4
) -> Dataset:
    """Gaussian clusters in ``[0, 1]``: a fast, always-available dataset for tests."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, size=(classes, features))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        x = np.clip(centers[y] + rng.normal(0, 0.12, size=(n, features)), 0, 1)
        return x, y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return _make("synthetic", xtr, ytr, xte, yte, (features,), classes)


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), validating magic, dtype code, dimensions and length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(
            f"{path}: cannot read ({exc}); the file is truncated or corrupt"
        ) from exc
    if len(raw) < 4:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DatasetError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex()}: expected 00 00, a dtype code "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)} and 1-4 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: {len(raw)} bytes, but its header (dims {dims}, {dtype}) needs {expected}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _search_dirs(name: str, data_dir: Path | None) -> list[Path]:
    dirs: list[Path] = []
    for root in (
        data_dir,
        Path(os.environ["NORMLAB_DATA"]) if os.environ.get("NORMLAB_DATA") else None,
    ):
        if root is not None:
            dirs += [root, root / name]
    if name == "fashion-mnist":
        dirs += [DEBIAN_DIR / "fashion-mnist", DEBIAN_DIR / "fashion_mnist"]
    else:
        dirs += [DEBIAN_DIR / name]
    return dirs


def _find_idx(name: str, data_dir: Path | None) -> dict[str, Path]:
    for d in _search_dirs(name, data_dir):
        found = {}
        for key, stem in _IDX_FILES.items():
            for candidate in (d / f"{stem}.gz", d / stem, d / stem.replace("-idx", ".idx")):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_IDX_FILES):
            return found
    searched = ", ".join(str(d) for d in _search_dirs(name, data_dir))
    raise DatasetError(f"{name}: IDX files not found (searched {searched}). {_HOW_TO_GET}")


def _idx_dataset(name: str, data_dir: Path | None) -> Dataset:
    files = _find_idx(name, data_dir)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{name}: {files[split + '_x']} has shape {x.shape} but {files[split + '_y']} has {y.shape}"
            )
    xtr = arrays["train_x"].reshape(len(arrays["train_x"]), -1) / 255.0
    xte = arrays["test_x"].reshape(len(arrays["test_x"]), -1) / 255.0
    h, w = arrays["train_x"].shape[1:]
    return _make(name, xtr, arrays["train_y"], xte, arrays["test_y"], (1, h, w), 10)


# --- CIFAR-10 (python pickle batches, restricted unpickler) ----------------------------


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what CIFAR-10's batches hold (numpy arrays, lists, dicts): a pickle can run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to unpickle {module}.{name}: not part of a CIFAR-10 batch")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({exc})") from exc
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.shape[1:] != (3072,) or labels is None:
        raise DatasetError(f"{path}: unexpected CIFAR-10 batch contents")
    return data, np.asarray(labels)


def _cifar10(data_dir: Path | None) -> Dataset:
    for d in _search_dirs("cifar10", data_dir) + [
        p / "cifar-10-batches-py" for p in _search_dirs("cifar10", data_dir)
    ]:
        train = [d / f"data_batch_{i}" for i in range(1, 6)]
        if all(p.is_file() for p in train) and (d / "test_batch").is_file():
            parts = [_load_cifar_batch(p) for p in train]
            xte, yte = _load_cifar_batch(d / "test_batch")
            xtr = np.concatenate([p[0] for p in parts]) / 255.0
            ytr = np.concatenate([p[1] for p in parts])
            return _make("cifar10", xtr, ytr, xte / 255.0, yte, (3, 32, 32), 10)
    raise DatasetError(
        "cifar10: python batches (data_batch_1..5, test_batch) not found; pass --data-dir pointing at "
        "the extracted cifar-10-batches-py folder. normlab never downloads data."
    )


# --- public ---------------------------------------------------------------------


def load_dataset(
    name: str = "digits", *, data_dir: Path | str | None = None, subset: int | None = None
) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`); ``subset=k`` keeps a fixed stratified ``k``-sample training set."""
    directory = Path(data_dir) if data_dir is not None else None
    if name == "digits":
        ds = _digits()
    elif name == "synthetic":
        ds = _synthetic()
    elif name in ("fashion-mnist", "mnist"):
        ds = _idx_dataset(name, directory)
    elif name == "cifar10":
        ds = _cifar10(directory)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if subset is not None and subset < len(ds.y_train):
        idx = torch.from_numpy(_stratified_subset(ds.y_train.numpy(), subset))
        ds = Dataset(
            ds.name,
            ds.x_train[idx],
            ds.y_train[idx],
            ds.x_test,
            ds.y_test,
            ds.image_shape,
            ds.num_classes,
            ds.checksum + f"-sub{subset}",
        )
    return ds


def distort(x: Tensor, *, seed: int = 0) -> Tensor:
    """Badly scaled inputs: feature ``j`` becomes ``s_j * x_j + o_j`` with ``s_j = 10**U(-2, 2)``
    and ``o_j = s_j * N(0, 1)`` (fixed by ``seed``, the same for train and test)."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand(x.shape[1], generator=g) * 4 - 2)
    offset = scale * torch.randn(x.shape[1], generator=g)
    return x * scale + offset
