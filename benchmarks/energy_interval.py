"""Energy interval width against job length and sample rate, on a known power signal.

A load whose power is a known function of time (slow and faster swings around 3 W, as
`tests/harness/test_energy_meters.py`) is sampled the way a polled meter samples it: a reading per
refresh period, stamped at the poll with an unknown constant phase (up to half a poll
period off, the UM driver's `age_correction_s`), quantised to 1 mW. Each (length, rate)
cell integrates `--repeats` windows at random places through `analysis.energy` (the one
definition, UM25C accuracy class) and prints the median interval width relative to the
true energy, the widest, and the coverage: the fraction of intervals that contain the
truth (the interval is 95 %; its terms are sums of bounds, so coverage should be at least
that). The UM meters' real rate is 2 Hz. Pure computation: no hardware, a few seconds.

    python benchmarks/energy_interval.py [--lengths 2 4 8 16 32 64] [--rates 0.5 1 2 5 10 50]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace

import numpy as np

from analysis.energy import MeterAccuracy, Window, window_energy
from harness.meters import um

UM25C = MeterAccuracy(**um.ACCURACY["um25c"])  # the driver's class, with its source


def power_at(x: np.ndarray) -> np.ndarray:
    return 3.0 + 0.8 * np.sin(2 * np.pi * x / 7.0) + 0.4 * np.sin(2 * np.pi * x / 3.1 + 1.0)


def true_energy(a: float, b: float) -> float:
    w1, w2 = 2 * math.pi / 7.0, 2 * math.pi / 3.1

    def antiderivative(x: float) -> float:
        return 3.0 * x - 0.8 * math.cos(w1 * x) / w1 - 0.4 * math.cos(w2 * x + 1.0) / w2

    return antiderivative(b) - antiderivative(a)


def cell(length_s: float, rate_hz: float, repeats: int, rng: np.random.Generator
         ) -> tuple[float, float, float, int]:
    """Median and largest relative width, coverage, and how many figures were ok."""
    timing_s = 0.5 / (2 * rate_hz)  # polled at twice the refresh rate
    accuracy = replace(UM25C, timing_s=timing_s)
    widths, inside = [], 0
    for _ in range(repeats):
        start = rng.uniform(5.0, 50.0)
        refresh = np.arange(0.0, start + length_s + 10.0, 1.0 / rate_hz)
        refresh += rng.uniform(0, 1 / rate_hz)
        stamps = refresh + rng.uniform(-timing_s, timing_s)  # one phase for the whole run
        readings = np.round(power_at(refresh), 3)
        figure = window_energy(stamps, readings, Window("job", start, start + length_s),
                               accuracy=accuracy)
        if figure.status != "ok":
            continue
        truth = true_energy(start, start + length_s)
        widths.append((figure.energy_hi_j - figure.energy_lo_j) / truth)
        inside += figure.energy_lo_j <= truth <= figure.energy_hi_j
    if not widths:
        return math.nan, math.nan, math.nan, 0
    return float(np.median(widths)), float(np.max(widths)), inside / len(widths), len(widths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 5, 10, 50])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.1f}; {args.repeats} windows per cell; "
          "width = (hi - lo) / true energy; coverage = share of intervals holding the truth")
    print(f"{'length s':>9} {'rate Hz':>8} {'ok':>5} {'median width':>13} {'max width':>10} "
          f"{'coverage':>9}")
    worst_coverage = 1.0
    for rate in args.rates:
        for length in args.lengths:
            median, largest, coverage, ok = cell(length, rate, args.repeats, rng)
            print(f"{length:9.0f} {rate:8.1f} {ok:5d} {100 * median:12.2f}% "
                  f"{100 * largest:9.2f}% {100 * coverage:8.1f}%")
            if ok:
                worst_coverage = min(worst_coverage, coverage)
    print(f"worst coverage {100 * worst_coverage:.1f} %; {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
