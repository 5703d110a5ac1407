"""CIFAR-10 from its binary batches (`data_batch_1..5.bin`, `test_batch.bin`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset, make_dataset
from datafiles.files import find_file, read_bytes

RECORD_BYTES = 1 + 3 * 32 * 32  # label byte, then R, G and B planes of 32x32
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCH = "test_batch.bin"
SUBDIR = "cifar-10-batches-bin"


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch as uint8 images (N, 3, 32, 32) and labels (N,).

    The official batches hold 10000 records each; any whole number of records is accepted
    (subsets for small devices), a partial record is not.
    """
    data = read_bytes(path)
    if not data or len(data) % RECORD_BYTES:
        raise UsageError(
            f"{path}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0]
    if labels.max() > 9:
        raise UsageError(f"{path}: label {int(labels.max())} outside 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: Path) -> Dataset:
    """The six batches in `directory` or in its `cifar-10-batches-bin/` folder."""
    if not (directory / TEST_BATCH).exists() and (directory / SUBDIR).is_dir():
        directory = directory / SUBDIR
    train = [read_batch(find_file(directory, name, "cifar10")) for name in TRAIN_BATCHES]
    test_images, test_labels = read_batch(find_file(directory, TEST_BATCH, "cifar10"))
    return make_dataset(
        "cifar10",
        10,
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )
