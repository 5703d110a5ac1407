"""The energy table of a run: every recorded window (idle, setup, job, epoch, user window)
on every meter of its device, through `analysis.energy.window_energy` (the one definition).

The windows are the `phases` the harness recorded from the device's own events, mapped
to host time with the job's `before` clock offset; each edge's clock bound grows from the
`before` estimate's error to the `after` one's (plus the offset's drift between them).
Idle power comes from the device's `idle` phases. What produced a figure goes with it:
the meter, its kind (`measured` or `modeled`) and accuracy class, recorded by the
harness in `run_info.meters`. `figure_for` and `device_idle` are what every view (this
table, the end-of-run table, the report, compare, export, the dashboard) computes with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.conditions import conditions_by_job
from analysis.energy import (
    UNKNOWN_ACCURACY,
    IdlePower,
    MeterAccuracy,
    Window,
    WindowEnergy,
    default_max_gap_s,
    idle_power,
    window_energy,
)
from analysis.load import PowerTrace, Run
from analysis.windows import name_windows

ENERGY_COLUMNS = (
    "device", "job", "method", "model", "phase", "epoch", "window", "t_start_s",
    "t_end_s", "duration_s", "energy_j", "energy_lo_j", "energy_hi_j", "above_idle_j",
    "above_idle_lo_j", "above_idle_hi_j", "meter", "meter_kind", "samples", "status", "reason",
    "attempt", "achieved_hz", "largest_gap_s", "covered_s", "mean_power_w", "idle_power_w",
    "accuracy_j", "sampling_j", "clock_j", "gap_j", "accuracy_source", "accuracy_assumed",
    "throttled",
    "counter_j", "counter_diff_j", "counter_mismatch",
)
COUNTER_COUNTS = 2  # a counter difference is uncertain by a count at each end


@dataclass(frozen=True)
class MeterInfo:
    """What produced a trace: kind `measured` or `modeled`, and its accuracy class."""

    name: str
    type: str
    kind: str
    accuracy: MeterAccuracy


@dataclass(frozen=True)
class PhaseWindow:
    device: str
    job: str
    attempt: int
    phase: str
    idx: int
    t_start_s: float
    t_end_s: float


@dataclass(frozen=True)
class ClockBound:
    """A job attempt's clock-offset error bound, from `t_before_s` to `t_after_s`."""

    t_before_s: float
    error_before_s: float
    t_after_s: float | None = None
    error_after_s: float | None = None

    def at(self, t_s: float) -> float:
        if self.t_after_s is None or self.error_after_s is None:
            return self.error_before_s
        span = self.t_after_s - self.t_before_s
        f = 0.0 if span <= 0 else min(1.0, max(0.0, (t_s - self.t_before_s) / span))
        return self.error_before_s + f * (self.error_after_s - self.error_before_s)


def clock_bounds(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], ClockBound]:
    """Per (job, attempt) from `clock_offsets` rows. The events are mapped with the `before`
    offset, so at the end the error is bounded by the drift to `after` plus its error."""
    before: dict[tuple[str, int], Mapping[str, Any]] = {}
    after: dict[tuple[str, int], Mapping[str, Any]] = {}
    for row in rows:
        if row["job_id"] is None or _nan(row["job_id"]):
            continue
        key = (str(row["job_id"]), int(row["attempt"]))
        (before if row["phase"] == "before" else after)[key] = row
    out = {}
    for key, b in before.items():
        a = after.get(key)
        if a is None:
            out[key] = ClockBound(float(b["t_host_s"]), float(b["error_s"]))
        else:
            drift = abs(float(a["offset_s"]) - float(b["offset_s"]))
            out[key] = ClockBound(float(b["t_host_s"]), float(b["error_s"]),
                                  float(a["t_host_s"]), drift + float(a["error_s"]))
    return out


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def meter_infos(info: Mapping[str, Any], devices: pd.DataFrame) -> dict[tuple[str, str], MeterInfo]:
    """(device, meter name) -> MeterInfo, from `run_info.meters` (written by the harness);
    for a store without it, from the inventory's meter section (accuracy unknown)."""
    return meter_infos_from_rows(info.get("meters") or {},
                                 zip(devices["name"], devices["meter_json"]))


