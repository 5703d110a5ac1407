"""Class-balanced latent-replay buffer (Pellegrini et al.; 1-bit latents after Vorabbi et al.).

Latents are the sign outputs of the frozen lower blocks, so every value is +-1 and one
bit holds it. In `packed` mode the buffer really keeps them as packed bits
(`trainers.bits`, 8 per byte, each entry padded to a whole byte); `fp32` mode keeps
float32 tensors and is the ablation. Entries are grouped by class, so no per-entry
label is stored: the class of an entry is the group it sits in.
"""

from __future__ import annotations

import torch

from contract.errors import UsageError, unknown_choice
from trainers.bits import PackedBits, pack_bits, unpack_signs

STORAGES = ("packed", "fp32")


class LatentReplayBuffer:
    """At most `capacity` latents, `capacity // classes seen` per class, chosen at random."""

    def __init__(self, capacity: int, storage: str = "packed", min_classes: int = 1,
                 seed: int = 0) -> None:
        if storage not in STORAGES:
            raise unknown_choice("replay storage", storage, STORAGES)
        if capacity < min_classes:
            raise UsageError(
                f"continual: --replay-size {capacity} is below the {min_classes} classes of the "
                f"stream (the buffer needs at least one entry per class)"
            )
        self.capacity = capacity
        self.storage = storage
        self._groups: dict[int, PackedBits | torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return sum(self._rows(g) for g in self._groups.values())

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(self._groups)

    def quota(self, num_classes: int) -> int:
        """Entries per class when the buffer holds `num_classes` classes."""
        return self.capacity // max(1, num_classes)

    def count(self, c: int) -> int:
        return self._rows(self._groups[c]) if c in self._groups else 0

    @property
    def nbytes(self) -> int:
        """Measured bytes of the stored latents (the tensors the buffer holds)."""
        return sum(
            g.nbytes if isinstance(g, PackedBits) else g.numel() * g.element_size()
            for g in self._groups.values()
        )

    def add(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        """Add samples (rows of `latents`, +-1 values) and rebalance every class to the quota.

        Each class keeps a uniformly random subset of all its samples offered so far.
        """
        latents = latents.detach().to(torch.float32)
        if latents.shape[0] != labels.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {labels.shape[0]} labels")
        if not torch.all(latents.abs() == 1):
            raise ValueError("latent replay keeps sign outputs: every latent value must be +-1")
        new_classes = [int(c) for c in torch.unique(labels).tolist()]
        quota = self.quota(len(set(self._groups) | set(new_classes)))
        for c in new_classes:
            offered = latents[labels == c]
            if c in self._groups:
                offered = torch.cat([self._unpack(self._groups[c]), offered])
            self._groups[c] = self._store(self._subset(offered, quota))
        for c in self._groups:
            if c not in new_classes and self.count(c) > quota:
                self._groups[c] = self._store(self._unpack(self._groups[c])[:quota])

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries at flat `indices` (0..len-1, classes in insertion order), in that order,
        as fp32 +-1 latents and int64 labels."""
        classes = list(self._groups)
        counts = torch.tensor([self.count(c) for c in classes])
        ends = torch.cumsum(counts, 0)
        group = torch.bucketize(indices, ends, right=True)
        latents = torch.empty(indices.numel(), *self._feature_shape())
        labels = torch.empty(indices.numel(), dtype=torch.int64)
        for g in torch.unique(group).tolist():
            where = group == g
            rows = indices[where] - (ends[g] - counts[g])
            latents[where] = self._unpack(self._select(self._groups[classes[g]], rows))
            labels[where] = classes[g]
        return latents, labels

    def _feature_shape(self) -> tuple[int, ...]:
        return tuple(next(iter(self._groups.values())).shape[1:])

    def permutation(self) -> torch.Tensor:
        """A random order of all entries (one pass over the buffer per epoch)."""
        return torch.randperm(len(self), generator=self._generator)

    def _subset(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        if rows.shape[0] <= n:
            return rows
        keep = torch.randperm(rows.shape[0], generator=self._generator)[:n]
        return rows[keep]

    def _store(self, latents: torch.Tensor) -> PackedBits | torch.Tensor:
        if self.storage == "packed":
            return pack_bits(latents > 0)
        return latents.clone()

    @staticmethod
    def _unpack(group: PackedBits | torch.Tensor) -> torch.Tensor:
        return unpack_signs(group) if isinstance(group, PackedBits) else group

    @staticmethod
    def _select(group: PackedBits | torch.Tensor, rows: torch.Tensor) -> PackedBits | torch.Tensor:
        if isinstance(group, PackedBits):
            return PackedBits(group.data[rows], torch.Size([rows.numel(), *group.shape[1:]]),
                              group.scale)
        return group[rows]

    @staticmethod
    def _rows(group: PackedBits | torch.Tensor) -> int:
        return int(group.shape[0])

