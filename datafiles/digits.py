"""The scikit-learn digits (8x8, 1797 samples) shipped inside this package; see README.md."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset, make_dataset

DIGITS_FILE = Path(__file__).with_name("digits.csv.gz")
TRAIN_ROWS = 1437  # first 80 % train, last 360 rows test: a fixed split
SAMPLES, PIXELS, MAX_VALUE = 1797, 64, 16


def load_digits(path: Path = DIGITS_FILE) -> Dataset:
    """1x8x8 uint8 images (0..16 scaled to 0..255), labels 0..9."""
    try:
        with gzip.open(path, "rt") as stream:
            table = np.loadtxt(stream, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the digits CSV ({exc})") from None
    if table.shape != (SAMPLES, PIXELS + 1):
        raise UsageError(f"{path}: table shape {table.shape}, expected ({SAMPLES}, {PIXELS + 1})")
    pixels, labels = table[:, :PIXELS], table[:, PIXELS]
    if pixels.min() < 0 or pixels.max() > MAX_VALUE:
        raise UsageError(f"{path}: pixel values {pixels.min()}..{pixels.max()}, expected 0..16")
    images = np.round(pixels * (255 / MAX_VALUE)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return make_dataset(
        "digits",
        10,
        images[:TRAIN_ROWS],
        labels[:TRAIN_ROWS],
        images[TRAIN_ROWS:],
        labels[TRAIN_ROWS:],
    )
