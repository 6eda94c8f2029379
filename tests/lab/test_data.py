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


def _fake_cifar(folder: Path, batches: dict[str, object] | None = None) -> Path:
    """Six valid batches of 4 images in ``folder``; ``batches`` replaces some by other objects."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps((batches or {}).get(name, batch)))
    return folder


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
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", r"truncated body .*\(2 of 5 bytes\)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02\x03", "longer than its header says"),
        (
            b"\x00\x00\x08\x03\x00\x00\x00\x00" + b"\x00\x00\x00\x1c" * 2,
            r"dims \(0, 28, 28\): the file holds no samples",
        ),
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
    ds = load_dataset("cifar10", data_dir=_fake_cifar(tmp_path))
    assert ds.x_train.shape == (20, 3072) and ds.image_shape == (3, 32, 32)
    assert ds.y_train.dtype == torch.int64 and ds.y_train[:4].tolist() == [1, 2, 3, 4]


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


# --- damaged files: each a DatasetError naming the file and the problem -----------------


def test_corrupt_deflate_stream_is_a_dataset_error(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(100))
    raw = path.read_bytes()
    path.write_bytes(raw[:10] + b"\xff" + raw[11:])  # deflate block type 11: reserved, invalid
    with pytest.raises(DatasetError, match=r"invalid block type.*truncated or corrupt") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_bomb_is_refused_after_reading_only_what_the_header_announces(tmp_path: Path) -> None:
    """A 200 MB body behind a 20x28x28 header: at most the header's 15,680 bytes (+1) are inflated."""
    import tracemalloc
    import zlib

    path = tmp_path / "bomb-idx3-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    chunks = [packer.compress(struct.pack(">HBBIII", 0, 0x08, 3, 20, 28, 28))]
    zeros = bytes(1 << 20)
    chunks += [packer.compress(zeros) for _ in range(200)]
    path.write_bytes(b"".join([*chunks, packer.flush()]))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(
            DatasetError, match=r"longer than its header says \(dims \(20, 28, 28\)"
        ):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated reading a 15 kB IDX body"


def test_header_claiming_a_huge_body_is_refused_before_the_body(tmp_path: Path) -> None:
    path = tmp_path / "huge-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBBIII", 0, 0x08, 3, 60_000, 100_000, 100_000)))
    with pytest.raises(DatasetError, match=r"more than the 1,073,741,824-byte limit"):
        read_idx(path)
    with pytest.raises(DatasetError, match=r"more than the 100-byte limit"):
        read_idx(_write_idx(tmp_path / "small.gz", np.zeros((11, 10))), max_bytes=100)


def test_expected_rank_and_dtype_are_checked_from_the_header(tmp_path: Path) -> None:
    path = _write_idx(tmp_path / "x.gz", np.zeros((4, 3)))
    with pytest.raises(DatasetError, match=r"2 dimensions \(4, 3\), expected 3"):
        read_idx(path, ndim=3)
    with pytest.raises(DatasetError, match="elements are uint8, expected int32"):
        read_idx(path, dtype=np.int32)


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    labels = np.arange(20) % 10
    labels[7] = 200
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(
        DatasetError,
        match=r"train-labels-idx1-ubyte.gz: labels must be 0-9; 1 are not \(label 200 at index 7\)",
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_test_images_of_another_shape_are_refused(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32)), gz=False)
    with pytest.raises(
        DatasetError,
        match=r"test images .* are \(32, 32\) but the training images .* are \(28, 28\)",
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(
        DatasetError, match=r"holds 20 images but .*train-labels-idx1-ubyte.gz holds 19 labels"
    ):
        load_dataset("mnist", data_dir=tmp_path)


def test_zero_sample_dataset_file_is_refused(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">HBBI", 0, 0x08, 1, 0))
    )
    with pytest.raises(
        DatasetError, match=r"t10k-labels-idx1-ubyte.gz: its header says dims \(0,\)"
    ):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([1, 2, 3], r"not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got list"),
        ({b"labels": [0]}, r"not a CIFAR-10 batch: no b'data' key"),
        ({"data": 1, "labels": [0]}, r"no b'data' or b'labels' key \(keys: 'data', 'labels'\)"),
        (
            {b"data": np.zeros((4, 3072)), b"labels": [0] * 4},
            r"b'data' must be a uint8 array of shape \(N>0, 3072\), got float64",
        ),
        (
            {b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
            r"got uint8 array of shape \(0, 3072\)",
        ),
        ({b"data": [1, 2], b"labels": [0]}, r"b'data' must be .* got list"),
        (
            {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]},
            r"b'labels' must be 4 integers",
        ),
        (
            {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0.5] * 4},
            r"b'labels' must be 4 integers .*got float64",
        ),
        (
            {b"data": np.zeros((4, 3072), np.uint8), b"labels": "abcd"},
            r"b'labels' must be 4 integers .*got str",
        ),
        (
            {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 10, 2]},
            r"labels must be 0-9; 1 are not \(label 10 at index 2\)",
        ),
    ],
)
def test_malformed_cifar_batches_are_dataset_errors(
    tmp_path: Path, batch: object, match: str
) -> None:
    folder = _fake_cifar(tmp_path / "cifar", {"data_batch_3": batch})
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset("cifar10", data_dir=folder)
    assert str(folder / "data_batch_3") in str(info.value)


