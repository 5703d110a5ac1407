"""MNIST from its IDX files (gzipped or not), with magic, dimension and count checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset, make_dataset
from datafiles.files import find_file, read_bytes

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _header(data: bytes, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    """Check the IDX magic and size against the file length; return the dimensions."""
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UsageError(f"{path}: {len(data)} bytes is too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UsageError(f"{path}: IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise UsageError(
            f"{path}: {len(data)} bytes, expected {expected_len} for dimensions {dims}"
        )
    return dims


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 image file as uint8 (N, 1, H, W)."""
    data = read_bytes(path)
    n, h, w = _header(data, path, IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def read_idx_labels(path: Path) -> np.ndarray:
    """An IDX1 label file as uint8 (N,)."""
    data = read_bytes(path)
    _header(data, path, LABELS_MAGIC, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def load_mnist(directory: Path) -> Dataset:
    """The four MNIST IDX files in `directory`: 28x28 images and their labels.

    The official files hold 60000 train and 10000 test images; subsets are accepted as long
    as each label file matches its image file.
    """
    splits = {}
    for split, (images_name, labels_name) in FILES.items():
        images_path = find_file(directory, images_name, "mnist")
        labels_path = find_file(directory, labels_name, "mnist")
        images = read_idx_images(images_path)
        labels = read_idx_labels(labels_path)
        if images.shape[1:] != (1, 28, 28):
            raise UsageError(f"{images_path}: image size {images.shape[2:]}, expected (28, 28)")
        if labels.shape[0] != images.shape[0]:
            raise UsageError(
                f"{labels_path}: {labels.shape[0]} labels, expected {images.shape[0]} "
                f"(the images in {images_path.name})"
            )
        if labels.max() > 9:
            raise UsageError(f"{labels_path}: label {int(labels.max())} outside 0..9")
        splits[split] = (images, labels)
    return make_dataset("mnist", 10, *splits["train"], *splits["test"])
