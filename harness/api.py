"""The host-side Python API, for notebooks and scripts beside the CLI.

    from harness import api

    run = api.load("runs/latest")            # a run directory
    run.tables()                             # dict of tidy DataFrames: jobs, devices, energy,
                                             # windows, power, memory, phases, events, results
    run.energy()                             # one row per window and meter, J and kWh, intervals
    run.windows()                            # the user windows with their energy
    api.energy_per_window("runs/latest")     # the same, in one call

Every figure is the one `harness report`, `harness export` and the dashboard show
(`analysis.run_energy`), so a notebook and the CLI agree to the joule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from harness.errors import HarnessUsageError

# The columns `windows()` adds from the energy table to each window.
WINDOW_ENERGY_COLUMNS = ("meter", "meter_kind", "energy_j", "energy_lo_j", "energy_hi_j",
                         "above_idle_j", "energy_kwh", "samples", "status", "reason")


@dataclass
class RunData:
    """One run, loaded once; tables are computed on first use."""

    path: Path
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def run(self) -> Any:
        """The `analysis.load.Run` (store tables as DataFrames, power traces as arrays)."""
        from analysis.load import load_run

        return load_run(self.path)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def energy(self) -> Any:
        """Energy per phase window and meter (phases idle, setup, job, epoch, window), with
        the interval and status of each figure, in J and kWh."""
        if "energy" not in self._cache:
            from analysis.emissions import with_kwh
            from analysis.run_energy import energy_table

            self._cache["energy"] = with_kwh(energy_table(self.run))
        return self._cache["energy"]

    def windows(self) -> Any:
        """The user windows (`device_agent.window`), one row per window and meter, with their
        energy; a window on a device without a meter has empty energy columns."""
        import pandas as pd

        from analysis.windows import windows_table

        windows = windows_table(self.run)
        energy = self.energy()
        energy = energy[energy["phase"] == "window"]
        merged = windows.merge(
            energy[["device", "job", "attempt", "window", "t_start_s", *WINDOW_ENERGY_COLUMNS]],
            on=["device", "job", "attempt", "window", "t_start_s"], how="left",
        )
        return merged if not merged.empty else pd.DataFrame(
            columns=[*windows.columns, *WINDOW_ENERGY_COLUMNS])

    def tables(self) -> dict[str, Any]:
        """Every tidy table of the run, as `harness export` writes them, plus `windows`."""
        from analysis.conditions import device_table, job_conditions

        run = self.run
        return {
            "jobs": job_conditions(run),
            "devices": device_table(run),
            "energy": self.energy(),
            "windows": self.windows(),
            "power": run.power,
            "memory": run.memory,
            "phases": run.phases,
            "events": run.events,
            "results": run.results,
        }


def load(path: str | Path) -> RunData:
    """A run directory (or its run.sqlite), e.g. `runs/latest`."""
    path = Path(path)
    if path.name == "run.sqlite":
        path = path.parent
    if not (path / "run.sqlite").is_file():
        raise HarnessUsageError(f"{path}: no run.sqlite (not a run directory)")
    return RunData(path)


def energy_per_window(path: str | Path) -> Any:
    """The user windows of a run with their energy (see `RunData.windows`)."""
    return load(path).windows()