def meter_infos_from_rows(recorded: Mapping[str, Any], devices: Iterable[tuple[str, Any]]
                          ) -> dict[tuple[str, str], MeterInfo]:
    """`meter_infos` from the `meters` run_info value and (device name, meter_json) pairs."""
    out: dict[tuple[str, str], MeterInfo] = {}
    for device, meters in recorded.items():
        for m in meters:
            acc = m.get("accuracy") or {}
            source = str(acc.get("source", UNKNOWN_ACCURACY.source))
            accuracy = MeterAccuracy(float(acc.get("relative", 0.0)),
                                     float(acc.get("offset_w", 0.0)), source,
                                     float(acc.get("timing_s", 0.0)),
                                     bool(acc.get("assumed", source.startswith("assumed"))))
            out[(device, m["name"])] = MeterInfo(m["name"], m.get("type", m["name"]),
                                                 m.get("kind", "measured"), accuracy)
    for name, meter_json in devices:
        if not isinstance(meter_json, str):
            continue
        try:
            meter = json.loads(meter_json) or {}
        except ValueError:
            continue
        kind = meter.get("type", "unknown")
        meter_name = meter.get("name", kind)
        out.setdefault((name, meter_name), unknown_meter(meter_name, kind))
    return out


def unknown_meter(name: str, kind: str | None = None) -> MeterInfo:
    """A meter the run did not describe: its kind from its type, its accuracy unknown."""
    kind = kind or name
    return MeterInfo(name, kind, "modeled" if kind == "modeled" else "measured",
                     UNKNOWN_ACCURACY)


