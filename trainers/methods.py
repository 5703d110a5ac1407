"""Training recipes: which method, which low-memory techniques, which optimizer.

A recipe is the one description every part of the engine reads (layers, optimizer,
memory model, measurement), so that any two methods can be put side by side.
Each low-memory technique of Wang et al. is its own switch, so that its share of
the memory, time and accuracy can be measured (ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from contract.errors import UsageError, unknown_choice
from contract.vocabulary import (
    LOWMEM_DEFAULT_VARIANTS,
    LOWMEM_TECHNIQUES,
    LOWMEM_VARIANTS,
    OPTIMIZERS,
    default_optimizer,
)
from contract.vocabulary import TRAINING_METHODS as METHODS

# Bop's adaptivity rate and threshold: Larq's defaults (larq.optimizers.Bop), which are also
# Helwegen et al.'s CIFAR-10 settings (the paper then decays gamma x0.1 every 100 epochs;
# `trainers.train.TrainConfig.gamma_decay` gives such schedules).
BOP_DEFAULT_GAMMA = 1e-4
BOP_DEFAULT_TAU = 1e-8


@dataclass(frozen=True)
class LowMemSwitches:
    """One flag per row of the lowmem table in docs/methods.md (all off = standard).

    The fields are `contract.vocabulary.LOWMEM_SWITCHES`, in that order (a test holds it).
    """

    binary_inputs: bool = False  # keep sgn(input) packed for dW; first layer keeps its input
    bn_sign_trick: bool = False  # batch norm keeps sgn(y) bit-packed + per-channel 16-bit stats
    # (real-valued conv -> batch norm stacks, ResNetE-18's stem and shortcuts: z at 16 bits)
    packed_masks: bool = False  # STE masks kept as packed bits, not float tensors
    fp16_grads: bool = False  # activation gradients flow as 16-bit (bfloat16) tensors
    po2_grads: bool = False  # activation gradients rounded to powers of two (int8 exponent + sign)
    binary_dw: bool = False  # weight gradient kept as 1 bit: sgn(dW) / sqrt(N)
    fp16_state: bool = False  # latent weights and optimizer moments stored as float16
    # Wang et al.'s code's numerics (docs/methods.md, "Variants"), each needing its technique:
    wang_bn_trick: bool = False  # keep sgn(x_hat) and mean|x_hat| (beta outside), no centring
    wang_po2: bool = False  # round dZ (feeds dX and dW) in, clamping, not dY
    wang_fp16: bool = False  # activation gradients float16 (products float32), not bfloat16

    def __post_init__(self) -> None:
        for variant, technique in LOWMEM_VARIANTS.items():
            if getattr(self, variant) and not getattr(self, technique):
                raise UsageError(f"lowmem switch {variant!r} is a variant of {technique!r}, "
                                 f"which is off: enable {technique!r} too")

    @classmethod
    def lowmem(cls) -> LowMemSwitches:
        """The `lowmem` method: every technique on, the variants the ablation chose."""
        return cls(**{name: True for name in (*LOWMEM_TECHNIQUES, *LOWMEM_DEFAULT_VARIANTS)})

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in self.names() if getattr(self, name))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in self.names())

    def with_changes(self, enable=(), disable=()) -> LowMemSwitches:
        """Switches with these turned on and off; turning a technique off turns its variant
        off too (unless the variant is asked for, which is refused)."""
        known = set(self.names())
        for name in (*enable, *disable):
            if name not in known:
                raise unknown_choice("lowmem switch", name, known)
        values = {name: True for name in enable} | {name: False for name in disable}
        for variant, technique in LOWMEM_VARIANTS.items():
            if not values.get(technique, True) and variant not in enable:
                values[variant] = False
        return replace(self, **values)


@dataclass(frozen=True)
class Recipe:
    """What to train with: method name, low-memory switches, optimizer and its settings."""

    method: str
    switches: LowMemSwitches
    optimizer: str
    lr: float = 1e-3
    momentum_format: str | None = None  # Bop low-bit momentum: "E,M[,bias]", "auto" or None (fp32)
    bop_gamma: float = BOP_DEFAULT_GAMMA  # Bop's adaptivity rate (the first epoch's if scheduled)
    bop_tau: float = BOP_DEFAULT_TAU  # Bop's flip threshold


def make_recipe(
    method: str,
    optimizer: str | None = None,
    enable: tuple[str, ...] = (),
    disable: tuple[str, ...] = (),
    lr: float = 1e-3,
    momentum_format: str | None = None,
    bop_gamma: float = BOP_DEFAULT_GAMMA,
    bop_tau: float = BOP_DEFAULT_TAU,
) -> Recipe:
    """Build a recipe from CLI-level names, refusing unknown ones with the choices."""
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    base = LowMemSwitches.lowmem() if method == "lowmem" else LowMemSwitches()
    optimizer = optimizer or default_optimizer(method)
    if optimizer not in OPTIMIZERS:
        raise unknown_choice("optimizer", optimizer, OPTIMIZERS)
    if lr <= 0:
        raise UsageError(f"learning rate must be positive, got {lr}")
    if momentum_format is not None and optimizer != "bop":
        raise UsageError(f"--momentum-format {momentum_format!r} needs the bop optimizer")
    if not 0.0 < bop_gamma <= 1.0:
        raise UsageError(f"--gamma must be in (0, 1], got {bop_gamma}")
    if not 0.0 <= bop_tau < float("inf"):
        raise UsageError(f"--tau must be finite and >= 0, got {bop_tau}")
    return Recipe(
        method=method,
        switches=base.with_changes(enable=enable, disable=disable),
        optimizer=optimizer,
        lr=lr,
        momentum_format=momentum_format,
        bop_gamma=float(bop_gamma),
        bop_tau=float(bop_tau),
    )
