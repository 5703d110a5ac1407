"""Synthetic run stores whose true energy is known analytically, written through `RunStore`.

Power is piecewise constant: the idle level outside jobs, one level per method while
a job runs (held from two sample periods before the job to two after, so every window
edge is interpolated between equal samples and the trapezoid rule is exact). Sample
times are jittered. So the true energy of a window is `level * duration` and above
idle `(level - idle) * duration`, which `SyntheticRun.truth` lists. Options leave
out what a broken run lacks (results, a device's meter) or cut a recorded meter gap.
For tests, notebooks, the report demo and the load benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from harness.store import EventRecord, MemorySample, PlannedJob, RunStore

T0_S = 1_790_000_000.0
# The synthetic meter reads the signal exactly: no accuracy term.
SYNTHETIC_METER = {"name": "synthetic", "type": "synthetic", "kind": "measured",
                   "accuracy": {"relative": 0.0, "offset_w": 0.0,
                                "source": "synthetic: the signal itself, exact"}}
MIB = 2**20


class _Sample(NamedTuple):
    t_host_s: float
    power_w: float
    volts: float | None = None
    amps: float | None = None
    t_meter_s: float | None = None


@dataclass(frozen=True)
class MethodProfile:
    """How a synthetic method behaves: power while training, time, memory, accuracy."""

    power_w: float
    epoch_s: float
    rss_delta_bytes: int
    tensor_bytes: int
    accuracy: float


DEFAULT_METHODS = {
    "standard": MethodProfile(5.0, 4.0, 40 * MIB, 30 * MIB, 0.90),
    "lowmem": MethodProfile(4.5, 5.0, 16 * MIB, 8 * MIB, 0.88),
}


@dataclass
class TruthRow:
    device: str
    job_id: str
    kind: str
    idx: int
    duration_s: float
    energy_j: float
    energy_above_idle_j: float


@dataclass
class SyntheticRun:
    run_dir: Path
    idle_power_w: float
    truth: list[TruthRow] = field(default_factory=list)
    samples: int = 0

    def expected(self, job_id: str, kind: str, idx: int = 0) -> TruthRow:
        for row in self.truth:
            if (row.job_id, row.kind, row.idx) == (job_id, kind, idx):
                return row
        raise KeyError((job_id, kind, idx))


def _times(start: float, end: float, hz: float, rng: np.random.Generator) -> np.ndarray:
    n = math.floor((end - start) * hz)
    base = start + np.arange(n) / hz
    return base + rng.uniform(-0.3, 0.3, n) / hz


def build_synthetic_run(
    run_dir: Path,
    devices: Sequence[str] = ("pi-a",),
    unmetered: Sequence[str] = (),
    methods: dict[str, MethodProfile] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 3,
    batch_size: int = 100,
    steps_per_epoch: int = 10,
    hz: float = 20.0,
    idle_power_w: float = 2.0,
    idle_s: float = 5.0,
    gap: tuple[float, float] | None = None,
    without_results: Sequence[str] = (),
    seed: int = 0,
) -> SyntheticRun:
    """Write a run; `gap` = (start, end) seconds into the first training job of each device
    during which the meter recorded nothing (a recorded meter gap)."""
    methods = methods or DEFAULT_METHODS
    rng = np.random.default_rng(seed)
    out = SyntheticRun(Path(run_dir), idle_power_w)
    store = RunStore.create(Path(run_dir)).start()
    try:
        store.set_run_info(run_id=Path(run_dir).name, created_host_s=T0_S, synthetic=True,
                           meters={d: [SYNTHETIC_METER] for d in devices if d not in unmetered})
        planned = []
        for i, (method, s) in enumerate((m, s) for m in methods for s in seeds):
            planned.append(PlannedJob(
                f"mlp-digits-{method}-b{batch_size}-s{s}-r0", i, "train", method, "mlp",
                "digits", batch_size, epochs, None, s, 0, (), {"method": {"name": method}}))
        for device in devices:
            meter = None if device in unmetered else {"type": "synthetic", "hz": hz}
            store.add_device(device, "synthetic", None, ["synthetic"], meter)
            store.set_device_facts(device, {"cpu_model": "synthetic", "cpu_cores": 4,
                                            "machine": "synthetic"})
            store.add_jobs([_on_device(job, device, len(devices)) for job in planned]
                           + [PlannedJob(f"idle-{device}", -1, "idle", "idle", None, None, None,
                                         None, None, None, None, (device,), {})])
        for device in devices:
            jobs = [_on_device(job, device, len(devices)) for job in planned]
            _write_device(store, out, device, device not in unmetered, jobs, methods, epochs,
                          steps_per_epoch, hz, idle_s, gap, set(without_results), rng)
            store.set_device_status(device, "done")
        store.flush()
        store.write_manifest({"run_id": Path(run_dir).name, "synthetic": True,
                              "devices": list(devices)})
    finally:
        store.close()
    return out


def _on_device(job: PlannedJob, device: str, n_devices: int) -> PlannedJob:
    if n_devices == 1:
        return job
    return PlannedJob(f"{job.job_id}@{device}", job.plan_index, job.kind, job.method, job.model,
                      job.dataset, job.batch_size, job.epochs, job.max_steps, job.seed,
                      job.repeat, (device,), job.spec)


def _write_device(store: RunStore, out: SyntheticRun, device: str, metered: bool,
                  jobs: list[PlannedJob], methods: dict[str, MethodProfile], epochs: int,
                  steps_per_epoch: int, hz: float, idle_s: float,
                  gap: tuple[float, float] | None, without_results: set[str],
                  rng: np.random.Generator) -> None:
    idle_w = out.idle_power_w
    period = 1.0 / hz
    levels: list[tuple[float, float, float]] = []  # (start, end, watts) above the idle floor
    t = T0_S + 1.0
    idle_job = f"idle-{device}"
    store.start_job(idle_job, device, 1, t)
    store.add_phase(device, idle_job, 1, "idle", 0, t, t + idle_s)
    store.finish_job(idle_job, "completed", 0, "ok", t + idle_s)
    store.set_result(idle_job, device, 1, "completed", "idle", {"duration_s": idle_s})
    out.truth.append(TruthRow(device, idle_job, "idle", 0, idle_s, idle_w * idle_s, 0.0))
    t += idle_s + 2.0
    gap_window = None
    for n, job in enumerate(jobs):
        prof = methods[job.method]
        start, end = t, t + epochs * prof.epoch_s
        store.add_clock_offset(device, job.job_id, 1, "before", start - 0.5, 0.0, 0.002, 0.001, 8)
        store.start_job(job.job_id, device, 1, start - 0.5)
        store.add_phase(device, job.job_id, 1, "job", 0, start, end)
        out.truth.append(TruthRow(device, job.job_id, "job", 0, end - start,
                                  prof.power_w * (end - start),
                                  (prof.power_w - idle_w) * (end - start)))
        for e in range(epochs):
            a = start + e * prof.epoch_s
            store.add_phase(device, job.job_id, 1, "epoch", e + 1, a, a + prof.epoch_s)
            out.truth.append(TruthRow(device, job.job_id, "epoch", e + 1, prof.epoch_s,
                                      prof.power_w * prof.epoch_s,
                                      (prof.power_w - idle_w) * prof.epoch_s))
        levels.append((start - 2 * period, end + 2 * period, prof.power_w))
        if gap is not None and n == 0:
            gap_window = (start + gap[0], start + gap[1])
        _write_memory_and_events(store, device, job, prof, start, end, rng)
        store.add_clock_offset(device, job.job_id, 1, "after", end + 0.5, 0.0, 0.002, 0.001, 8)
        store.finish_job(job.job_id, "completed", 0, "ok", end + 0.5)
        if job.job_id not in without_results:
            accuracy = prof.accuracy + 0.01 * math.sin(1.0 + (job.seed or 0))
            steps = epochs * steps_per_epoch
            store.set_result(job.job_id, device, 1, "completed", job.method, {
                "test_accuracy": accuracy, "train_accuracy": accuracy + 0.02,
                "test_loss": 1.0 - accuracy, "epochs": epochs, "steps": steps,
                "mean_epoch_s": prof.epoch_s, "seconds_total": end - start + 1.0,
                "peak_tensor_bytes": prof.tensor_bytes,
                "peak_hwm_bytes": prof.rss_delta_bytes + 200 * MIB,
                "peak_rss_delta_bytes": prof.rss_delta_bytes + (job.seed or 0) * 1024,
            })
        t = end + 2.0
    if not metered:
        return
    times = _times(T0_S, t + 1.0, hz, rng)
    power = np.full(times.size, idle_w)
    for lo, hi, watts in levels:
        power[(times >= lo) & (times <= hi)] = watts
    if gap_window is not None:
        keep = (times < gap_window[0]) | (times > gap_window[1])
        times, power = times[keep], power[keep]
        store.add_meter_gap(device, "synthetic", gap_window[0], gap_window[1], "serial timeout")
    write_power(store, device, "synthetic", times, power)
    store.set_meter_stats(device, "synthetic", int(times.size), hz, 0, int(gap_window is not None))
    out.samples += int(times.size)


def write_power(store: RunStore, device: str, meter: str, times: np.ndarray,
                power: np.ndarray, chunk: int = 500_000) -> None:
    """Hand samples to the store in chunks, committing each before the next is built."""
    for lo in range(0, times.size, chunk):
        store.add_power_samples(device, meter, _samples(times[lo:lo + chunk],
                                                        power[lo:lo + chunk]))
        store.flush(timeout_s=300.0)


def _samples(times: np.ndarray, power: np.ndarray) -> Iterator[_Sample]:
    return map(_Sample, times.tolist(), power.tolist())


def _write_memory_and_events(store: RunStore, device: str, job: PlannedJob,
                             prof: MethodProfile, start: float, end: float,
                             rng: np.random.Generator) -> None:
    samples = []
    for seq, ts in enumerate(np.linspace(start, end, 8)):
        frac = seq / 7
        samples.append(MemorySample(
            device, job.job_id, 1, seq, float(ts), float(ts), int(ts * 1e9),
            int(100 * MIB + frac * prof.rss_delta_bytes),
            int(100 * MIB + frac * prof.rss_delta_bytes), int(400 * MIB),
            int(frac * prof.tensor_bytes), seq))
    store.add_memory_samples(samples)
    store.add_events([
        EventRecord(device, job.job_id, 1, 0, '{"kind": "job_start"}', start, seq=0,
                    kind="job_start", t_host_s=start),
        EventRecord(device, job.job_id, 1, 1, '{"kind": "job_end"}', end, seq=1,
                    kind="job_end", t_host_s=end),
    ])