def test_truncated_cifar_pickle_is_a_dataset_error(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"test_batch: not a readable CIFAR-10 batch \("):
        load_dataset("cifar10", data_dir=folder)


# --- where the files come from: an explicit folder, never mixed with the system copy -------


@pytest.fixture
def system_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A complete Fashion-MNIST in a stand-in for /usr/share/datasets, with 30 training images."""
    monkeypatch.delenv("NORMLAB_DATA", raising=False)
    monkeypatch.setattr("normlab.lab.data.DEBIAN_DIR", tmp_path / "system")
    _fake_mnist(tmp_path / "system" / "fashion-mnist", n_train=30)
    return tmp_path / "system"


def test_system_copy_is_used_when_no_folder_is_given(system_copy: Path) -> None:
    assert len(load_dataset("fashion-mnist").y_train) == 30


def test_data_dir_missing_a_file_stops_naming_it(system_copy: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    _fake_mnist(mine)
    (mine / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DatasetError,
        match=r"mine holds only part of the dataset; missing t10k-labels-idx1-ubyte.gz\. normlab never mixes",
    ):
        load_dataset("fashion-mnist", data_dir=mine)


def test_data_dir_without_the_files_never_falls_back(system_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DatasetError, match=r"IDX files not found \(searched .*empty, .*empty/fashion-mnist\)"
    ) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert str(system_copy) not in str(info.value)


def test_normlab_data_is_explicit_too(
    system_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_mnist(tmp_path / "env" / "fashion-mnist", n_train=12)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist").y_train) == 12
    _fake_mnist(tmp_path / "arg", n_train=14)
    assert (
        len(load_dataset("fashion-mnist", data_dir=tmp_path / "arg").y_train) == 14
    )  # the argument wins
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"\$NORMLAB_DATA .*nowhere is not a folder"):
        load_dataset("fashion-mnist")


def test_data_dir_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"--data-dir .*nope is not a folder"):
        load_dataset("mnist", data_dir=tmp_path / "nope")


def test_data_dir_for_a_built_in_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="digits is built in and reads no files"):
        load_dataset("digits", data_dir=tmp_path)


def test_cifar_batches_found_in_the_extracted_subfolder(tmp_path: Path) -> None:
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    assert load_dataset("cifar10", data_dir=tmp_path).x_test.shape == (4, 3072)


def test_subset_that_cannot_be_stratified_is_a_dataset_error(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, n_train=30)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0] * 29 + [1]))
    with pytest.raises(
        DatasetError,
        match=r"mnist: cannot draw a stratified 10-sample training subset \(The least populated class",
    ):
        load_dataset("mnist", data_dir=tmp_path, subset=10)
    with pytest.raises(ValueError, match="subset must be a positive number of samples, got 0"):
        load_dataset("digits", subset=0)
