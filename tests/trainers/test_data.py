"""Data loaders on real MNIST and on small files of every format built here, good and corrupt."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from contract.checksum import file_sha256
from contract.errors import UsageError
from datafiles import DATASETS, load_dataset, synthetic, to_model_input
from datafiles.canonical import (
    content_sha256,
    read_canonical,
    read_meta,
    write_canonical,
)
from datafiles.digits import DIGITS_FILE
from datafiles.matfile import read_mat5

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------- helpers that write raw formats


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        data = idx_bytes(array, 0x803 if array.ndim == 3 else 0x801)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def write_sums(directory: Path) -> None:
    lines = [
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}"
        for path in sorted(directory.iterdir())
        if path.name != "SHA256SUMS"
    ]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def write_cifar(directory: Path, records: int = 4) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = RNG.integers(0, 10, records, dtype=np.uint8)
        images = RNG.integers(0, 256, (records, 3, 32, 32), dtype=np.uint8)
        rows = np.concatenate([labels[:, None], images.reshape(records, -1)], axis=1)
        (directory / name).write_bytes(rows.tobytes())
        batches[name] = (images, labels)
    return batches


def write_svhn(directory: Path, n: int, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN-layout MAT-file written by scipy (an independent writer): X (32,32,3,N), y 1..10."""
    scipy_io = pytest.importorskip("scipy.io")
    directory.mkdir(parents=True, exist_ok=True)
    images = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = RNG.integers(0, 10, n)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy_io.savemat(
            directory / name,
            {
                "X": images.transpose(2, 3, 1, 0),  # (H, W, C, N) as SVHN stores it
                "y": np.where(labels == 0, 10, labels).astype(np.float64).reshape(-1, 1),
                "note": "cells and strings are skipped",
            },
            do_compression=compress,
        )
    return images, labels


# ---------------------------------------------------------------- real MNIST


def test_real_mnist_loads_with_checksums(mnist_dir):
    data = load_dataset("mnist", mnist_dir)
    assert (data.name, data.num_classes, data.in_shape) == ("mnist", 10, (1, 28, 28))
    assert (data.train_size, data.test_size) == (60000, 10000)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int64
    assert sorted(np.unique(data.test_labels)) == list(range(10))
    assert data.train_images.max() == 255 and data.train_images.min() == 0
    # every file in the real directory is listed in its SHA256SUMS, so all four were verified
    listed = (mnist_dir / "SHA256SUMS").read_text()
    assert all(p.name in listed for p in mnist_dir.glob("*-ubyte.gz"))


def test_real_mnist_copy_with_one_changed_byte_fails_its_checksum(mnist_dir, tmp_path):
    copy = tmp_path / "mnist"
    shutil.copytree(mnist_dir, copy)
    target = copy / "t10k-labels-idx1-ubyte.gz"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-12] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .* does not match"):
        load_dataset("mnist", copy)


# ---------------------------------------------------------------- MNIST IDX built here


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(data.train_images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.test_images[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte"])


def test_idx_bad_magic_names_file_and_value(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes((0x801).to_bytes(4, "big") + path.read_bytes()[4:])
    with pytest.raises(
        UsageError, match=r"train-images-idx3-ubyte: IDX magic 0x00000801, expected 0x00000803"
    ):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        UsageError,
        match=r"t10k-images-idx3-ubyte: \d+ bytes, expected \d+ for dimensions \(5, 28, 28\)",
    ):
        load_dataset("mnist", tmp_path)


def test_idx_label_count_must_match_images(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8), 0x801))
    with pytest.raises(UsageError, match=r"train-labels-idx1-ubyte: 11 labels, expected 12"):
        load_dataset("mnist", tmp_path)


def test_idx_wrong_image_size(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        idx_bytes(np.zeros((12, 32, 32), np.uint8), 0x803)
    )
    with pytest.raises(UsageError, match=r"image size \(32, 32\), expected \(28, 28\)"):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UsageError, match=r"train-labels-idx1-ubyte\.gz: not a valid gzip file"):
        load_dataset("mnist", tmp_path)


def test_sha256sums_mismatch_on_built_files(tmp_path):
    write_mnist(tmp_path)
    write_sums(tmp_path)
    load_dataset("mnist", tmp_path)  # all listed, all match
    path = tmp_path / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # still a valid IDX file, only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(
        UsageError, match=r"train-labels-idx1-ubyte: sha256 [0-9a-f]{64} does not match"
    ):
        load_dataset("mnist", tmp_path)


def test_missing_file_is_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        UsageError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\) not found"
    ):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("subdir", [False, True])
