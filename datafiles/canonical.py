"""The prepared file of a data set: one `.npz` per data set, checked on every read.

The host prepares it once from the raw sources (`harness data prepare`), pushes it to each
device and reuses it by checksum; the device agent reads only this format. Numpy only — the
host imports this module without torch. Layout (a zip-compressed npz, no pickles):

- `train_images`, `test_images`: uint8 (N, C, H, W)
- `train_labels`, `test_labels`: uint8 (int64 when there are more than 256 classes)
- `meta`: one JSON string: format, version, name, num_classes, splits, content_sha256

`content_sha256` is a SHA-256 over the name, the class count and every array (its key,
dtype, shape and bytes), so it identifies the content whatever the zip container holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset, make_dataset

FORMAT, VERSION = "bnn-harness-dataset", 1
SPLITS = ("train", "test")
SUFFIX = ".npz"
ARRAY_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def canonical_filename(name: str) -> str:
    """The file name a prepared data set goes by inside a data directory."""
    return f"{name}{SUFFIX}"


def _stored_arrays(dataset: Dataset) -> dict[str, np.ndarray]:
    label_type = np.uint8 if dataset.num_classes <= 256 else np.int64
    return {
        "train_images": dataset.train_images,
        "train_labels": dataset.train_labels.astype(label_type),
        "test_images": dataset.test_images,
        "test_labels": dataset.test_labels.astype(label_type),
    }


def content_sha256(name: str, num_classes: int, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over name, classes and each array's key, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps([name, int(num_classes)]).encode())
    for key in ARRAY_KEYS:
        array = np.ascontiguousarray(arrays[key])
        digest.update(json.dumps([key, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.data)
    return digest.hexdigest()


def write_canonical(dataset: Dataset, path: str | Path) -> str:
    """Write `dataset` to `path` atomically (temp file + rename); return its content SHA-256."""
    path = Path(path)
    arrays = _stored_arrays(dataset)
    checksum = content_sha256(dataset.name, dataset.num_classes, arrays)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": dataset.name,
        "num_classes": dataset.num_classes,
        "splits": list(SPLITS),
        "content_sha256": checksum,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            np.savez_compressed(stream, meta=np.array(json.dumps(meta)), **arrays)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return checksum


def read_meta(path: str | Path) -> dict:
    """Only the metadata of a prepared file (cheap: does not read the arrays)."""
    with _open(Path(path)) as archive:
        return _meta(archive, Path(path))


def _open(path: Path):
    if not path.is_file():
        raise UsageError(f"prepared data file {path} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: not a prepared data file ({exc})") from None


def _meta(archive, path: Path) -> dict:
    try:
        meta = json.loads(str(archive["meta"]))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{path}: no readable 'meta' record ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UsageError(f"{path}: meta format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise UsageError(f"{path}: format version {meta.get('version')!r}, expected {VERSION}")
    for key in ("name", "num_classes", "content_sha256"):
        if key not in meta:
            raise UsageError(f"{path}: meta has no field {key!r}")
    return meta


def read_canonical(path: str | Path) -> Dataset:
    """Read and verify a prepared file; a changed byte of content is a UsageError."""
    path = Path(path)
    with _open(path) as archive:
        meta = _meta(archive, path)
        arrays = {}
        for key in ARRAY_KEYS:
            try:
                arrays[key] = archive[key]
            except KeyError:
                raise UsageError(f"{path}: array {key!r} missing") from None
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise UsageError(f"{path}: array {key!r} unreadable ({exc})") from None
    actual = content_sha256(meta["name"], meta["num_classes"], arrays)
    if actual != meta["content_sha256"]:
        raise UsageError(
            f"{path}: content sha256 {actual} does not match {meta['content_sha256']} stored in it"
        )
    return make_dataset(meta["name"], meta["num_classes"], *(arrays[key] for key in ARRAY_KEYS))
