"""Step schedules for Bop's gamma and tau (Helwegen et al. decay gamma x0.1 every 100
epochs on CIFAR-10): the value of an epoch is base * factor ** ((epoch - 1) // every)."""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import UsageError


@dataclass(frozen=True)
class StepSchedule:
    """Multiply a hyper-parameter by `factor` every `every_epochs` epochs."""

    factor: float
    every_epochs: int

    def __post_init__(self) -> None:
        if not 0.0 < self.factor <= 1.0:
            raise UsageError(f"a schedule's decay factor must be in (0, 1], got {self.factor}")
        if self.every_epochs < 1:
            raise UsageError(f"a schedule's period must be >= 1 epoch, got {self.every_epochs}")

    def value(self, base: float, epoch: int) -> float:
        """The value during `epoch` (1-based)."""
        return base * self.factor ** ((epoch - 1) // self.every_epochs)


def schedule_from_flags(name: str, factor: float | None, every: int | None) -> StepSchedule | None:
    """`--NAME-decay F --NAME-decay-every N` as a schedule (both or neither)."""
    if factor is None and every is None:
        return None
    if factor is None or every is None:
        given = f"--{name}-decay" if every is None else f"--{name}-decay-every"
        raise UsageError(f"--{name}-decay and --{name}-decay-every go together (got only {given})")
    return StepSchedule(factor, every)