def test_cifar_batches_round_trip(tmp_path, subdir):
    batches = write_cifar(tmp_path / "cifar-10-batches-bin" if subdir else tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert (data.train_size, data.test_size, data.in_shape) == (20, 4, (3, 32, 32))
    np.testing.assert_array_equal(data.train_images[4:8], batches["data_batch_2.bin"][0])
    np.testing.assert_array_equal(data.train_labels[16:], batches["data_batch_5.bin"][1])
    np.testing.assert_array_equal(data.test_images, batches["test_batch.bin"][0])


def test_cifar_partial_record(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        UsageError,
        match=r"data_batch_3\.bin: 12291 bytes is not a whole number of 3073-byte records",
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar_bad_label(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    data = bytearray(path.read_bytes())
    data[0] = 42
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"test_batch\.bin: label 42 outside 0..9"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- SVHN (MAT-file v5)


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_mat_files_round_trip(tmp_path, compress):
    images, labels = write_svhn(tmp_path, 7, compress)
    data = load_dataset("svhn", tmp_path)
    assert data.in_shape == (3, 32, 32)
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.test_labels, labels)


def test_mat_reader_keeps_class_and_order(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    values = {
        "a": np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 3,
        "b": np.array([[1, 2, 3]], dtype=np.int16),
        "c": np.array([[7]], dtype=np.uint8),
    }
    scipy_io.savemat(tmp_path / "v.mat", values, do_compression=True)
    read = read_mat5(tmp_path / "v.mat")
    for key, value in values.items():
        assert read[key].dtype == value.dtype
        np.testing.assert_array_equal(read[key], value)


def test_svhn_truncated_mat_file(tmp_path):
    write_svhn(tmp_path, 5, compress=False)
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UsageError, match=r"test_32x32\.mat: MAT-file element at byte \d+ needs"):
        load_dataset("svhn", tmp_path)


def test_svhn_not_a_mat_file(tmp_path):
    write_svhn(tmp_path, 5, compress=True)
    (tmp_path / "train_32x32.mat").write_bytes(b"\x89HDF\r\n" + bytes(200))
    with pytest.raises(UsageError, match=r"train_32x32\.mat: not a MATLAB 5 MAT-file"):
        load_dataset("svhn", tmp_path)


def test_svhn_wrong_shape(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    write_svhn(tmp_path, 3, compress=True)
    scipy_io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": np.zeros((28, 28, 1, 3), np.uint8), "y": np.ones((3, 1))},
    )
    with pytest.raises(
        UsageError,
        match=r"train_32x32\.mat: X has shape \(28, 28, 1, 3\), expected \(32, 32, 3, N\)",
    ):
        load_dataset("svhn", tmp_path)


# ---------------------------------------------------------------- digits, synthetic, scaling


def test_digits_ship_inside_the_package():
    data = load_dataset("digits")
    assert (data.train_size, data.test_size, data.in_shape) == (1437, 360, (1, 8, 8))
    with gzip.open(DIGITS_FILE, "rt") as stream:
        first = [int(v) for v in stream.readline().split(",")]
    expected = np.round(np.array(first[:64]) * 255 / 16).astype(np.uint8).reshape(1, 8, 8)
    np.testing.assert_array_equal(data.train_images[0], expected)
    assert data.train_labels[0] == first[64]
    assert data.train_images.max() == 255
    assert sorted(np.unique(data.test_labels)) == list(range(10))


def test_synthetic_any_shape_and_seeded():
    a = synthetic((3, 32, 32), 50, num_classes=7, seed=3)
    b = synthetic((3, 32, 32), 50, num_classes=7, seed=3)
    c = synthetic((3, 32, 32), 50, num_classes=7, seed=4)
    assert a.in_shape == (3, 32, 32) and a.train_size == 50 and a.test_size == 5
    assert a.train_labels.max() < 7
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert load_dataset("synthetic", in_shape=(3, 224, 224), synthetic_size=4).in_shape == (
        3,
        224,
        224,
    )


def test_to_model_input_maps_pixels_to_minus_one_plus_one():
    import torch

    pixels = np.array([0, 127, 128, 255], dtype=np.uint8)
    out = to_model_input(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out, [-1.0, 127 / 127.5 - 1, 128 / 127.5 - 1, 1.0], rtol=0, atol=1e-7
    )
    tensor = to_model_input(torch.from_numpy(pixels))
    assert tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), out)


# ---------------------------------------------------------------- load_dataset errors


def test_unknown_dataset_names_choices():
    with pytest.raises(UsageError) as info:
        load_dataset("imagenet", "/nowhere")
    message = str(info.value)
    assert "'imagenet'" in message and all(name in message for name in DATASETS)


def test_raw_data_set_needs_an_existing_directory(tmp_path):
    with pytest.raises(UsageError, match=r"dataset 'mnist' needs a data directory"):
        load_dataset("mnist")
    with pytest.raises(UsageError, match=r"data directory .*absent not found"):
        load_dataset("cifar10", tmp_path / "absent")


# ---------------------------------------------------------------- canonical file


