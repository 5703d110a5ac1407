"""`/metrics`: the fleet in the Prometheus text format, for a lab's existing Prometheus/Grafana.

One `RunMetrics` per run follows its store with the dashboard's `StoreFollower` (only
new rows are read per scrape) and renders, through the official `prometheus_client`:

- `bnn_device_power_watts{run, device, meter}`: the latest power sample (gauge);
  `bnn_device_power_sample_time_seconds`: when it was taken (host clock);
- `bnn_device_energy_joules_total{run, device, meter}`: energy of the device's jobs so
  far, idle baseline included (counter);
- `bnn_job_energy_joules{run, device, job, method, meter}`: one job's window, so far while
  it runs; `bnn_job_energy_low_confidence`: 1 when it rests on too few samples or gaps;
- `bnn_device_memory_{rss,hwm,peak_tensor}_bytes{run, device}`: the latest memory sample;
- `bnn_device_state{run, device, bnn_device_state}`: planned, running, done, lost,
  unreachable, error (state set); `bnn_device_{epoch,step,loss}{run, device, job}`;
- `bnn_jobs{run, status}`: jobs by status; `bnn_meter_{samples,gaps}_total{run, device,
  meter}` (counters).

Energy figures come from `analysis.run_energy.figure_for` (the follower's per-job
figures: gaps bridged, or the figure withheld), the same the dashboard and the report
show. Which runs are exported: the served run, or of a runs directory the runs not
finished plus the newest (`/metrics?run=ID` picks runs by id).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, StateSetMetricFamily

from harness.dashboard.follow import StoreFollower, StoreProblem
from runstore.schema import DB_NAME

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEVICE_STATES = ("planned", "running", "done", "lost", "unreachable", "error")
LIVE_WITHIN_S = 600.0
JOB_STATUSES = ("pending", "running", "completed", "failed", "oom", "interrupted",
                "incomplete", "skipped")


class RunMetrics:
    """The metrics of one run, from a follower that keeps its place in the store."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.follower: StoreFollower | None = None
        self.memory: dict[str, list[Any]] = {}  # device -> latest [job, t, rss, hwm, tensor]
        self.lock = threading.Lock()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None

    def update(self) -> dict[str, Any] | None:
        """Read what is new; the follower's summary, or None while the store is not readable."""
        with self.lock:
            if self.follower is None:
                try:
                    self.follower = StoreFollower(self.run_dir)
                except StoreProblem:
                    return None
            while True:
                rows, more = self.follower.poll()
                for device, job, t_s, rss, hwm, tensor in rows["memory"]:
                    self.memory[device] = [job, t_s, rss, hwm, tensor]
                if not more:
                    break
            summary = self.follower.summary()
            summary["finished"] = self.follower.run_finished()
            return summary

    def families(self) -> list[Any]:
        summary = self.update()
        if summary is None:
            return []
        run = self.run_dir.name
        follower = self.follower
        assert follower is not None
        power = GaugeMetricFamily("bnn_device_power_watts", "Latest power sample (W)",
                                  labels=["run", "device", "meter"])
        power_t = GaugeMetricFamily("bnn_device_power_sample_time_seconds",
                                    "Host time of the latest power sample (s since the epoch)",
                                    labels=["run", "device", "meter"])
        for (device, meter), series in sorted(follower.series.items()):
            if series.size:
                power.add_metric([run, device, meter], float(series.power_w[-1]))
                power_t.add_metric([run, device, meter], float(series.t_s[-1]))
        device_energy = CounterMetricFamily(
            "bnn_device_energy_joules", "Energy of the device's jobs so far, idle baseline "
            "included, gaps excluded (J)", labels=["run", "device", "meter"])
        job_energy = GaugeMetricFamily(
            "bnn_job_energy_joules", "Energy of the job's window, so far while it runs (J)",
            labels=["run", "device", "job", "method", "meter"])
        low = GaugeMetricFamily(
            "bnn_job_energy_low_confidence", "1: the job's energy rests on too few samples "
            "or on gaps (see the report)", labels=["run", "device", "job", "method", "meter"])
        totals: dict[tuple[str, str], float] = {}
        statuses = dict.fromkeys(JOB_STATUSES, 0)
        for job in summary["jobs"]:
            statuses[job["status"]] = statuses.get(job["status"], 0) + 1
            for figure in job["energy"]:
                if figure["energy_j"] is None or not math.isfinite(figure["energy_j"]):
                    continue
                labels = [run, job["device"], job["job_id"], job["method"] or "", figure["meter"]]
                job_energy.add_metric(labels, figure["energy_j"])
                low.add_metric(labels, 1.0 if figure["low_confidence"] else 0.0)
                key = (job["device"], figure["meter"])
                totals[key] = totals.get(key, 0.0) + figure["energy_j"]
        for (device, meter), joules in sorted(totals.items()):
            device_energy.add_metric([run, device, meter], joules)
        jobs = GaugeMetricFamily("bnn_jobs", "Jobs of the run by status",
                                 labels=["run", "status"])
        for status, count in statuses.items():
            jobs.add_metric([run, status], count)
        return [power, power_t, device_energy, job_energy, low, jobs,
                *self._memory_families(run), *self._device_families(run, summary)]

    def _memory_families(self, run: str) -> list[Any]:
        names = ("rss", "resident set size"), ("hwm", "peak resident set size (VmHWM)"), (
            "peak_tensor", "tensor-level peak of the engine's ledger")
        families = []
        for index, (name, what) in enumerate(names, start=2):
            family = GaugeMetricFamily(f"bnn_device_memory_{name}_bytes",
                                       f"Latest memory sample: {what} (bytes)",
                                       labels=["run", "device"])
            for device, sample in sorted(self.memory.items()):
                if sample[index] is not None:
                    family.add_metric([run, device], float(sample[index]))
            families.append(family)
        return families

    def _device_families(self, run: str, summary: dict[str, Any]) -> list[Any]:
        state = StateSetMetricFamily("bnn_device_state", "The device's state in the run",
                                     labels=["run", "device"])
        progress = {name: GaugeMetricFamily(f"bnn_device_{name}", f"The running job's {name}",
                                            labels=["run", "device", "job"])
                    for name in ("epoch", "step", "loss")}
        for device in summary["devices"]:
            name = device["name"]
            state.add_metric([run, name], {s: device["status"] == s for s in DEVICE_STATES})
            current = device["progress"]
            if current.get("job_id") and current.get("state") == "running":
                for key, family in progress.items():
                    value = current.get(key)
                    if isinstance(value, (int, float)):
                        family.add_metric([run, name, current["job_id"]], float(value))
        samples = CounterMetricFamily("bnn_meter_samples", "Power samples stored per meter",
                                      labels=["run", "device", "meter"])
        gaps = CounterMetricFamily("bnn_meter_gaps", "Meter gaps (silences) recorded",
                                   labels=["run", "device", "meter"])
        for row in summary["meter_stats"]:
            labels = [run, row["device"], row["meter"]]
            samples.add_metric(labels, float(row["samples"] or 0))
            gaps.add_metric(labels, float(row["gaps"] or 0))
        return [state, *progress.values(), samples, gaps]


