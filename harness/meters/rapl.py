"""Intel/AMD RAPL: package energy counters under /sys/class/powercap (x86 hosts).

`energy_uj` is a counter that wraps at `max_energy_range_uj`; power is the difference of
two reads over the host's monotonic interval. Usually readable by root only: the driver
says so instead of yielding nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from harness.meters.base import MeterError, PowerSample, host_now

POWERCAP_ROOT = Path("/sys/class/powercap")
# No datasheet bounds RAPL's counters (on many parts they are modeled by the CPU itself).
ACCURACY: dict[str, object] = {
    "relative": 0.05, "offset_w": 0.0, "assumed": True,
    "source": "assumed ±5 %: Intel/AMD publish no accuracy bound for RAPL energy counters",
}


def energy_delta_uj(previous_uj: int, current_uj: int, max_range_uj: int) -> int:
    """Energy between two counter reads, across at most one wrap-around."""
    if current_uj >= previous_uj:
        return current_uj - previous_uj
    return max_range_uj - previous_uj + current_uj


@dataclass(frozen=True)
class RaplZone:
    name: str
    energy_path: Path
    max_range_uj: int


def package_zones(root: Path = POWERCAP_ROOT) -> list[RaplZone]:
    """The top-level (package) zones, `intel-rapl:N` without sub-zones, that are readable."""
    zones = []
    for directory in sorted(root.glob("intel-rapl:*")):
        if directory.name.count(":") != 1:
            continue
        energy = directory / "energy_uj"
        try:
            energy.read_text()
            max_range = int((directory / "max_energy_range_uj").read_text())
            label = (directory / "name").read_text().strip()
        except (OSError, ValueError):
            continue
        zones.append(RaplZone(f"{directory.name}:{label}", energy, max_range))
    return zones


def rapl_readable(root: Path = POWERCAP_ROOT) -> bool:
    return bool(package_zones(root))


class RaplMeter:
    """Total package power of the host from RAPL counters, one sample per `interval_s`."""

    def __init__(
        self, root: Path | str = POWERCAP_ROOT, interval_s: float = 0.1, name: str = "rapl"
    ) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        self.nominal_hz = 1.0 / interval_s
        self.name = name
        self.rejected_records = 0
        self._zones: list[RaplZone] = []
        self._previous: list[int] = []
        self._previous_ns = 0
        self._seq = 0

    def _read_counters(self) -> list[int]:
        try:
            return [int(zone.energy_path.read_text()) for zone in self._zones]
        except (OSError, ValueError) as exc:
            raise MeterError(f"RAPL counter unreadable: {exc}") from exc

    def connect(self) -> None:
        self._zones = package_zones(self.root)
        if not self._zones:
            raise MeterError(
                f"no readable RAPL package zone under {self.root} (energy_uj is usually root-only)"
            )
        self._previous = self._read_counters()
        self._previous_ns = time.monotonic_ns()

    def close(self) -> None:
        self._zones = []

    def read(self) -> list[PowerSample]:
        time.sleep(max(0.0, self.interval_s - (time.monotonic_ns() - self._previous_ns) / 1e9))
        counters = self._read_counters()
        t_host_s, t_mono_ns = host_now()
        interval_s = (t_mono_ns - self._previous_ns) / 1e9
        energy_uj = sum(
            energy_delta_uj(before, after, zone.max_range_uj)
            for before, after, zone in zip(self._previous, counters, self._zones, strict=True)
        )
        self._previous, self._previous_ns = counters, t_mono_ns
        if interval_s <= 0:
            return []
        self._seq += 1
        # The power is the mean over the interval: stamp it at the interval's middle.
        half_ns = int(interval_s * 1e9) // 2
        return [
            PowerSample(
                t_host_s - half_ns / 1e9,
                t_mono_ns - half_ns,
                energy_uj * 1e-6 / interval_s,
                seq=self._seq,
            )
        ]
