"""Energy of time windows from power samples: the one implementation used everywhere.

A window (a job, an epoch, an evaluation, an idle baseline) is integrated with the
trapezoid rule over the samples inside it, with its edges interpolated from the
neighbouring samples. Gaps are reported, not filled: an interval between samples that
is longer than `max_gap_s` or that overlaps a recorded meter gap is left out of the
integral, and the figure says how much of the window that was. Every figure carries its
sample count, achieved rate and largest gap, and is flagged low-confidence, with the
reason, when the window holds too few samples for its length, when the clock-offset
error bound is a large part of it, or when part of it was not covered.
Pure functions of numpy arrays (host wall-clock seconds and watts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 10
MAX_CLOCK_ERROR_FRACTION = 0.02


@dataclass(frozen=True)
class Window:
    """A named interval in host time; `clock_error_s` bounds the error of its edges."""

    name: str
    t_start_s: float
    t_end_s: float
    clock_error_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.t_end_s > self.t_start_s:
            raise ValueError(
                f"window {self.name!r}: end {self.t_end_s} is not after start {self.t_start_s}"
            )


@dataclass(frozen=True)
class WindowEnergy:
    name: str
    t_start_s: float
    t_end_s: float
    duration_s: float
    energy_j: float  # gross, over the covered part of the window
    covered_s: float  # time integrated (duration minus gaps and unreachable edges)
    mean_power_w: float  # energy_j / covered_s (nan when nothing was covered)
    idle_power_w: float | None
    energy_above_idle_j: float | None  # energy_j - idle_power_w * covered_s
    samples: int  # samples inside the window
    achieved_hz: float  # samples / duration_s
    largest_gap_s: float  # longest stretch of the window without a sample
    low_confidence: bool
    reason: str | None  # why it is low-confidence ("; "-separated), else None


def _as_series(t_s: np.ndarray, power_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t_s, dtype=float)
    p = np.asarray(power_w, dtype=float)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"t_s and power_w must be 1-D and equal length, got {t.shape}, {p.shape}")
    keep = np.isfinite(t) & np.isfinite(p)
    t, p = t[keep], p[keep]
    if t.size > 1 and np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, p = t[order], p[order]
    return t, p


def default_max_gap_s(t_s: np.ndarray) -> float:
    """Five times the typical sample spacing, and at least a second."""
    t = np.asarray(t_s, dtype=float)
    if t.size < 2:
        return 1.0
    return max(1.0, 5.0 * float(np.median(np.diff(t))))


def _is_gap(
    left: np.ndarray, right: np.ndarray, max_gap_s: float, gaps: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Which sample intervals [left, right] are gaps: too long, or overlapping a recorded gap."""
    gap = (right - left) > max_gap_s
    for start, end in gaps:
        gap |= (left < end) & (right > start)
    return gap


