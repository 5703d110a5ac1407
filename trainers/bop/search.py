"""The encoding search of Yayla & Chen: the cheapest momentum format that loses few updates.

A run of the real model on real batches (Bop, float32 momentum) records the gradients of a
random sample of binary weights in two windows: the first steps from m = 0 (the warm-up),
and, after `settle_steps` more steps, a window of the steady state, starting from the
momentum the float32 run really reached there. Each candidate format replays both windows;
it is eligible when it represents tau and loses at most `tolerance` of the attempted
updates *in the steady state*, and the narrowest eligible one is chosen. The warm-up's
lost fraction is reported beside it: it flatters narrow formats, because from m = 0 every
step is large beside m, while late in training |m| is large and the relative steps
gamma (g - m) / m are tiny (a format judged on the warm-up alone can lose nearly every
steady-state update).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from contract.errors import UsageError
from trainers.bits import PackedBits, unpack_signs
from trainers.bop.build import build_bop_optimizer
from trainers.bop.fpformat import FloatFormat, quantize_many
from trainers.bop.optimizer import DEFAULT_GAMMA, DEFAULT_TAU
from trainers.engine import train_step
from trainers.layers import binary_layers, is_packed, sign, weight_shape, weight_values
from trainers.methods import Recipe

DEFAULT_WIDTHS = tuple(range(4, 17))
DEFAULT_TOLERANCE = 0.25
DEFAULT_WARMUP_STEPS = 20
DEFAULT_SETTLE_STEPS = 300  # training steps between the two windows (half an MNIST epoch)
DEFAULT_SAMPLE_SIZE = 1 << 14
CANDIDATES_PER_PASS = 64  # rows replayed together (bounds the float64 temporaries)
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class TraceWindow:
    """Gradients of the sampled binary weights over consecutive steps, and their state at
    the window's start."""

    grads: torch.Tensor  # (steps, samples) float32
    weights: torch.Tensor  # (samples,) the sampled weights' +-1 at the start
    momentum: torch.Tensor  # (samples,) float32 momentum at the start (0 for the warm-up)

    @classmethod
    def from_zero(cls, grads: torch.Tensor, weights: torch.Tensor) -> TraceWindow:
        return cls(grads, weights, torch.zeros_like(weights))


@dataclass(frozen=True)
class GradientTrace:
    """The warm-up window (from m = 0) and the steady-state window of one float32 run."""

    warmup: TraceWindow
    steady: TraceWindow
    layer_numels: tuple[int, ...]  # sizes of all binary-weight tensors (for the memory figures)
    settle_steps: int = 0  # steps trained between the two windows


@dataclass(frozen=True)
class CandidateResult:
    """One momentum format replayed on the trace."""

    spec: str  # "E,M,bias", or "fp32" for the float32 reference
    bits: int
    represents_tau: bool
    attempted: int
    lost: int
    lost_fraction_start: float
    lost_fraction_steady: float
    flips: int
    momentum_bytes: int
    eligible: bool

    @property
    def lost_fraction(self) -> float:
        """The steady state's lost fraction, which eligibility is judged on."""
        return self.lost_fraction_steady


@dataclass(frozen=True)
class SearchReport:
    gamma: float
    tau: float
    tolerance: float
    warmup_steps: int
    settle_steps: int
    steady_steps: int
    sampled_weights: int
    binary_weights: int
    reference: CandidateResult
    candidates: tuple[CandidateResult, ...]
    choice: CandidateResult | None

    @property
    def memory_saved_bytes(self) -> int:
        return self.reference.momentum_bytes - self.choice.momentum_bytes if self.choice else 0

    @property
    def memory_ratio(self) -> float:
        return self.reference.momentum_bytes / self.choice.momentum_bytes if self.choice else 1.0

    def as_record(self) -> dict:
        def row(result: CandidateResult) -> dict:
            return asdict(result) | {"lost_fraction": result.lost_fraction}

        return {
            "gamma": self.gamma,
            "tau": self.tau,
            "tolerance": self.tolerance,
            "warmup_steps": self.warmup_steps,
            "settle_steps": self.settle_steps,
            "steady_steps": self.steady_steps,
            "judged_on": "steady",
            "sampled_weights": self.sampled_weights,
            "binary_weights": self.binary_weights,
            "reference": row(self.reference),
            "candidates": [row(c) for c in self.candidates],
            "choice": row(self.choice) if self.choice else None,
            "momentum_bytes_fp32": self.reference.momentum_bytes,
            "momentum_bytes_choice": self.choice.momentum_bytes if self.choice else None,
            "memory_saved_bytes": self.memory_saved_bytes,
            "memory_ratio": self.memory_ratio,
        }


def flat_gradient(param: torch.Tensor) -> torch.Tensor | None:
    packed = getattr(param, "packed_grad", None)
    if param.grad is not None:
        return param.grad.reshape(-1).float()
    if isinstance(packed, PackedBits):
        return unpack_signs(packed).reshape(-1)
    return None


