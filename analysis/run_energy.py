"""Energy of every phase of a run (job, epoch, eval, idle), per device and meter.

Applies `analysis.energy` (the one integration) to the phases the harness recorded:
idle power from the device's `idle` phases, recorded meter gaps left out, each
window's clock error taken from the job's clock-offset bounds. Traces are sliced to
each window (plus one sample either side for the interpolated edges) so that a
store with millions of samples is summarised in one pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from analysis.energy import Window, WindowEnergy, default_max_gap_s, idle_power, window_energy
from analysis.load import PowerTrace, Run

ENERGY_COLUMNS = (
    "device", "meter", "job_id", "attempt", "kind", "idx", "t_start_host_s", "t_end_host_s",
    "duration_s", "energy_j", "energy_above_idle_j", "covered_s", "mean_power_w", "idle_power_w",
    "samples", "achieved_hz", "largest_gap_s", "low_confidence", "reason",
)


def _slice(trace: PowerTrace, t_start_s: float, t_end_s: float) -> tuple[np.ndarray, np.ndarray]:
    t = trace.t_host_s
    lo = max(int(np.searchsorted(t, t_start_s, "left")) - 1, 0)
    hi = min(int(np.searchsorted(t, t_end_s, "right")) + 1, t.size)
    return t[lo:hi], trace.power_w[lo:hi]


def _gaps(run: Run, device: str, meter: str, t_last_s: float) -> list[tuple[float, float]]:
    rows = run.gaps[(run.gaps["device"] == device) & (run.gaps["meter"] == meter)]
    out = []
    for start, end in zip(rows["t_start_s"], rows["t_end_s"]):
        end = t_last_s + 1.0 if end is None or (isinstance(end, float) and math.isnan(end)) else end
        out.append((float(start), float(end)))
    return out


def _clock_errors(run: Run) -> dict[tuple[str, int], float]:
    """Largest clock-offset error bound per (job, attempt)."""
    off = run.offsets.dropna(subset=["job_id"])
    if off.empty:
        return {}
    worst = off.groupby(["job_id", "attempt"])["error_s"].max()
    return {(str(j), int(a)): float(e) for (j, a), e in worst.items()}


def phase_windows(run: Run, device: str) -> pd.DataFrame:
    """The device's phases, plus a `job` window from the jobs table for a job without one."""
    ph = run.phases[run.phases["device"] == device].copy()
    have_job = set(ph.loc[ph["kind"] == "job", "job_id"])
    extra = run.jobs[
        (run.jobs["device"] == device)
        & (run.jobs["kind"] == "train")
        & ~run.jobs["job_id"].isin(have_job)
        & run.jobs["t_start_host_s"].notna()
        & run.jobs["t_end_host_s"].notna()
    ]
    rows = [
        {"device": device, "job_id": r.job_id, "attempt": int(r.attempts or 1), "kind": "job",
         "idx": 0, "t_start_host_s": r.t_start_host_s, "t_end_host_s": r.t_end_host_s}
        for r in extra.itertuples()
    ]
    if rows:
        ph = pd.concat([ph, pd.DataFrame(rows)], ignore_index=True)
    ph = ph[ph["t_end_host_s"] > ph["t_start_host_s"]]
    return ph.sort_values(["t_start_host_s", "kind"]).reset_index(drop=True)


def trace_energies(run: Run, trace: PowerTrace) -> list[dict]:
    """Every phase window of the trace's device, integrated over that trace."""
    windows = phase_windows(run, trace.device)
    if windows.empty or trace.t_host_s.size == 0:
        return []
    max_gap_s = default_max_gap_s(trace.t_host_s)
    gaps = _gaps(run, trace.device, trace.meter, float(trace.t_host_s[-1]))
    errors = _clock_errors(run)
    idle_rows = windows[windows["kind"] == "idle"]
    idle_w = None
    if not idle_rows.empty:
        idle_windows = [
            Window(f"{r.job_id}/idle/{r.idx}", float(r.t_start_host_s), float(r.t_end_host_s))
            for r in idle_rows.itertuples()
        ]
        t, p = _slice(trace, idle_rows["t_start_host_s"].min(), idle_rows["t_end_host_s"].max())
        idle_w = idle_power(t, p, idle_windows, gaps=gaps, max_gap_s=max_gap_s)
    out = []
    for r in windows.itertuples():
        window = Window(
            f"{r.job_id}/{r.kind}/{r.idx}",
            float(r.t_start_host_s),
            float(r.t_end_host_s),
            errors.get((str(r.job_id), int(r.attempt)), 0.0),
        )
        t, p = _slice(trace, window.t_start_s, window.t_end_s)
        figure: WindowEnergy = window_energy(
            t, p, window, idle_power_w=idle_w, gaps=gaps, max_gap_s=max_gap_s
        )
        row = asdict(figure)
        row.update(device=trace.device, meter=trace.meter, job_id=r.job_id,
                   attempt=int(r.attempt), kind=r.kind, idx=int(r.idx),
                   t_start_host_s=figure.t_start_s, t_end_host_s=figure.t_end_s)
        out.append(row)
    return out


def phase_energies(run: Run) -> pd.DataFrame:
    """One row per (device, meter, phase window); empty (with columns) without power."""
    rows = [row for trace in run.traces for row in trace_energies(run, trace)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(ENERGY_COLUMNS))
    return frame[list(ENERGY_COLUMNS)]


def devices_without_power(run: Run) -> list[str]:
    """Devices of the run with no power samples at all (no meter, or a meter that failed)."""
    names = set(run.devices["name"].dropna()) | set(run.jobs["device"].dropna())
    metered = {trace.device for trace in run.traces if trace.t_host_s.size}
    return sorted(names - metered)
