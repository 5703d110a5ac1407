"""Class-incremental scenarios: a data set split into experiences by class.

Numpy only, so a scenario can be built and checked without torch. The class order is
fixed by the seed (or given), so every run and every device sees the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contract.errors import UsageError
from datafiles.dataset import Dataset


@dataclass(frozen=True)
class Experience:
    """One step of the stream: its classes and the indices of their training samples."""

    index: int
    classes: tuple[int, ...]
    train_indices: np.ndarray  # into Dataset.train_*, shuffled with the scenario's seed


@dataclass(frozen=True)
class Scenario:
    """A data set cut into experiences of disjoint classes, in a fixed order."""

    dataset: Dataset
    class_order: tuple[int, ...]
    experiences: tuple[Experience, ...]

    def seen_classes(self, upto: int) -> tuple[int, ...]:
        """All classes of experiences 0..upto (inclusive), in stream order."""
        return tuple(c for exp in self.experiences[: upto + 1] for c in exp.classes)

    def test_indices(self, classes: Sequence[int]) -> np.ndarray:
        """Indices of the test samples whose label is one of `classes`."""
        return np.flatnonzero(np.isin(self.dataset.test_labels, np.asarray(classes)))


def class_incremental(
    dataset: Dataset,
    experiences: int,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> Scenario:
    """Split `dataset` into `experiences` groups of classes (sizes differ by at most one).

    Without `class_order` the classes present in the training split are permuted with
    `seed`; with it, the given order is used as is (it must list each class once).
    """
    present = np.unique(dataset.train_labels)
    if experiences < 1:
        raise UsageError(f"continual: --experiences must be >= 1, got {experiences}")
    if experiences > present.size:
        raise UsageError(
            f"continual: --experiences {experiences} is more than the {present.size} classes "
            f"of data set {dataset.name!r}"
        )
    rng = np.random.default_rng(seed)
    if class_order is None:
        order = tuple(int(c) for c in rng.permutation(present))
    else:
        order = tuple(int(c) for c in class_order)
        if sorted(order) != sorted(int(c) for c in present):
            raise UsageError(
                f"continual: class order {list(order)} must list each class of data set "
                f"{dataset.name!r} ({present.tolist()}) exactly once"
            )
    groups = np.array_split(np.asarray(order), experiences)
    stream = []
    for index, group in enumerate(groups):
        indices = np.flatnonzero(np.isin(dataset.train_labels, group))
        stream.append(
            Experience(
                index=index,
                classes=tuple(int(c) for c in group),
                train_indices=rng.permutation(indices),
            )
        )
    return Scenario(dataset=dataset, class_order=order, experiences=tuple(stream))
