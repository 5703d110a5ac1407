"""Loading and summarising a large run store: N power samples (10 million by default).

Builds a synthetic run (two methods x three seeds, idle baseline, known energy) whose
meter samples at the rate that yields N samples, through `RunStore`, in a temporary
directory; then times, in one process: `load_run` (all tables and every sample),
the phase energies, the per-job table and the method comparison. Also checks the
summary against the analytic energy, so a fast wrong answer does not pass.

    python benchmarks/analysis_load.py [--samples 10000000] [--budget-s 10] [--keep DIR]

With `--keep DIR` the store is built in DIR once and reused by later runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from analysis.compare import compare_methods, headline
from analysis.jobs import job_table
from analysis.load import Run, load_run
from analysis.run_energy import energy_table
from harness.store.synthetic import DEFAULT_METHODS, build_synthetic_run

IDLE_W = 2.0  # build_synthetic_run's default idle power

# the synthetic timeline: 1 s + 5 s idle + 2 s, then 6 jobs of 12-15 s with 2 s cooldowns
TIMELINE_S = 1 + 5 + 2 + 3 * (12 + 2) + 3 * (15 + 2) + 1


def _worst_error(run: Run, energy: pd.DataFrame) -> float:
    """Largest relative error of any window's energy against the synthetic run's levels."""
    method = run.jobs.set_index("job_id")["method"]
    worst = 0.0
    for row in energy.itertuples():
        watts = IDLE_W if row.phase == "idle" else DEFAULT_METHODS[method[row.job]].power_w
        worst = max(worst, abs(row.energy_j - watts * row.duration_s) / (watts * row.duration_s))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000)
    parser.add_argument("--budget-s", type=float, default=10.0)
    parser.add_argument("--keep", type=Path, help="build the store here and keep it")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="analysis-load-"))
    run_dir = base / "big"
    try:
        if not (run_dir / "run.sqlite").exists():
            t = time.perf_counter()
            built = build_synthetic_run(run_dir, hz=args.samples / TIMELINE_S)
            print(f"built {built.samples} samples in {time.perf_counter() - t:.1f} s "
                  f"({(run_dir / 'run.sqlite').stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        run = load_run(run_dir)
        t1 = time.perf_counter()
        energy = energy_table(run)
        t2 = time.perf_counter()
        jobs = job_table(run, energy)
        table = headline(compare_methods(jobs))
        t3 = time.perf_counter()
        total = t3 - t0
        cpu = time.process_time() - cpu0
        worst = _worst_error(run, energy)
        print(table[["method", "n", "s / epoch", "J / epoch", "J / epoch above idle"]]
              .to_string(index=False))
        print(f"samples: {sum(tr.t_host_s.size for tr in run.traces)}")
        print(f"load_run: {t1 - t0:.2f} s; phase energies ({len(energy)} windows): "
              f"{t2 - t1:.2f} s; jobs + comparison: {t3 - t2:.2f} s")
        print(f"total: {total:.2f} s wall, {cpu:.2f} s CPU (budget {args.budget_s:.0f} s, "
              f"{total / args.budget_s:.2f} of it); worst energy error vs analytic: "
              f"{100 * worst:.4f} %")
        return 0 if total < args.budget_s and worst < 1e-3 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