def slice_trace(t: np.ndarray, p: np.ndarray, t_start_s: float, t_end_s: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """The samples of [start, end] plus one neighbour each side (for edge interpolation)."""
    lo = max(int(np.searchsorted(t, t_start_s, "left")) - 1, 0)
    hi = min(int(np.searchsorted(t, t_end_s, "right")) + 1, t.size)
    return t[lo:hi], p[lo:hi]


def device_idle(t: np.ndarray, p: np.ndarray, idle_phases: Sequence[PhaseWindow],
                gaps: Sequence[tuple[float, float]]) -> IdlePower | None:
    """The device's idle power over its idle phases on this trace (None without any)."""
    if not idle_phases:
        return None
    start = min(w.t_start_s for w in idle_phases)
    end = max(w.t_end_s for w in idle_phases)
    ts, ps = slice_trace(t, p, start, end)
    windows = [Window(f"{w.job}/idle", w.t_start_s, w.t_end_s) for w in idle_phases]
    return idle_power(ts, ps, windows, gaps=gaps, max_gap_s=default_max_gap_s(ts))


def figure_for(t: np.ndarray, p: np.ndarray, phase: PhaseWindow, *, idle: IdlePower | None,
               gaps: Sequence[tuple[float, float]], accuracy: MeterAccuracy,
               clock: ClockBound | None) -> WindowEnergy:
    """One phase window's figure on one trace (sorted host times, watts)."""
    start_error = 0.0 if phase.phase == "setup" or clock is None else clock.at(phase.t_start_s)
    end_error = 0.0 if clock is None else clock.at(phase.t_end_s)
    window = Window(f"{phase.job}/{phase.phase}/{phase.idx}", phase.t_start_s, phase.t_end_s,
                    start_error, end_error)
    ts, ps = slice_trace(t, p, phase.t_start_s, phase.t_end_s)
    return window_energy(ts, ps, window, idle=idle, gaps=gaps,
                         max_gap_s=default_max_gap_s(ts), accuracy=accuracy)


def figure_row(figure: WindowEnergy, phase: PhaseWindow, meter: MeterInfo,
               job: Mapping[str, Any] | None) -> dict[str, Any]:
    """A figure as a row of the energy table (the columns of `ENERGY_COLUMNS`)."""
    job = job or {}
    return {
        "device": phase.device, "job": phase.job, "attempt": phase.attempt,
        "method": job.get("method"), "model": job.get("model"), "phase": phase.phase,
        "epoch": phase.idx if phase.phase == "epoch" else None,
        "window": str(phase.idx) if phase.phase == "window" else None,
        "t_start_s": figure.t_start_s, "t_end_s": figure.t_end_s,
        "duration_s": figure.duration_s, "energy_j": figure.energy_j,
        "energy_lo_j": figure.energy_lo_j, "energy_hi_j": figure.energy_hi_j,
        "above_idle_j": figure.energy_above_idle_j, "above_idle_lo_j": figure.above_idle_lo_j,
        "above_idle_hi_j": figure.above_idle_hi_j, "meter": meter.name,
        "meter_kind": meter.kind, "samples": figure.samples, "status": figure.status,
        "reason": figure.reason, "achieved_hz": figure.achieved_hz,
        "largest_gap_s": figure.largest_gap_s, "covered_s": figure.covered_s,
        "mean_power_w": figure.mean_power_w, "idle_power_w": figure.idle_power_w,
        "accuracy_j": figure.accuracy_j, "sampling_j": figure.sampling_j,
        "clock_j": figure.clock_j, "gap_j": figure.gap_j,
        "accuracy_source": meter.accuracy.source,
        "accuracy_assumed": meter.accuracy.assumed,
        "throttled": job.get("throttled"),
    }


def recorded_gaps(gaps: pd.DataFrame, device: str, meter: str, t_last_s: float
                  ) -> list[tuple[float, float]]:
    """A meter's recorded gaps; one still open ends after the last sample."""
    rows = gaps[(gaps["device"] == device) & (gaps["meter"] == meter)]
    out = []
    for start, end in zip(rows["t_start_s"], rows["t_end_s"]):
        end = t_last_s + 1.0 if end is None or _nan(end) else end
        out.append((float(start), float(end)))
    return out


def phase_windows(run: Run, device: str) -> list[PhaseWindow]:
    """The device's recorded phases in time order."""
    ph = run.phases[(run.phases["device"] == device)
                    & (run.phases["t_end_host_s"] > run.phases["t_start_host_s"])]
    ph = ph.sort_values(["t_start_host_s", "kind"])
    return [PhaseWindow(device, str(r.job_id), int(r.attempt), str(r.kind), int(r.idx),
                        float(r.t_start_host_s), float(r.t_end_host_s))
            for r in ph.itertuples()]


def counter_check(counters: pd.DataFrame, row: dict[str, Any]) -> dict[str, Any]:
    """The meter's own counter over the window (J) against the integrated figure: the
    counter's last reading at or before each edge (whole mWh on a UM: 3.6 J a count); a
    difference beyond a count at each end plus the figure's whole interval is a mismatch."""
    empty = {"counter_j": None, "counter_diff_j": None, "counter_mismatch": None}
    if counters.empty or row["status"] == "withheld":
        return empty
    mine = counters[(counters["device"] == row["device"]) & (counters["meter"] == row["meter"])]
    t = mine["t_host_s"].to_numpy(dtype=float)
    c = mine["counter_wh"].to_numpy(dtype=float)
    a = int(np.searchsorted(t, row["t_start_s"], "right")) - 1
    b = int(np.searchsorted(t, row["t_end_s"], "right")) - 1
    if a < 0 or b <= a:
        return empty
    counter_j = (c[b] - c[a]) * 3600.0
    steps = np.diff(c[: b + 1])
    count_j = float(steps[steps > 0].min()) * 3600.0 if np.any(steps > 0) else 3.6
    diff = float(row["energy_j"]) - counter_j
    allowed = COUNTER_COUNTS * count_j + (row["energy_hi_j"] - row["energy_lo_j"])
    return {"counter_j": counter_j, "counter_diff_j": diff,
            "counter_mismatch": bool(abs(diff) > allowed)}


def trace_rows(run: Run, trace: PowerTrace, meter: MeterInfo,
               clocks: Mapping[tuple[str, int], ClockBound],
               jobs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every phase window of the trace's device, on that trace."""
    windows = phase_windows(run, trace.device)
    if not windows:
        return []
    t, p = trace.t_host_s, trace.power_w
    gaps = recorded_gaps(run.gaps, trace.device, trace.meter,
                         float(t[-1]) if t.size else 0.0)
    idle = device_idle(t, p, [w for w in windows if w.phase == "idle"], gaps)
    rows = [
        figure_row(figure_for(t, p, w, idle=idle, gaps=gaps, accuracy=meter.accuracy,
                              clock=clocks.get((w.job, w.attempt))), w, meter, jobs.get(w.job))
        for w in windows
    ]
    return [{**row, **counter_check(run.counters, row)} for row in rows]


def energy_table(run: Run) -> pd.DataFrame:
    """One row per (device, meter, window): the run's energy figures with their intervals."""
    meters = meter_infos(run.info, run.devices)
    clocks = clock_bounds(run.offsets.to_dict("records"))
    conditions = conditions_by_job(run)
    throttled = dict(zip(conditions["job_id"], conditions["throttled"]))
    jobs = {str(r["job_id"]): {**r, "throttled": throttled.get(r["job_id"])}
            for r in run.jobs.to_dict("records")}
    rows = []
    for trace in run.traces:
        meter = meters.get((trace.device, trace.meter)) or unknown_meter(trace.meter)
        rows += trace_rows(run, trace, meter, clocks, jobs)
    frame = pd.DataFrame(rows, columns=list(ENERGY_COLUMNS))
    for col in ("attempt", "epoch", "samples"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    return name_windows(frame, run)  # user windows by their names


def devices_without_power(run: Run) -> list[str]:
    """Devices of the run with no power samples at all (no meter, or a meter that failed)."""
    names = set(run.devices["name"].dropna()) | set(run.jobs["device"].dropna())
    metered = {trace.device for trace in run.traces if trace.t_host_s.size}
    return sorted(names - metered)
