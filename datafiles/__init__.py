"""Data set files: local files in, one `Dataset` record out (numpy only: the host prepares
data sets with it, the engine reads them with it; `as_tensor` / `to_model_input` import torch
only when called, on the device).

`load_dataset(name, data_dir)` reads the raw files of a data set (MNIST IDX, CIFAR-10 binary
batches, SVHN MAT-files, the embedded scikit-learn digits) or its prepared canonical file
(`datafiles.canonical`), which is all a device ever reads.
"""

from __future__ import annotations

from pathlib import Path

from contract import vocabulary
from contract.errors import UsageError, unknown_choice
from datafiles.canonical import canonical_filename, read_canonical, read_meta
from datafiles.cifar10 import load_cifar10
from datafiles.dataset import Dataset, as_tensor, make_dataset, synthetic, to_model_input
from datafiles.digits import load_digits
from datafiles.mnist import load_mnist
from datafiles.svhn import load_svhn

RAW_LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10, "svhn": load_svhn}
DATASETS = vocabulary.DATASETS
NEEDS_DATA_DIR = tuple(RAW_LOADERS)

__all__ = [
    "DATASETS",
    "Dataset",
    "as_tensor",
    "load_dataset",
    "make_dataset",
    "synthetic",
    "to_model_input",
]


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    synthetic_size: int = 1000,
    seed: int = 0,
) -> Dataset:
    """The data set `name` from `data_dir`.

    `data_dir` may be the directory of the raw files, a prepared canonical file, or a
    directory holding `<name>.npz` (preferred when present). `digits` needs no directory;
    `synthetic` makes `synthetic_size` random images of `in_shape` from `seed`.
    """
    if name not in DATASETS:
        raise unknown_choice("dataset", name, DATASETS)
    directory = Path(data_dir) if data_dir is not None else None
    if directory is not None and directory.is_file():
        return _read_prepared(name, directory)
    if directory is not None and (directory / canonical_filename(name)).is_file():
        return _read_prepared(name, directory / canonical_filename(name))
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return synthetic(in_shape, synthetic_size, 10, seed)
    if directory is None:
        raise UsageError(f"dataset {name!r} needs a data directory (--data-dir)")
    if not directory.is_dir():
        raise UsageError(f"dataset {name!r}: data directory {directory} not found")
    return RAW_LOADERS[name](directory)


def _read_prepared(name: str, path: Path) -> Dataset:
    stored = read_meta(path)["name"]
    if stored != name:
        raise UsageError(f"{path}: holds data set {stored!r}, not {name!r}")
    return read_canonical(path)