def window_energy(
    t_s: np.ndarray,
    power_w: np.ndarray,
    window: Window,
    idle_power_w: float | None = None,
    gaps: Sequence[tuple[float, float]] = (),
    max_gap_s: float | None = None,
    min_samples: int = MIN_SAMPLES,
    max_clock_error_fraction: float = MAX_CLOCK_ERROR_FRACTION,
) -> WindowEnergy:
    """Integrate one window; see the module docstring for the rules."""
    t, p = _as_series(t_s, power_w)
    if max_gap_s is None:
        max_gap_s = default_max_gap_s(t)
    a, b = window.t_start_s, window.t_end_s
    duration = b - a
    reasons: list[str] = []

    inside = (t > a) & (t < b)
    samples = int(np.count_nonzero(inside)) + int(np.count_nonzero((t == a) | (t == b)))
    # Sample intervals that overlap the window: [t[i], t[i+1]] with t[i] < b and t[i+1] > a.
    energy = covered = skipped = 0.0
    if t.size >= 2:
        left, right = t[:-1], t[1:]
        overlap = (left < b) & (right > a) & (right > left)
        lo, hi = left[overlap], right[overlap]
        p_lo, p_hi = p[:-1][overlap], p[1:][overlap]
        bad = _is_gap(lo, hi, max_gap_s, gaps)
        # Clip each interval to the window, interpolating power linearly at the cut.
        x0, x1 = np.maximum(lo, a), np.minimum(hi, b)
        slope = (p_hi - p_lo) / (hi - lo)
        y0 = p_lo + slope * (x0 - lo)
        y1 = p_lo + slope * (x1 - lo)
        good = ~bad
        energy = float(np.sum(0.5 * (y0[good] + y1[good]) * (x1[good] - x0[good])))
        covered = float(np.sum(x1[good] - x0[good]))
        skipped = float(np.sum(x1[bad] - x0[bad]))
        if skipped > 0:
            reasons.append(
                f"{skipped:.3g} s of the window ({100 * skipped / duration:.1f} %) fall in gaps "
                "and are not integrated"
            )
    if t.size == 0 or t[0] > a or t[-1] < b:
        unreached = duration - covered - skipped
        reasons.append(
            f"no samples on both sides of the window's edges ({unreached:.3g} s not covered)"
        )
    if samples < min_samples:
        reasons.append(f"only {samples} samples in a {duration:.3g} s window (need {min_samples})")
    if window.clock_error_s > max_clock_error_fraction * duration:
        reasons.append(
            f"clock-offset error ±{window.clock_error_s:.3g} s is "
            f"{100 * window.clock_error_s / duration:.1f} % of the {duration:.3g} s window"
        )
    points = np.concatenate(([a], t[inside], [b]))
    largest_gap = float(np.max(np.diff(points)))
    mean_power = energy / covered if covered > 0 else float("nan")
    above = energy - idle_power_w * covered if idle_power_w is not None else None
    return WindowEnergy(
        name=window.name,
        t_start_s=a,
        t_end_s=b,
        duration_s=duration,
        energy_j=energy,
        covered_s=covered,
        mean_power_w=mean_power,
        idle_power_w=idle_power_w,
        energy_above_idle_j=above,
        samples=samples,
        achieved_hz=samples / duration,
        largest_gap_s=largest_gap,
        low_confidence=bool(reasons),
        reason="; ".join(reasons) if reasons else None,
    )


def idle_power(
    t_s: np.ndarray,
    power_w: np.ndarray,
    idle_windows: Sequence[Window],
    gaps: Sequence[tuple[float, float]] = (),
    max_gap_s: float | None = None,
) -> float | None:
    """Mean power over the idle baseline windows (energy over covered time), None if none."""
    figures = [
        window_energy(t_s, power_w, window, gaps=gaps, max_gap_s=max_gap_s)
        for window in idle_windows
    ]
    covered = sum(figure.covered_s for figure in figures)
    if covered <= 0:
        return None
    return sum(figure.energy_j for figure in figures) / covered


def window_energies(
    t_s: np.ndarray,
    power_w: np.ndarray,
    windows: Sequence[Window],
    idle_windows: Sequence[Window] = (),
    gaps: Sequence[tuple[float, float]] = (),
    max_gap_s: float | None = None,
    min_samples: int = MIN_SAMPLES,
    max_clock_error_fraction: float = MAX_CLOCK_ERROR_FRACTION,
) -> list[WindowEnergy]:
    """Every window's figure, above the idle power measured over `idle_windows`."""
    t, p = _as_series(t_s, power_w)
    if max_gap_s is None:
        max_gap_s = default_max_gap_s(t)
    idle = idle_power(t, p, idle_windows, gaps=gaps, max_gap_s=max_gap_s)
    return [
        window_energy(
            t,
            p,
            window,
            idle_power_w=idle,
            gaps=gaps,
            max_gap_s=max_gap_s,
            min_samples=min_samples,
            max_clock_error_fraction=max_clock_error_fraction,
        )
        for window in windows
    ]
