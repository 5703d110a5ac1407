"""An emulated board's thermal zone: a sysfs `temp` file whose temperature follows the
CPU load of the device's processes.

A lab device started with `thermal=True` (`harness.lab`) sees its own directory bound
over /sys/class/thermal in its private mount namespace, so the agent reads
`/sys/class/thermal/thermal_zone0/temp` (millidegrees Celsius) exactly as on a Pi: nothing
in the agent knows it is emulated. `ThermalZoneEmulator` writes that file from a first-order
model of the die: it relaxes exponentially, with time constant `tau_s`, towards
`idle_c + rise_c x load`, where load is the utilisation (0..1 of this machine's cores) of the
device's sshd tree (its sessions and agents). It warms while the device works and decays
to its idle temperature when it rests, as a Pi's SoC under its heatsink does.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.meters.base import MeterError
from harness.meters.modeled import ProcessTreeLoad

ZONE = "thermal_zone0"  # the zone a Pi's kernel names for its SoC (cpu-thermal)


@dataclass(frozen=True)
class ThermalModel:
    """The die's idle (ambient-settled) temperature, its rise at full load, its time
    constant."""

    idle_c: float = 45.0
    rise_c: float = 25.0
    tau_s: float = 30.0

    def step(self, temp_c: float, load: float, dt_s: float) -> float:
        """The temperature `dt_s` later under a constant `load` (exact for a first-order
        system, so the step size does not change the curve)."""
        target = self.idle_c + self.rise_c * min(1.0, max(0.0, load))
        return target + (temp_c - target) * math.exp(-dt_s / self.tau_s)


def write_zone(thermal_dir: Path, temp_c: float) -> None:
    """Write the zone's `type` and `temp` as the kernel shows them (an atomic replace: a
    reader never sees half a number)."""
    zone = thermal_dir / ZONE
    zone.mkdir(parents=True, exist_ok=True)
    if not (zone / "type").exists():
        (zone / "type").write_text("cpu-thermal\n")
    partial = zone / ".temp.new"
    partial.write_text(f"{round(temp_c * 1000)}\n")
    os.replace(partial, zone / "temp")


class ThermalZoneEmulator:
    """A thread that steps the model every `period_s` from the load of the process tree
    whose root pid is in `pid_file` (a lab device's sshd; followed across restarts)."""

    def __init__(self, thermal_dir: Path, pid_file: Path, model: ThermalModel = ThermalModel(),
                 period_s: float = 0.25) -> None:
        self.thermal_dir = Path(thermal_dir)
        self.pid_file = Path(pid_file)
        self.model = model
        self.period_s = period_s
        self.temp_c = model.idle_c
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thermal-zone", daemon=True)
        self._pid: int | None = None
        self._load: ProcessTreeLoad | None = None

    def start(self) -> ThermalZoneEmulator:
        write_zone(self.thermal_dir, self.temp_c)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> ThermalZoneEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _utilisation(self) -> float:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            self._pid, self._load = None, None  # the device is down: no load
            return 0.0
        if pid != self._pid:
            try:
                self._load = ProcessTreeLoad(pid)
            except MeterError:
                return 0.0
            self._pid = pid
            return 0.0
        return self._load.utilisation() if self._load is not None else 0.0

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            self.temp_c = self.model.step(self.temp_c, self._utilisation(), now - last)
            last = now
            write_zone(self.thermal_dir, self.temp_c)