class FleetMetrics:
    """The `/metrics` answer for a dashboard server: one `RunMetrics` per exported run."""

    def __init__(self) -> None:
        self.runs: dict[Path, RunMetrics] = {}
        self.lock = threading.Lock()

    def render(self, runs: dict[str, Path], wanted: list[str] | None = None) -> bytes:
        chosen = self._choose(runs, wanted)
        with self.lock:
            for path in chosen:
                if path not in self.runs:
                    self.runs[path] = RunMetrics(path)
            metrics = [self.runs[path] for path in chosen]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collect(metrics))
        return generate_latest(registry)

    def _choose(self, runs: dict[str, Path], wanted: list[str] | None) -> list[Path]:
        if wanted:
            return [path for name, path in runs.items() if name in wanted]
        if len(runs) <= 1:
            return list(runs.values())
        newest = max(runs.values(), key=_mtime)
        live = [path for path in runs.values() if path in self.runs or _maybe_live(path)]
        return sorted({newest, *live}, key=lambda p: p.name)

    def close(self) -> None:
        with self.lock:
            for metrics in self.runs.values():
                metrics.close()
            self.runs.clear()


class _Collect:
    """A prometheus_client collector over some runs."""

    def __init__(self, metrics: list[RunMetrics]) -> None:
        self.metrics = metrics

    def collect(self):
        merged: dict[str, Any] = {}
        for run in self.metrics:
            for family in run.families():
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _maybe_live(path: Path) -> bool:
    """A run whose store changed in the last ten minutes may still be running."""
    files = (path / DB_NAME, path / f"{DB_NAME}-wal")
    return any(time.time() - _mtime(p) < LIVE_WITHIN_S for p in files if p.exists())