def record_gradient_trace(
    model: nn.Module,
    recipe: Recipe,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = DEFAULT_WARMUP_STEPS,
    settle_steps: int = DEFAULT_SETTLE_STEPS,
    gamma: float = DEFAULT_GAMMA,
    tau: float = DEFAULT_TAU,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
) -> GradientTrace:
    """Train a copy of `model` with float32-momentum Bop for `steps`, `settle_steps`, then
    `steps` more batches, sampling gradients in the first and the last window."""
    if steps < 1:
        raise UsageError(f"warm-up steps must be at least 1, got {steps}")
    if settle_steps < 0:
        raise UsageError(f"settle steps must be >= 0, got {settle_steps}")
    work = copy.deepcopy(model)
    optimizer = build_bop_optimizer(
        work, replace(recipe, momentum_format=None), gamma=gamma, tau=tau
    )
    bop = optimizer.optimizers["bop"]
    layers = [layer for layer in binary_layers(work)
              if layer.weight.requires_grad or is_packed(layer.weight)]
    params = [layer.weight for layer in layers]
    sizes = [weight_shape(layer).numel() for layer in layers]  # packed weights hold bits
    total = sum(sizes)
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for size in sizes:
        count = min(size, max(16, round(sample_size * size / total)))
        picks.append(torch.randperm(size, generator=generator)[:count].sort().values)

    def sampled_weights() -> torch.Tensor:
        return torch.cat([sign(weight_values(layer).detach().reshape(-1)[i].float())
                          for layer, i in zip(layers, picks)])

    def sampled_momentum() -> torch.Tensor:
        return torch.cat([bop.momentum(p).reshape(-1)[i] for p, i in zip(params, picks)])

    steady_start = steps + settle_steps
    windows: dict[str, list[torch.Tensor]] = {"warmup": [], "steady": []}
    starts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    position = {"step": 0}

    def record(*_args) -> None:
        step = position["step"]
        name = "warmup" if step < steps else "steady" if step >= steady_start else None
        if name is None:
            return
        if not windows[name]:
            starts[name] = (sampled_weights(), sampled_momentum())
        grads = [flat_gradient(p) for p in params]
        windows[name].append(torch.cat([
            g[i] if g is not None else torch.zeros(len(i)) for g, i in zip(grads, picks)
        ]))

    handle = optimizer.register_step_pre_hook(record)
    try:
        for x, y in batches:
            if position["step"] >= steady_start + steps:
                break
            train_step(work, optimizer, x, y)
            position["step"] += 1
    finally:
        handle.remove()
    if len(windows["steady"]) < steps:
        raise UsageError(
            f"the encoding search got {position['step']} batches; it needs {steady_start + steps}"
            f" ({steps} warm-up, {settle_steps} settling, {steps} steady-state steps)"
        )
    made = {name: TraceWindow(torch.stack(rows), *starts[name]) for name, rows in windows.items()}
    return GradientTrace(made["warmup"], made["steady"], tuple(sizes), settle_steps)


def replay(
    window: TraceWindow, formats: list[FloatFormat | None], gamma: float, tau: float,
) -> list[tuple[int, int, int]]:
    """(attempted, lost, flips) of Bop over the window from its start state, per format
    (the start momentum first rounded into the format).

    All formats replay at once, one row each (None = float32).
    """
    low_bit = [f for f in formats if f is not None]

    def store(values: torch.Tensor) -> torch.Tensor:
        rows = [None if f is None else i for i, f in enumerate(formats)]
        out = values.clone()
        if low_bit:
            index = torch.tensor([i for i in rows if i is not None])
            out[index] = quantize_many(values[index], low_bit)
        return out

    count = len(formats)
    momentum = store(window.momentum.expand(count, -1))
    weight = window.weights.expand(count, -1).clone()
    attempted = torch.zeros(count, dtype=torch.int64)
    lost = torch.zeros_like(attempted)
    flips = torch.zeros_like(attempted)
    for grad in window.grads:
        step = gamma * (grad - momentum)
        stored = store(momentum + step)
        nonzero = step != 0
        attempted += nonzero.sum(1)
        lost += (nonzero & (stored == momentum)).sum(1)
        flipped = weight * stored > tau
        flips += flipped.sum(1)
        weight = torch.where(flipped, -weight, weight)
        momentum = stored
    return list(zip(attempted.tolist(), lost.tolist(), flips.tolist()))


