"""The lost-update metric of Yayla & Chen: momentum updates the storage format swallowed.

An update is *lost* when `gamma * (g - m)` is non-zero but the stored momentum does not change,
because the step is below half a unit in the last place of `m` (or `m` is saturated). Counted per
binary-weight tensor at every Bop step, so that the training loop can log it per layer and in total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def count_lost_updates(
    old: torch.Tensor, step: torch.Tensor, new: torch.Tensor
) -> tuple[int, int]:
    """(attempted, lost): non-zero steps, and those among them whose stored value did not change."""
    attempted = step != 0
    lost = attempted & (new == old)
    return int(attempted.sum()), int(lost.sum())


@dataclass(frozen=True)
class LayerLostUpdates:
    """One binary-weight tensor's momentum updates at one step."""

    name: str
    numel: int
    attempted: int  # momentum values with a non-zero update
    lost: int  # ... whose stored value nevertheless stayed the same
    flips: int  # binary weights flipped at this step

    @property
    def lost_fraction(self) -> float:
        """Lost among attempted updates (0 when nothing was attempted)."""
        return self.lost / self.attempted if self.attempted else 0.0


@dataclass(frozen=True)
class LostUpdates:
    """All binary-weight tensors of one Bop step."""

    step: int
    layers: tuple[LayerLostUpdates, ...]

    @property
    def attempted(self) -> int:
        return sum(layer.attempted for layer in self.layers)

    @property
    def lost(self) -> int:
        return sum(layer.lost for layer in self.layers)

    @property
    def flips(self) -> int:
        return sum(layer.flips for layer in self.layers)

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.attempted if self.attempted else 0.0

    def as_record(self) -> dict:
        """Flat JSON-ready record for per-step logging."""
        return {
            "step": self.step,
            "lost_updates": self.lost,
            "attempted_updates": self.attempted,
            "lost_fraction": self.lost_fraction,
            "flips": self.flips,
            "layers": [
                {
                    "name": layer.name,
                    "numel": layer.numel,
                    "lost_updates": layer.lost,
                    "attempted_updates": layer.attempted,
                    "lost_fraction": layer.lost_fraction,
                    "flips": layer.flips,
                }
                for layer in self.layers
            ],
        }
