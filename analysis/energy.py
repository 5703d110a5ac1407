"""Energy of a time window from power samples, with its interval: the one definition.

A window (idle baseline, job setup, job, epoch, a user window) is integrated with the
trapezoid rule over the samples inside it, its edges interpolated from the neighbouring
samples. Every figure carries an interval (default 95 %) summed from four terms, each
derived in docs/energy.md:

- accuracy: the meter's accuracy class (`MeterAccuracy`: a fraction of the reading plus
  an offset in watts, from its datasheet, written beside its driver);
- sampling: each sample interval's energy is known only as well as the power between its
  two samples; the power is taken as uniform between them (standard deviation
  |dp| / sqrt(12)), independent from interval to interval, at the chosen coverage; and
  each sample's time stamp is off by up to the meter's `timing_s` on its own (uniform);
- clock: the bound of the clock offset at each edge times the power there, plus the meter's
  time-stamp bound times the change of power across the window (a shifted trace);
- gaps: a stretch without samples (longer than `max_gap_s`, or a recorded meter gap) is
  bridged linearly, with the whole observed power range (at least `BRIDGE_FLOOR` of the
  mean power) over its length added to the interval, when it is at most
  `MAX_BRIDGED_FRACTION` of the window; more, or a window whose edges no sample reaches
  (meter started late, died, unplugged at the end), is withheld: no energy, status
  `withheld`, and the reason. Never 0 J, never `ok`.

Status: `ok`; `low_confidence` (gaps bridged, fewer than `MIN_SAMPLES` samples, or a
clock bound above `MAX_CLOCK_ERROR_FRACTION` of the window); `withheld`.
Pure functions of numpy arrays (host wall-clock seconds and watts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

MIN_SAMPLES = 4
MAX_CLOCK_ERROR_FRACTION = 0.02
MAX_BRIDGED_FRACTION = 0.25
BRIDGE_FLOOR = 0.1  # a bridged stretch's power is uncertain by at least 10 % of the mean
CONFIDENCE = 0.95
STATUSES = ("ok", "low_confidence", "withheld")


@dataclass(frozen=True)
class MeterAccuracy:
    """A meter's accuracy class as a bound on each reading: `relative` x reading +
    `offset_w`; `source` says where the figures come from (datasheet, or why assumed, then
    `assumed`);
    `timing_s` bounds how far a sample's time stamp may be from when its reading was
    taken, the same for every sample of a meter (a UM's poll phase against its refresh)."""

    relative: float
    offset_w: float
    source: str
    timing_s: float = 0.0
    assumed: bool = False  # no maker's figure: the class is a stated assumption (`source`)


UNKNOWN_ACCURACY = MeterAccuracy(0.0, 0.0, "unknown: the run did not record the meter's class")


@dataclass(frozen=True)
class Window:
    """A named interval in host time; `clock_error_s` bounds the error of its start edge,
    `clock_error_end_s` that of its end edge (the start's bound when None)."""

    name: str
    t_start_s: float
    t_end_s: float
    clock_error_s: float = 0.0
    clock_error_end_s: float | None = None

    def __post_init__(self) -> None:
        if not self.t_end_s > self.t_start_s:
            raise ValueError(
                f"window {self.name!r}: end {self.t_end_s} is not after start {self.t_start_s}"
            )

    @property
    def end_error_s(self) -> float:
        return self.clock_error_s if self.clock_error_end_s is None else self.clock_error_end_s


@dataclass(frozen=True)
class IdlePower:
    """Mean power over the idle baseline and the random half-width of that mean (W)."""

    power_w: float
    half_width_w: float


@dataclass(frozen=True)
class WindowEnergy:
    name: str
    t_start_s: float
    t_end_s: float
    duration_s: float
    energy_j: float  # gross, over the whole window (gaps bridged); nan when withheld
    energy_lo_j: float
    energy_hi_j: float
    covered_s: float  # time with samples (duration minus gaps and unreached edges)
    mean_power_w: float
    idle_power_w: float | None
    energy_above_idle_j: float | None  # energy_j - idle_power_w * duration_s
    above_idle_lo_j: float | None
    above_idle_hi_j: float | None
    samples: int  # samples inside the window
    achieved_hz: float  # samples / duration_s
    largest_gap_s: float  # longest stretch of the window without a sample
    accuracy_j: float  # half-widths of the interval's terms (J)
    sampling_j: float
    clock_j: float
    gap_j: float
    status: str  # ok | low_confidence | withheld
    reason: str | None  # why it is not ok ("; "-separated), else None

    @property
    def low_confidence(self) -> bool:
        """Anything but `ok` (a withheld figure is not confident either)."""
        return self.status != "ok"

    @property
    def half_width_j(self) -> float:
        return self.accuracy_j + self.sampling_j + self.clock_j + self.gap_j


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


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _withheld(window: Window, reasons: list[str], samples: int, covered: float,
              largest_gap: float, idle: IdlePower | None) -> WindowEnergy:
    nan = math.nan
    duration = window.t_end_s - window.t_start_s
    return WindowEnergy(
        window.name, window.t_start_s, window.t_end_s, duration, nan, nan, nan, covered, nan,
        idle.power_w if idle else None, None, None, None, samples, samples / duration,
        largest_gap, nan, nan, nan, nan, "withheld", "; ".join(reasons),
    )


def _stamp_jitter_var(t: np.ndarray, p: np.ndarray, a: float, b: float, timing_s: float
                      ) -> float:
    """The variance a window's trapezoid energy takes from each sample's own time stamp
    being off by up to `timing_s` (uniform, independent from sample to sample: the poll's
    phase drifts against the meter's refresh, the host is sometimes late): moving sample j
    by e changes the energy by e x (p[j-1] - p[j+1]) / 2."""
    if timing_s <= 0 or t.size < 3:
        return 0.0
    inner = np.flatnonzero((t[1:-1] > a) & (t[1:-1] < b)) + 1
    if inner.size == 0:
        return 0.0
    slope_w = (p[inner - 1] - p[inner + 1]) / 2.0
    return float(np.sum(slope_w**2) * timing_s**2 / 3.0)


def window_energy(
    t_s: np.ndarray,
    power_w: np.ndarray,
    window: Window,
    idle: IdlePower | None = None,
    gaps: Sequence[tuple[float, float]] = (),
    max_gap_s: float | None = None,
    accuracy: MeterAccuracy = UNKNOWN_ACCURACY,
    min_samples: int = MIN_SAMPLES,
    confidence: float = CONFIDENCE,
) -> WindowEnergy:
    """The window's figure and interval; see the module docstring for the rules.
    `max_gap_s` defaults to `default_max_gap_s` of the samples given."""
    t, p = _as_series(t_s, power_w)
    if max_gap_s is None:
        max_gap_s = default_max_gap_s(t)
    a, b = window.t_start_s, window.t_end_s
    duration = b - a
    inside = (t >= a) & (t <= b)
    samples = int(np.count_nonzero(inside))
    points = np.concatenate(([a], t[inside], [b]))
    largest_gap = float(np.max(np.diff(points)))
    if t.size < 2 or t[0] > a or t[-1] < b:
        first = f"{t[0] - a:.3g} s after" if t.size and t[0] > a else None
        reason = (
            "no power samples" if t.size == 0
            else f"the meter's samples start {first} the window's start" if first
            else f"no sample after {t[-1] - a:.3g} s of the {duration:.3g} s window "
            "(the meter stopped or the samples are not in yet)"
            if t[-1] < b else "a single sample cannot span the window"
        )
        covered = float(max(0.0, min(b, t[-1]) - max(a, t[0]))) if t.size else 0.0
        return _withheld(window, [reason], samples, covered, largest_gap, idle)

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
    width = x1 - x0
    energy = float(np.sum(0.5 * (y0 + y1) * width))
    gap_s = float(np.sum(width[bad]))
    reasons: list[str] = []
    if gap_s > MAX_BRIDGED_FRACTION * duration:
        reasons.append(
            f"{gap_s:.3g} s of the {duration:.3g} s window ({100 * gap_s / duration:.0f} %) "
            f"have no samples (more than {100 * MAX_BRIDGED_FRACTION:.0f} % cannot be bridged)"
        )
        return _withheld(window, reasons, samples, duration - gap_s, largest_gap, idle)
    good = ~bad
    z = _z(confidence)
    observed = np.concatenate((y0, y1))
    spread_w = max(float(observed.max() - observed.min()),
                   BRIDGE_FLOOR * abs(float(observed.mean())))
    gap_j = gap_s * spread_w if gap_s > 0 else 0.0
    if gap_s > 0:
        reasons.append(
            f"{gap_s:.3g} s of the window ({100 * gap_s / duration:.1f} %) had no samples and "
            "are bridged (interval widened by the observed power range)"
        )
    sampling_var = float(np.sum((width[good] * np.abs(y1 - y0)[good]) ** 2) / 12.0)
    sampling_j = z * math.sqrt(sampling_var + _stamp_jitter_var(t, p, a, b, accuracy.timing_s))
    p_a, p_b = float(y0[0]), float(y1[-1])
    clock_j = (window.clock_error_s * abs(p_a) + window.end_error_s * abs(p_b)
               + accuracy.timing_s * abs(p_b - p_a))
    accuracy_j = accuracy.relative * abs(energy) + accuracy.offset_w * duration
    half = accuracy_j + sampling_j + clock_j + gap_j
    if accuracy is UNKNOWN_ACCURACY:
        reasons.append("the meter's accuracy class is unknown (the interval leaves it out)")
    if samples < min_samples:
        reasons.append(f"only {samples} samples in a {duration:.3g} s window (need {min_samples})")
    clock_bound = max(window.clock_error_s, window.end_error_s)
    if clock_bound > MAX_CLOCK_ERROR_FRACTION * duration:
        reasons.append(
            f"clock-offset error ±{clock_bound:.3g} s is "
            f"{100 * clock_bound / duration:.1f} % of the {duration:.3g} s window"
        )
    above = above_lo = above_hi = None
    if idle is not None:
        above = energy - idle.power_w * duration
        random_j = math.hypot(sampling_j, idle.half_width_w * duration)
        above_half = accuracy.relative * abs(above) + clock_j + gap_j + random_j
        above_lo, above_hi = above - above_half, above + above_half
    return WindowEnergy(
        name=window.name,
        t_start_s=a,
        t_end_s=b,
        duration_s=duration,
        energy_j=energy,
        energy_lo_j=max(0.0, energy - half),
        energy_hi_j=energy + half,
        covered_s=duration - gap_s,
        mean_power_w=energy / duration,
        idle_power_w=idle.power_w if idle else None,
        energy_above_idle_j=above,
        above_idle_lo_j=above_lo,
        above_idle_hi_j=above_hi,
        samples=samples,
        achieved_hz=samples / duration,
        largest_gap_s=largest_gap,
        accuracy_j=accuracy_j,
        sampling_j=sampling_j,
        clock_j=clock_j,
        gap_j=gap_j,
        status="low_confidence" if reasons else "ok",
        reason="; ".join(reasons) if reasons else None,
    )


def idle_power(
    t_s: np.ndarray,
    power_w: np.ndarray,
    idle_windows: Sequence[Window],
    gaps: Sequence[tuple[float, float]] = (),
    max_gap_s: float | None = None,
    confidence: float = CONFIDENCE,
) -> IdlePower | None:
    """Mean power over the idle baseline windows that are not withheld, with the random
    half-width of that mean (the windows' sampling terms over their total length)."""
    figures = [
        window_energy(t_s, power_w, window, gaps=gaps, max_gap_s=max_gap_s,
                      confidence=confidence)
        for window in idle_windows
    ]
    figures = [f for f in figures if f.status != "withheld"]
    duration = sum(f.duration_s for f in figures)
    if duration <= 0:
        return None
    random_j = math.sqrt(sum(f.sampling_j**2 + f.gap_j**2 for f in figures))
    return IdlePower(sum(f.energy_j for f in figures) / duration, random_j / duration)
