"""The one in-memory record every data set becomes, and the scaling to model input.

Numpy only (no torch), so the host can build, check and write data sets without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.errors import UsageError


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set: uint8 NCHW images and int64 labels, train and test splits."""

    name: str
    num_classes: int
    train_images: np.ndarray  # uint8, (N, C, H, W)
    train_labels: np.ndarray  # int64, (N,)
    test_images: np.ndarray  # uint8, (M, C, H, W)
    test_labels: np.ndarray  # int64, (M,)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise UsageError(
                f"data set {self.name!r}: num_classes must be >= 1, got {self.num_classes}"
            )
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise UsageError(
                    f"data set {self.name!r}: {split} images must be uint8 NCHW, "
                    f"got {images.dtype} with shape {images.shape}"
                )
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise UsageError(
                    f"data set {self.name!r}: {split} has {images.shape[0]} images "
                    f"but labels of shape {labels.shape}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise UsageError(
                    f"data set {self.name!r}: {split} label {int(labels.max())} outside "
                    f"0..{self.num_classes - 1}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise UsageError(
                f"data set {self.name!r}: train images {self.train_images.shape[1:]} and "
                f"test images {self.test_images.shape[1:]} differ in shape"
            )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """Per-sample shape (C, H, W), what `build_model` takes as `in_shape`."""
        c, h, w = self.train_images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def train_size(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_images.shape[0])


def make_dataset(
    name: str,
    num_classes: int,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Dataset:
    """Build a `Dataset`, bringing labels to int64 and arrays to C order."""
    return Dataset(
        name=name,
        num_classes=int(num_classes),
        train_images=np.ascontiguousarray(train_images),
        train_labels=np.ascontiguousarray(train_labels, dtype=np.int64),
        test_images=np.ascontiguousarray(test_images),
        test_labels=np.ascontiguousarray(test_labels, dtype=np.int64),
    )


def to_model_input(images):
    """uint8 pixels 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> +1).

    Takes a numpy array or a torch tensor and returns the same kind; torch is imported
    only when a tensor is passed, so this module stays usable on the host.
    """
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    import torch

    return images.to(torch.float32) / 127.5 - 1.0


def as_tensor(array: np.ndarray):
    """A torch tensor sharing the array's memory, without torch's warning for read-only arrays
    (the loaders hand out read-only views of their files; training never writes to them)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def synthetic(
    in_shape: tuple[int, ...],
    n: int,
    num_classes: int = 10,
    seed: int = 0,
    n_test: int | None = None,
) -> Dataset:
    """Random uint8 images of any model's input shape, for memory and speed measurement.

    Accuracy on it means nothing; the test split defaults to a tenth of `n` (at least 1).
    """
    if len(in_shape) != 3 or any(int(d) < 1 for d in in_shape):
        raise UsageError(
            f"synthetic data: input shape must be (C, H, W) >= 1, got {tuple(in_shape)}"
        )
    if n < 1:
        raise UsageError(f"synthetic data: number of samples must be >= 1, got {n}")
    if num_classes < 1:
        raise UsageError(f"synthetic data: num_classes must be >= 1, got {num_classes}")
    n_test = max(1, n // 10) if n_test is None else n_test
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in in_shape)
    return make_dataset(
        "synthetic",
        num_classes,
        rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
        rng.integers(0, num_classes, size=n),
        rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        rng.integers(0, num_classes, size=n_test),
    )
