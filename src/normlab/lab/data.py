"""Datasets for the lab: embedded digits, IDX (Fashion-)MNIST, CIFAR-10 pickles, synthetic clusters.

Nothing ever downloads. Every dataset is returned as flattened float32 inputs in
``[0, 1]`` with int64 labels, plus the image shape to reshape them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "FILE_DATASETS",
    "IMAGE_DATASETS",
    "MAX_IDX_BYTES",
    "Dataset",
    "DatasetError",
    "distort",
    "load_dataset",
    "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
IMAGE_DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")  # the ones a ConvNet trains on
FILE_DATASETS = ("fashion-mnist", "mnist", "cifar10")  # read from files; the others are built in
DEBIAN_DIR = Path("/usr/share/datasets")


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


# --- where the files are -------------------------------------------------------------


def _folders(name: str, data_dir: Path | None) -> tuple[list[Path], bool]:
    """The folders that may hold ``name``'s files, and whether the user named them.

    An explicit folder (``data_dir``, else ``$NORMLAB_DATA``) is the only place looked at, with its
    ``<name>/`` subfolder; the system copy (Debian's ``/usr/share/datasets``) only when neither is set.
    """
    env = os.environ.get("NORMLAB_DATA")
    root = data_dir if data_dir is not None else Path(env) if env else None
    if root is not None:
        if not root.is_dir():
            origin = "--data-dir" if data_dir is not None else "$NORMLAB_DATA"
            raise DatasetError(f"{name}: {origin} {root} is not a folder")
        subfolders = [name, "cifar-10-batches-py"] if name == "cifar10" else [name]
        return [root, *(root / sub for sub in subfolders)], True
    if name == "fashion-mnist":
        return [DEBIAN_DIR / "fashion-mnist", DEBIAN_DIR / "fashion_mnist"], False
    return [DEBIAN_DIR / name], False


def _find_files(
    name: str, data_dir: Path | None, wanted: Mapping[str, tuple[str, ...]], what: str, how_to: str
) -> dict[str, Path]:
    """``{key: path}`` for every wanted file, all from one folder: the first folder that holds any of them.

    ``wanted`` maps a key to the accepted file names (first = the canonical one). A folder with only
    some of the files stops the search with an error naming the missing ones: files are never mixed
    across folders, and an explicit folder is never replaced by the system copy.
    """
    folders, explicit = _folders(name, data_dir)
    for d in folders:
        found = {
            key: next((d / n for n in names if (d / n).is_file()), None)
            for key, names in wanted.items()
        }
        if any(found.values()):
            missing = [names[0] for key, names in wanted.items() if found[key] is None]
            if missing:
                raise DatasetError(
                    f"{name}: {d} holds only part of the dataset; missing {', '.join(missing)}. "
                    "normlab never mixes files from different folders: add the missing files"
                    + (" or pass another --data-dir." if explicit else ".")
                )
            return {key: p for key, p in found.items() if p is not None}
    searched = ", ".join(str(d) for d in folders)
    raise DatasetError(f"{name}: {what} not found (searched {searched}). {how_to}")


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# The largest IDX body read_idx accepts by default, about 20x MNIST's training images (47 MB). A header
# that claims more is refused before any of the body is read (or decompressed).
MAX_IDX_BYTES = 1 << 30


def _read_exactly(f: io.BufferedIOBase, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DatasetError(
            f"{path}: truncated {what} ({len(data)} of {n} bytes); the file is truncated or corrupt"
        )
    return data


def read_idx(
    path: Path | str,
    *,
    ndim: int | None = None,
    dtype: Any = None,
    max_bytes: int = MAX_IDX_BYTES,
) -> np.ndarray:
    """Read an IDX file (optionally gzipped), validating its header before reading its body.

    The header (magic ``00 00``, a dtype code, the number of dimensions, the dimensions) is checked
    first: every dimension must be at least 1, the body at most ``max_bytes``, and ``ndim`` / ``dtype``
    what the caller expects. Then exactly the body the header announces is read (for a ``.gz`` file,
    decompressed incrementally: never more than that plus one read buffer), and the file must end there.

    Parameters
    ----------
    path : Path or str
        The file; a name ending in ``.gz`` is read as gzip.
    ndim, dtype : optional
        The expected number of dimensions and element dtype (e.g. ``np.uint8``).
    max_bytes : int
        The largest body accepted.

    Returns
    -------
    numpy.ndarray
        The array, of the header's shape and dtype.

    Raises
    ------
    DatasetError
        Naming the file and the problem (not IDX, truncated, corrupt deflate stream, empty or
        unexpected dimensions, longer than its header says, ...).

    Examples
    --------
    >>> import gzip, struct, tempfile, numpy as np
    >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
    >>> _ = path.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 3) + bytes([1, 2, 3])))
    >>> read_idx(path, ndim=1, dtype=np.uint8)
    array([1, 2, 3], dtype=uint8)
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DatasetError(f"{path}: {len(head)} bytes, too short for an IDX header")
            zero, code, nd = struct.unpack(">HBB", head)
            if zero != 0 or code not in _IDX_DTYPES or not 1 <= nd <= 4:
                raise DatasetError(
                    f"{path}: not an IDX file (magic bytes {head.hex()}: expected 00 00, a dtype "
                    f"code in {sorted(hex(c) for c in _IDX_DTYPES)} and 1-4 dimensions)"
                )
            dims = struct.unpack(">" + "I" * nd, _read_exactly(f, 4 * nd, path, "header"))
            kind = np.dtype(_IDX_DTYPES[code])
            if ndim is not None and nd != ndim:
                raise DatasetError(f"{path}: {nd} dimensions {dims}, expected {ndim}")
            if dtype is not None and kind != np.dtype(dtype):
                raise DatasetError(f"{path}: elements are {kind}, expected {np.dtype(dtype)}")
            if min(dims) == 0:
                raise DatasetError(
                    f"{path}: its header says dims {dims}: the file holds no samples"
                )
            size = math.prod(dims) * kind.itemsize
            if size > max_bytes:
                raise DatasetError(
                    f"{path}: its header says dims {dims} ({size:,} bytes), more than the "
                    f"{max_bytes:,}-byte limit; the header is corrupt (or pass max_bytes)"
                )
            body = _read_exactly(f, size, path, f"body (header says dims {dims}, {kind})")
            if f.read(1):
                raise DatasetError(
                    f"{path}: longer than its header says (dims {dims}, {kind}: "
                    f"{4 + 4 * nd + size} bytes); the file is corrupt"
                )
    except DatasetError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(
            f"{path}: cannot read ({exc}); the file is truncated or corrupt"
        ) from exc
    return np.frombuffer(body, dtype=kind).reshape(dims)


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (
    "normlab never downloads data. Get Fashion-MNIST with `make data` (Debian package "
    "dataset-fashion-mnist, needs root), or put the IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder "
    "and pass --data-dir (or set $NORMLAB_DATA)."
)