def test_canonical_round_trip_and_lookup(tmp_path):
    original = load_dataset("digits")
    path = tmp_path / "prepared" / "digits.npz"
    checksum = write_canonical(original, path)
    assert read_meta(path)["content_sha256"] == checksum
    assert [p.name for p in path.parent.iterdir()] == ["digits.npz"]  # no temp file left
    for source in (path, path.parent):  # the file itself, or a directory holding <name>.npz
        again = load_dataset("digits", source)
        for field in ("train_images", "train_labels", "test_images", "test_labels"):
            np.testing.assert_array_equal(getattr(again, field), getattr(original, field))
        assert again.train_labels.dtype == np.int64
        assert (again.name, again.num_classes) == ("digits", 10)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    # rewriting the same content gives the same content checksum
    assert write_canonical(read_canonical(path), tmp_path / "again.npz") == checksum


def test_canonical_prefers_prepared_file_over_raw(tmp_path):
    write_mnist(tmp_path)
    small = synthetic((1, 28, 28), 3, seed=9)
    from datafiles.dataset import make_dataset

    renamed = make_dataset(
        "mnist", 10, small.train_images, small.train_labels, small.test_images, small.test_labels
    )
    write_canonical(renamed, tmp_path / "mnist.npz")
    assert load_dataset("mnist", tmp_path).train_size == 3


def _rewrite_array(path: Path, key: str, change) -> None:
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays[key] = change(arrays[key].copy())
    np.savez_compressed(path, **arrays)


def test_canonical_detects_changed_content(tmp_path):
    path = tmp_path / "digits.npz"
    write_canonical(load_dataset("digits"), path)

    def flip(images):
        images[5, 0, 3, 3] ^= 1
        return images

    _rewrite_array(path, "train_images", flip)
    with pytest.raises(
        UsageError, match=r"digits\.npz: content sha256 [0-9a-f]{64} does not match"
    ):
        read_canonical(path)


def test_canonical_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "digits.npz"
    write_canonical(load_dataset("digits"), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UsageError, match=r"digits\.npz: "):
        read_canonical(path)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(UsageError, match=r"foreign\.npz: no readable 'meta' record"):
        read_canonical(foreign)
    with pytest.raises(UsageError, match=r"not found"):
        read_canonical(tmp_path / "absent.npz")


def test_canonical_file_of_another_data_set(tmp_path):
    write_canonical(load_dataset("digits"), tmp_path / "d.npz")
    with pytest.raises(UsageError, match=r"d\.npz: holds data set 'digits', not 'mnist'"):
        load_dataset("mnist", tmp_path / "d.npz")


def test_canonical_meta_is_json_not_pickle(tmp_path):
    path = tmp_path / "digits.npz"
    write_canonical(load_dataset("digits"), path)
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
    assert names == sorted(
        ["meta.npy", "train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"]
    )
    meta = read_meta(path)
    assert meta["name"] == "digits" and meta["splits"] == ["train", "test"]
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files if key != "meta"}
    assert content_sha256("digits", 10, arrays) == meta["content_sha256"]
    assert json.loads(str(np.load(path)["meta"]))["version"] == 1


def test_data_package_does_not_import_torch():
    code = (
        "import sys, datafiles, datafiles.canonical; "
        "datafiles.load_dataset('digits'); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- optional download path


def test_download_checks_the_digest_before_renaming(tmp_path):
    from datafiles.download import Source, _fetch

    served = tmp_path / "served.bin"
    served.write_bytes(b"some bytes")
    good = Source(served.as_uri(), "got.bin", "sha256", hashlib.sha256(b"some bytes").hexdigest())
    target = tmp_path / "out"
    target.mkdir()
    assert _fetch(good, target, 5).read_bytes() == b"some bytes"
    bad = Source(served.as_uri(), "bad.bin", "md5", "0" * 32)
    with pytest.raises(UsageError, match=r"served\.bin: md5 [0-9a-f]{32} does not match"):
        _fetch(bad, target, 5)
    assert sorted(p.name for p in target.iterdir()) == ["got.bin"]  # nothing half-written


def test_download_extracts_only_the_cifar_batches(tmp_path):
    import tarfile

    from datafiles.download import _extract_cifar

    source = tmp_path / "src" / "cifar-10-batches-bin"
    batches = write_cifar(source, records=2)
    (source / "readme.html").write_text("not extracted")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-bin")
    out = tmp_path / "out"
    out.mkdir()
    _extract_cifar(archive, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(batches)
    np.testing.assert_array_equal(
        load_dataset("cifar10", out).test_images, batches["test_batch.bin"][0]
    )


def test_download_unknown_name():
    from datafiles.download import download

    with pytest.raises(
        UsageError,
        match=r"unknown downloadable dataset 'digits'; choose one of: cifar10, mnist, svhn",
    ):
        download("digits", "/tmp/never-used")
