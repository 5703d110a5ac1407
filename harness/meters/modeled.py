"""The `modeled` source: power estimated from CPU utilisation through a device profile.

Power = idle + (busy - idle) x utilisation, per device profile. Utilisation is that of
the whole machine, or of one process tree (a training job and its children). Every
sample is marked `modeled=True`: an estimate, never to be mixed silently with
measured power.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from harness.meters.base import MeterError, PowerSample, host_now


@dataclass(frozen=True)
class PowerProfile:
    """Board power at rest and with every core busy, at its supply voltage.

    The built-in figures are rough defaults for a bare board (no peripherals, Ethernet up,
    HDMI off), at rest and under `stress --cpu <cores>`: pi3b+ and pi4 as published in the
    Raspberry Pi Dramble power benchmarks (Pi 4: 540 mA / 1280 mA at 5 V), pi5 and host are
    estimates. Your board's own idle and busy watts (from a real meter: an idle baseline and
    a stress run) go in the inventory as `idle_w` / `busy_w`. Modeled power is labelled so
    either way.
    """

    name: str
    idle_w: float
    busy_w: float
    supply_volts: float = 5.1

    def power_w(self, utilisation: float) -> float:
        utilisation = min(1.0, max(0.0, utilisation))
        return self.idle_w + (self.busy_w - self.idle_w) * utilisation


# A model's figures are estimates: the class is an assumption, not a measurement.
ACCURACY: dict[str, object] = {
    "relative": 0.25, "offset_w": 0.0, "assumed": True,
    "source": "assumed ±25 %: modeled from CPU utilisation through a device profile, not "
              "measured (calibrate idle_w/busy_w against a real meter)",
}

POWER_PROFILES: dict[str, PowerProfile] = {
    "pi3b+": PowerProfile("pi3b+", idle_w=1.9, busy_w=5.1),
    "pi4": PowerProfile("pi4", idle_w=2.7, busy_w=6.4),
    "pi5": PowerProfile("pi5", idle_w=2.7, busy_w=7.5),
    "host": PowerProfile("host", idle_w=15.0, busy_w=45.0, supply_volts=19.0),
}


class ProcessTreeLoad:
    """CPU utilisation (0..1 of all cores) of a process tree, or of the whole machine.

    Works from CPU-time differences between calls: a process's time is counted while it
    lives and, once reaped, through its parent's `children_*` times, so short-lived
    children are not missed.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self._cores = psutil.cpu_count() or 1
        self._previous: dict[int, float] = {}
        self._previous_t = time.monotonic()
        if pid is None:
            psutil.cpu_percent(interval=None)
        else:
            try:
                self._root = psutil.Process(pid)
            except psutil.Error as exc:
                raise MeterError(f"no process {pid} to follow: {exc}") from exc
            self._previous = self._tree_times()

    def _tree_times(self) -> dict[int, float]:
        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return {}
        times = {}
        for process in processes:
            try:
                cpu = process.cpu_times()
            except psutil.Error:
                continue
            times[process.pid] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
        return times

    def utilisation(self) -> float:
        now = time.monotonic()
        elapsed = max(now - self._previous_t, 1e-6)
        if self.pid is None:
            self._previous_t = now
            return psutil.cpu_percent(interval=None) / 100.0
        current = self._tree_times()
        busy_s = sum(
            max(0.0, total - self._previous.get(pid, 0.0)) for pid, total in current.items()
        )
        self._previous, self._previous_t = current, now
        return min(1.0, busy_s / elapsed / self._cores)


class ModeledMeter:
    """A meter that models power from CPU load, one sample per `interval_s`.

    The load of a read is the mean over the time since the previous read, from cumulative
    CPU-time counters, so a read that comes late (this thread was not scheduled: the job
    and the harness's own work share the cores) still knows the mean over the whole late
    period exactly. It returns one sample per interval that period spans, each with that
    mean and stamped at its interval's middle, instead of one sample and a hole in time
    followed by a burst of near-empty reads; the energy over the period is the same, only
    its distribution inside it is not resolved (a modeled figure either way).
    """

    def __init__(
        self,
        profile: PowerProfile,
        pid: int | None = None,
        interval_s: float = 0.5,
        name: str = "modeled",
    ) -> None:
        self.profile = profile
        self.pid = pid
        self.interval_s = interval_s
        self.nominal_hz = 1.0 / interval_s
        self.name = name
        self.rejected_records = 0
        self._load: ProcessTreeLoad | None = None
        self._next = 0.0
        self._last_read = 0.0
        self._seq = 0

    def connect(self) -> None:
        self._load = ProcessTreeLoad(self.pid)
        self._last_read = time.monotonic()
        self._next = self._last_read + self.interval_s

    def close(self) -> None:
        self._load = None

    def read(self) -> list[PowerSample]:
        if self._load is None:
            raise MeterError("modeled meter is not connected")
        time.sleep(max(0.0, self._next - time.monotonic()))
        power_w = self.profile.power_w(self._load.utilisation())
        t_host_s, t_mono_ns = host_now()
        now = time.monotonic()
        period_s = max(now - self._last_read, self.interval_s)
        intervals = max(1, round(period_s / self.interval_s))
        self._last_read = now
        self._next = max(self._next + self.interval_s, now + self.interval_s / 2)
        step_s = period_s / intervals
        samples = []
        for i in range(intervals):  # the middle of each interval the period spans
            back_s = (intervals - i - 0.5) * step_s
            self._seq += 1
            samples.append(PowerSample(
                t_host_s=t_host_s - back_s,
                t_mono_ns=t_mono_ns - int(back_s * 1e9),
                power_w=power_w,
                volts=self.profile.supply_volts,
                amps=power_w / self.profile.supply_volts,
                seq=self._seq,
                modeled=True,
            ))
        return samples


def default_profile() -> PowerProfile:
    """The profile of the machine this runs on: a Pi model from the device tree, else host."""
    try:
        with open("/proc/device-tree/model", encoding="utf-8", errors="replace") as handle:
            model = handle.read()
    except OSError:
        return POWER_PROFILES["host"]
    for marker, key in (("Pi 5", "pi5"), ("Pi 4", "pi4"), ("Pi 3 Model B Plus", "pi3b+")):
        if marker in model:
            return POWER_PROFILES[key]
    return POWER_PROFILES["host"]