def _check_labels(path: Path, y: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        raise DatasetError(
            f"{path}: labels must be 0-{num_classes - 1}; {len(bad)} are not "
            f"(label {y[bad[0]]} at index {bad[0]})"
        )


def _idx_dataset(name: str, data_dir: Path | None) -> Dataset:
    wanted = {
        key: (f"{stem}.gz", stem, stem.replace("-idx", ".idx")) for key, stem in _IDX_FILES.items()
    }
    files = _find_files(name, data_dir, wanted, "IDX files", _HOW_TO_GET)
    x = {s: read_idx(files[f"{s}_x"], ndim=3, dtype=np.uint8) for s in ("train", "test")}
    y = {s: read_idx(files[f"{s}_y"], ndim=1, dtype=np.uint8) for s in ("train", "test")}
    for s in ("train", "test"):
        if len(x[s]) != len(y[s]):
            raise DatasetError(
                f"{name}: {files[s + '_x']} holds {len(x[s])} images but {files[s + '_y']} "
                f"holds {len(y[s])} labels"
            )
        _check_labels(files[s + "_y"], y[s], 10)
    if x["test"].shape[1:] != x["train"].shape[1:]:
        raise DatasetError(
            f"{name}: the test images ({files['test_x']}) are {x['test'].shape[1:]} but the "
            f"training images ({files['train_x']}) are {x['train'].shape[1:]}"
        )
    xtr = x["train"].reshape(len(x["train"]), -1) / 255.0
    xte = x["test"].reshape(len(x["test"]), -1) / 255.0
    h, w = x["train"].shape[1:]
    return _make(name, xtr, y["train"], xte, y["test"], (1, h, w), 10)


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
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one batch, every field checked."""
    try:
        with path.open("rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from exc
    except Exception as exc:  # unpickling damaged bytes raises almost anything
        raise DatasetError(
            f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(
            f"{path}: not a CIFAR-10 batch: expected a dict with b'data' and b'labels', "
            f"got {type(batch).__name__}"
        )
    missing = [repr(k) for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise DatasetError(
            f"{path}: not a CIFAR-10 batch: no {' or '.join(missing)} key "
            f"(keys: {', '.join(sorted(map(repr, batch))[:8])})"
        )
    data, labels = batch[b"data"], batch[b"labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[0] > 0
        and data.shape[1] == 3072
    ):
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetError(f"{path}: b'data' must be a uint8 array of shape (N>0, 3072), got {got}")
    try:
        y = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
    except ValueError:  # ragged nested lists
        y = None
    if y is None or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(data):
        raise DatasetError(
            f"{path}: b'labels' must be {len(data)} integers (one per image), got "
            + (f"{y.dtype} array of shape {y.shape}" if y is not None else type(labels).__name__)
        )
    _check_labels(path, y, 10)
    return data, y.astype(np.int64)


_CIFAR_HOW_TO = (
    "Pass --data-dir pointing at the extracted cifar-10-batches-py folder (python version). "
    "normlab never downloads data."
)


def _cifar10(data_dir: Path | None) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = _find_files(
        "cifar10",
        data_dir,
        {n: (n,) for n in names},
        "python batches (data_batch_1..5, test_batch)",
        _CIFAR_HOW_TO,
    )
    parts = [_load_cifar_batch(files[n]) for n in names[:-1]]
    xte, yte = _load_cifar_batch(files["test_batch"])
    xtr = np.concatenate([p[0] for p in parts]) / 255.0
    ytr = np.concatenate([p[1] for p in parts])
    return _make("cifar10", xtr, ytr, xte / 255.0, yte, (3, 32, 32), 10)


# --- public ---------------------------------------------------------------------


def load_dataset(
    name: str = "digits", *, data_dir: Path | str | None = None, subset: int | None = None
) -> Dataset:
    """Load one of :data:`DATASETS`, every file validated.

    Parameters
    ----------
    name : str
        ``digits`` and ``synthetic`` are built in; ``fashion-mnist``, ``mnist`` (IDX files) and
        ``cifar10`` (python batches) are read from ``data_dir``, else ``$NORMLAB_DATA``, else the
        system copy (``/usr/share/datasets``). An explicit folder is the only one looked at, and
        all of a dataset's files come from one folder.
    data_dir : Path or str, optional
        The folder with the files (or a ``<name>/`` subfolder of it); only for the file datasets.
    subset : int, optional
        Keep a fixed stratified ``subset``-sample training set (the test set stays whole).

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetError
        A file is missing, damaged or inconsistent; the message names it.
    ValueError
        An unknown ``name``, or ``data_dir`` given for a built-in dataset.

    Examples
    --------
    >>> ds = load_dataset("synthetic")
    >>> ds.x_train.shape, ds.num_classes
    (torch.Size([600, 20]), 4)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if data_dir is not None and name not in FILE_DATASETS:
        raise ValueError(
            f"{name} is built in and reads no files; a data folder ({data_dir}) is only read for "
            f"{', '.join(FILE_DATASETS)}"
        )
    directory = Path(data_dir) if data_dir is not None else None
    if name == "digits":
        ds = _digits()
    elif name == "synthetic":
        ds = _synthetic()
    elif name == "cifar10":
        ds = _cifar10(directory)
    else:
        ds = _idx_dataset(name, directory)
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of samples, got {subset}")
    if subset is not None and subset < len(ds.y_train):
        try:
            idx = torch.from_numpy(_stratified_subset(ds.y_train.numpy(), subset))
        except ValueError as exc:  # e.g. a class with a single sample
            raise DatasetError(
                f"{name}: cannot draw a stratified {subset}-sample training subset ({exc})"
            ) from exc
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
