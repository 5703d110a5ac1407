"""SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`), read with our own MAT-file reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset, make_dataset
from datafiles.files import verify_checksum
from datafiles.matfile import read_mat5

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and labels 0..9 (SVHN writes digit 0 as label 10)."""
    verify_checksum(path)
    variables = read_mat5(path, names=("X", "y"))
    for key in ("X", "y"):
        if key not in variables:
            raise UsageError(f"{path}: variable {key!r} missing (found {sorted(variables)})")
    x, y = variables["X"], variables["y"].reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UsageError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, N)")
    if x.shape[3] != y.shape[0]:
        raise UsageError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    if x.dtype != np.uint8:
        raise UsageError(f"{path}: X has type {x.dtype}, expected uint8")
    if y.size and (y.min() < 1 or y.max() > 10 or np.any(y != np.round(y))):
        raise UsageError(f"{path}: labels must be whole numbers 1..10, found {y.min()}..{y.max()}")
    labels = y.astype(np.int64) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def load_svhn(directory: Path) -> Dataset:
    splits = {}
    for split, name in FILES.items():
        path = directory / name
        if not path.is_file():
            raise UsageError(f"svhn: file {path} not found")
        splits[split] = read_split(path)
    return make_dataset("svhn", 10, *splits["train"], *splits["test"])