def evaluate_candidates(
    trace: GradientTrace, formats: list[FloatFormat | None], gamma: float, tau: float,
    tolerance: float,
) -> list[CandidateResult]:
    """Replay each format over the warm-up and the steady-state window; judge eligibility
    on the steady state."""
    results = []
    for first in range(0, len(formats), CANDIDATES_PER_PASS):
        batch = formats[first:first + CANDIDATES_PER_PASS]
        warmup = replay(trace.warmup, batch, gamma, tau)
        steady = replay(trace.steady, batch, gamma, tau)
        for fmt, (attempted, lost, _), (steady_attempted, steady_lost, flips) in zip(
            batch, warmup, steady
        ):
            steady_fraction = steady_lost / steady_attempted if steady_attempted else 0.0
            represents = fmt.represents(tau) if fmt and tau > 0 else True
            results.append(CandidateResult(
                spec=fmt.spec if fmt else "fp32",
                bits=fmt.bits if fmt else 32,
                represents_tau=represents,
                attempted=steady_attempted,
                lost=steady_lost,
                lost_fraction_start=lost / attempted if attempted else 0.0,
                lost_fraction_steady=steady_fraction,
                flips=flips,
                momentum_bytes=sum(
                    fmt.storage_bytes(n) if fmt else FLOAT32_BYTES * n for n in trace.layer_numels
                ),
                eligible=represents and steady_fraction <= tolerance,
            ))
    return results


def candidate_formats(max_abs: float, widths: Sequence[int] = DEFAULT_WIDTHS) -> list[FloatFormat]:
    """Every (E, M) of each total width, with biases that place the range at the gradients' top.

    For each (E, M): the bias whose largest finite value just covers `max_abs` (momentum never
    exceeds the largest gradient), that bias +1 (one binade finer, the largest values saturate),
    -2 (headroom), and the IEEE bias.
    """
    top = math.floor(math.log2(max_abs)) if max_abs > 0 else 0
    formats = []
    for width in widths:
        if not 3 <= width <= 32:
            raise UsageError(f"candidate widths must be in 3..32 bits, got {width}")
        for e_bits in range(2, min(8, width - 1) + 1):
            m_bits = width - 1 - e_bits
            if m_bits > 23:
                continue
            fit = 2**e_bits - 2 - top
            if (2.0 - 2.0**-m_bits) * 2.0**top < max_abs:
                fit -= 1  # one more binade so that the largest finite value covers max_abs
            for bias in dict.fromkeys((fit + 1, fit, fit - 2, 2 ** (e_bits - 1) - 1)):
                try:
                    formats.append(FloatFormat(e_bits, m_bits, bias))
                except UsageError:
                    continue  # range outside float32's
    return formats


def search_momentum_format(
    trace: GradientTrace,
    *,
    gamma: float = DEFAULT_GAMMA,
    tau: float = DEFAULT_TAU,
    tolerance: float = DEFAULT_TOLERANCE,
    widths: Sequence[int] = DEFAULT_WIDTHS,
) -> SearchReport:
    """Evaluate every candidate on the trace and choose the narrowest eligible one."""
    if not 0.0 <= tolerance < 1.0:
        raise UsageError(f"tolerance must be in [0, 1), got {tolerance}")
    max_abs = float(max(trace.warmup.grads.abs().max(), trace.steady.grads.abs().max(),
                        trace.steady.momentum.abs().max()))
    reference, *candidates = evaluate_candidates(
        trace, [None, *candidate_formats(max_abs, widths)], gamma, tau, tolerance
    )
    eligible = [c for c in candidates if c.eligible]
    choice = min(eligible, key=lambda c: (c.bits, c.lost_fraction, c.spec)) if eligible else None
    return SearchReport(
        gamma=gamma,
        tau=tau,
        tolerance=tolerance,
        warmup_steps=trace.warmup.grads.shape[0],
        settle_steps=trace.settle_steps,
        steady_steps=trace.steady.grads.shape[0],
        sampled_weights=trace.warmup.grads.shape[1],
        binary_weights=sum(trace.layer_numels),
        reference=reference,
        candidates=tuple(candidates),
        choice=choice,
    )


def search_model_momentum_format(
    model: nn.Module,
    recipe: Recipe,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    settle_steps: int = DEFAULT_SETTLE_STEPS,
    gamma: float = DEFAULT_GAMMA,
    tau: float = DEFAULT_TAU,
    tolerance: float = DEFAULT_TOLERANCE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    seed: int = 0,
) -> SearchReport:
    """Train a copy on `batches` to record both windows, then search (the model itself is
    not changed)."""
    trace = record_gradient_trace(
        model, recipe, batches, steps=warmup_steps, settle_steps=settle_steps, gamma=gamma,
        tau=tau,
        sample_size=sample_size, seed=seed,
    )
    return search_momentum_format(trace, gamma=gamma, tau=tau, tolerance=tolerance, widths=widths)


def resolve_momentum_format(
    recipe: Recipe,
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    **search_options,
) -> Recipe:
    """The recipe with `momentum_format="auto"` replaced by the searched format (others as is).

    Runs the warm-up on a copy of `model`, so the model itself is left untouched.
    """
    if recipe.momentum_format != "auto":
        return recipe
    search_options = {"gamma": recipe.bop_gamma, "tau": recipe.bop_tau} | search_options
    report = search_model_momentum_format(model, recipe, batches, **search_options)
    return replace(recipe, momentum_format=report.choice.spec if report.choice else None)
