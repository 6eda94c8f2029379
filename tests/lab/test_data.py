"""Lab datasets: the digits split, a validating IDX reader, a CIFAR reader that refuses code."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.lab.data import DatasetError, distort, load_dataset, read_idx


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _fake_mnist(folder: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    _write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz=False)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))


def test_digits_fixed_stratified_split() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.x_train.shape == (1297, 64) and a.x_test.shape == (500, 64)
    assert torch.equal(a.x_train, b.x_train) and a.checksum == b.checksum
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    counts = torch.bincount(a.y_test, minlength=10)
    assert int(counts.min()) >= 48  # stratified: ~50 per class


def test_idx_dataset_found_in_data_dir_subfolder(tmp_path: Path) -> None:
    _fake_mnist(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 784) and ds.image_shape == (1, 28, 28)
    assert float(ds.x_train.max()) <= 1.0


def test_missing_dataset_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NORMLAB_DATA", raising=False)
    monkeypatch.setattr("normlab.lab.data.DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(DatasetError, match=r"IDX files not found .*`make data`"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x00", "too short for an IDX header"),
        (b"\x12\x34\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "needs 13; the file is truncated or corrupt"),
    ],
)
def test_idx_reader_rejects_bad_files_naming_them(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_reported(tmp_path: Path) -> None:
    good = _write_idx(tmp_path / "x.gz", np.zeros((4, 3)))
    good.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        read_idx(good)


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DatasetError, match=r"refusing to unpickle builtins\.print"):
        load_dataset("cifar10", data_dir=folder)


def test_cifar_batches_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 3072) and ds.image_shape == (3, 32, 32)


def test_subset_and_distort() -> None:
    ds = load_dataset("digits", subset=300)
    assert len(ds.y_train) == 300 and ds.checksum.endswith("-sub300")
    x = distort(ds.x_train, seed=1)
    scale = (x.std(0) / ds.x_train.std(0).clamp_min(1e-6))[ds.x_train.std(0) > 0.1]
    assert float(scale.max() / scale.min()) > 100  # features now on wildly different scales
    assert torch.equal(distort(ds.x_train, seed=1), x)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
