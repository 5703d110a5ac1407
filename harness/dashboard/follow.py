"""Follow one run store while it is written: new rows by id cursor, plus a small summary.

The dashboard never re-reads the whole store: each streamed table (power and memory
samples, phases, meter gaps, progress events) is read from the last id seen, and the
summary (devices, jobs, meter statistics) is a handful of small tables. Each job's energy
is `analysis.run_energy.figure_for` (the one definition, the report's figure) over the
samples this follower already holds: a finished job's recorded `job` (or `idle`) phase;
a running job's work so far, from the end of its setup to its meter's latest sample.
All reads go through `runstore.reader.StoreReader`: a store that is missing, empty or of
another schema version is a `StoreProblem` with a message for the page, never a stack trace.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from analysis.run_energy import (
    PhaseWindow,
    clock_bounds,
    device_idle,
    figure_for,
    meter_infos_from_rows,
    unknown_meter,
)
from contract.events import PAYLOADS, EpochEnd, EpochStart, Error, JobEnd, JobStart, Step
from harness.recorder import Progress
from runstore.reader import StoreProblem, StoreReader

__all__ = ["StoreFollower", "StoreProblem", "open_store", "run_overview"]

# Event kinds that carry a device's progress (the rest stay in the store).
PROGRESS_KINDS = ("job_start", "epoch_start", "step", "epoch_end", "job_end", "error")
# Store status -> the overview's category.
STATUS_CATEGORY = {
    "planned": "idle",
    "done": "idle",
    "running": "running",
    "error": "failed",
    "lost": "unreachable",
    "unreachable": "unreachable",
}
CHUNK_ROWS = 20_000


def open_store(run_dir: Path) -> StoreReader:
    """A reader of a store this dashboard can read (this schema version), or a `StoreProblem`."""
    return StoreReader(run_dir)


class Series:
    """One (device, meter) power trace held by the follower in host time order (numpy
    buffers that double when full, so a job's window is a view, not a copy)."""

    def __init__(self) -> None:
        self._t = np.empty(1024)
        self._w = np.empty(1024)
        self.size = 0

    @property
    def t_s(self) -> np.ndarray:
        return self._t[: self.size]

    @property
    def power_w(self) -> np.ndarray:
        return self._w[: self.size]

    def extend(self, t_s: list[float], power_w: list[float]) -> None:
        t, w = np.asarray(t_s, dtype=float), np.asarray(power_w, dtype=float)
        needed = self.size + t.size
        if needed > self._t.size:
            capacity = max(needed, 2 * self._t.size)
            self._t = np.resize(self._t, capacity)
            self._w = np.resize(self._w, capacity)
        self._t[self.size : needed] = t
        self._w[self.size : needed] = w
        old = self.size
        self.size = needed
        if t.size and (np.any(np.diff(t) < 0) or (old and t[0] < self._t[old - 1])):
            order = np.argsort(self.t_s, kind="stable")  # late rows: rare, re-sort
            self._t[:needed] = self.t_s[order]
            self._w[:needed] = self.power_w[order]

    def window(self, t_start_s: float, t_end_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The samples of [start, end] plus one neighbour each side (for edge interpolation)."""
        lo = max(0, int(np.searchsorted(self.t_s, t_start_s, "left")) - 1)
        hi = int(np.searchsorted(self.t_s, t_end_s, "right")) + 1
        return self.t_s[lo:hi], self.power_w[lo:hi]


class StoreFollower:
    """Reads one run's store incrementally; `poll()` returns only what is new."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.store = open_store(self.run_dir)
        self.cursors = {"power": 0, "memory": 0, "phases": 0, "gaps": 0, "events": 0}
        self.series: dict[tuple[str, str], Series] = {}
        self.gaps: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.progress: dict[str, Progress] = {}
        self.phases: list[PhaseWindow] = []
        self._final_energy: dict[tuple[str, str, float], dict[str, Any]] = {}
        self.progress_changed = False  # a progress event arrived since the last summary

    def close(self) -> None:
        self.store.close()

    def _rows(self, stream: str, kinds: tuple[str, ...] = ()) -> list[Any]:
        rows = self.store.rows_after(stream, self.cursors[stream], CHUNK_ROWS, kinds)
        if rows:
            self.cursors[stream] = rows[-1]["id"]
        return rows

    def _power_rows(self) -> tuple[list[list[Any]], bool]:
        """New power samples grouped per (device, meter), in columns: [device, meter, t_s,
        power_w, volts, amps] (plain tuples: the bulk of a store, read fast)."""
        rows = self.store.power_after(self.cursors["power"], CHUNK_ROWS)
        if not rows:
            return [], False
        self.cursors["power"] = rows[-1][0]
        columns: dict[tuple[str, str], list[list[Any]]] = {}
        for _, device, meter, t_s, power_w, volts, amps in rows:
            group = columns.get((device, meter))
            if group is None:
                group = columns[(device, meter)] = [[], [], [], []]
            group[0].append(t_s)
            group[1].append(power_w)
            group[2].append(volts)
            group[3].append(amps)
        for (device, meter), (t_s, power_w, _, _) in columns.items():
            self.series.setdefault((device, meter), Series()).extend(t_s, power_w)
        full = len(rows) == CHUNK_ROWS
        return [[device, meter, *group] for (device, meter), group in columns.items()], full

    def poll(self) -> tuple[dict[str, list[list[Any]]], bool]:
        """New rows since the last call, as compact lists; True when a chunk was full."""
        power, power_full = self._power_rows()
        memory = self._rows("memory")
        phases = self._rows("phases")
        self.phases += [
            PhaseWindow(r["device"], r["job_id"], r["attempt"], r["kind"], r["idx"],
                        r["t_start_host_s"], r["t_end_host_s"])
            for r in phases if r["t_end_host_s"] > r["t_start_host_s"]
        ]
        gaps = self._rows("gaps")
        events = self._rows("events", PROGRESS_KINDS)
        for row in gaps:
            end = row["t_end_s"] if row["t_end_s"] is not None else float("inf")
            self.gaps.setdefault((row["device"], row["meter"]), []).append((row["t_start_s"], end))
        marks = [self._progress_event(row) for row in events]
        self.progress_changed |= bool(events)
        full = power_full or any(len(rows) == CHUNK_ROWS for rows in (memory, phases, gaps, events))
        return {
            "power": power,
            "memory": [
                [
                    r["device"],
                    r["job_id"],
                    r["t_host_s"],
                    r["rss_bytes"],
                    r["hwm_bytes"],
                    r["peak_tensor_bytes"],
                ]
                for r in memory
            ],
            "phases": [
                [
                    r["device"],
                    r["job_id"],
                    r["kind"],
                    r["idx"],
                    r["t_start_host_s"],
                    r["t_end_host_s"],
                ]
                for r in phases
            ],
            "gaps": [
                [r["device"], r["meter"], r["t_start_s"], r["t_end_s"], r["reason"]] for r in gaps
            ],
            "marks": [mark for mark in marks if mark is not None],
        }, full

    def _progress_event(self, row: sqlite3.Row) -> list[Any] | None:
        """Update the device's progress; epoch starts become live marks on the trace."""
        progress = self.progress.setdefault(row["device"], Progress(row["device"]))
        try:  # the event's payload as the contract defines it (stored lines were valid)
            data = json.loads(row["raw_json"]).get("data") or {}
            payload = PAYLOADS[row["kind"]].from_data(data)
        except (ValueError, AttributeError, KeyError):
            return None
        if isinstance(payload, JobStart):
            self.progress[row["device"]] = Progress(row["device"], job_id=row["job_id"],
                                                   state="running")
        elif isinstance(payload, EpochStart):
            progress.job_id, progress.epoch = row["job_id"], payload.epoch
            if row["t_host_s"] is not None:
                return [row["device"], row["job_id"], "epoch_start", progress.epoch,
                        row["t_host_s"]]
        elif isinstance(payload, Step):
            progress.step, progress.epoch, progress.loss = (payload.global_step, payload.epoch,
                                                            payload.loss)
        elif isinstance(payload, EpochEnd):
            progress.train_accuracy = payload.train_accuracy
            progress.test_accuracy = payload.test_accuracy
        elif isinstance(payload, (JobEnd, Error)):
            progress.state = "finished" if isinstance(payload, JobEnd) else "error"
        return None

    def summary(self) -> dict[str, Any]:
        """Devices with status and progress, jobs with energy so far, meter statistics."""
        now = time.time()
        self.progress_changed = False
        devices = [dict(r) for r in self.store.devices()]
        stats = [dict(r) for r in self.store.meter_stats()]
        jobs = [dict(r) for r in self.store.jobs_by_start()]
        results = self.store.result_summaries()
        for device in devices:
            device["category"] = STATUS_CATEGORY.get(device["status"], device["status"])
            device["progress"] = vars(self.progress.get(device["name"], Progress(device["name"])))
        context = self._energy_context()
        for job in jobs:
            job["result"] = results.get(job["job_id"])
            job["energy"] = self._job_energy(job, now, context)
        return {"t_server_s": now, "devices": devices, "meter_stats": stats, "jobs": jobs}

    def _energy_context(self) -> dict[str, Any]:
        """What every figure needs besides the samples: meters, clock bounds."""
        return {
            "meters": meter_infos_from_rows(self.store.recorded_meters(),
                                            self.store.device_meters()),
            "clocks": clock_bounds(self.store.clock_offsets()),
        }

    def _job_energy(self, job: dict[str, Any], now: float, context: dict[str, Any]
                    ) -> list[dict[str, Any]]:
        """The job's figure per meter: its recorded `job` (or `idle`) phase once finished;
        while it runs, its work so far (setup end to the meter's latest sample)."""
        device = job["device"]
        if device is None or job["t_start_host_s"] is None:
            return []
        mine = [w for w in self.phases if w.job == job["job_id"]]
        attempt = max((w.attempt for w in mine), default=None)
        mine = [w for w in mine if w.attempt == attempt]
        done = next((w for w in mine if w.phase in ("job", "idle")), None)
        setup = next((w for w in mine if w.phase == "setup"), None)
        idle_phases = [w for w in self.phases if w.device == device and w.phase == "idle"]
        figures = []
        for (series_device, meter_name), series in sorted(self.series.items()):
            if series_device != device or series.size == 0:
                continue
            latest = float(series.t_s[-1])
            if done is not None:
                window = done
            elif setup is not None and job["t_end_host_s"] is None:
                end = min(now, latest)
                if end <= setup.t_end_s:
                    continue
                window = PhaseWindow(device, job["job_id"], setup.attempt, "job", 0,
                                     setup.t_end_s, end)
            else:
                continue
            key = (job["job_id"], meter_name, window.t_end_s)
            if key in self._final_energy:
                figures.append(self._final_energy[key])
                continue
            meter = context["meters"].get((device, meter_name)) or unknown_meter(meter_name)
            gaps = [(a, min(b, latest + 1.0)) for a, b in self.gaps.get((device, meter_name), [])]
            t, w = series.t_s, series.power_w
            idle = device_idle(t, w, idle_phases, gaps) if window.phase != "idle" else None
            energy = figure_for(t, w, window, idle=idle, gaps=gaps, accuracy=meter.accuracy,
                                clock=context["clocks"].get((window.job, window.attempt)))
            figure = {
                "meter": meter_name,
                "meter_kind": meter.kind,
                "phase": window.phase,
                "energy_j": _finite(energy.energy_j),
                "energy_lo_j": _finite(energy.energy_lo_j),
                "energy_hi_j": _finite(energy.energy_hi_j),
                "covered_s": energy.covered_s,
                "duration_s": energy.duration_s,
                "mean_power_w": _finite(energy.mean_power_w),
                "samples": energy.samples,
                "status": energy.status,
                "low_confidence": energy.low_confidence,
                "reason": energy.reason,
                "so_far": done is None,
            }
            if done is not None and latest >= done.t_end_s and not self._idle_pending(
                    device, window):
                self._final_energy[key] = figure
            figures.append(figure)
        return figures

    def _idle_pending(self, device: str, window: PhaseWindow) -> bool:
        """A figure above idle is final only once the device's idle phase is in."""
        return window.phase != "idle" and not any(
            w.device == device and w.phase == "idle" for w in self.phases)

    def run_finished(self) -> bool:
        """No job is pending or running (the page stops showing 'live')."""
        unfinished, total = self.store.unfinished_jobs()
        return total > 0 and unfinished == 0


def _finite(value: float) -> float | None:
    """JSON has no nan: a withheld figure's energy is null."""
    return None if value is None or np.isnan(value) else float(value)


def run_overview(run_dir: Path) -> dict[str, Any]:
    """One line of the run list: devices, jobs by status, first and last time; or the problem."""
    try:
        store = open_store(run_dir)
    except StoreProblem as exc:
        return {"problem": str(exc)}
    try:
        return store.overview()
    except sqlite3.DatabaseError as exc:
        return {"problem": f"{run_dir}: cannot read the store ({exc})"}
    finally:
        store.close()
