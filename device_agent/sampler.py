"""Background samplers of the agent: process memory and, on a Pi 5, on-board power.

Each sampler is a daemon thread that wakes at its rate, reads, and emits one
event; it runs apart from the training it measures and stops in a fixed order
(stop event, join with a timeout). Reading /proc/self/status costs tens of
microseconds, so the default 10 Hz is far below 1 % of a step
(`benchmarks/agent_overhead.py` measures it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from device_agent.events import EventWriter

STATUS_PATH = Path("/proc/self/status")
CLEAR_REFS_PATH = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryReading:
    rss_bytes: int | None
    hwm_bytes: int | None
    vm_bytes: int | None


def read_memory() -> MemoryReading:
    """VmRSS, VmHWM and VmSize of this process from /proc (psutil's RSS elsewhere)."""
    values: dict[str, int] = {}
    try:
        with STATUS_PATH.open("rb") as status:
            for line in status:
                if line.startswith((b"VmRSS:", b"VmHWM:", b"VmSize:")):
                    key, amount, _unit = line.split()
                    values[key[:-1].decode()] = int(amount) * 1024
    except OSError:
        import psutil

        info = psutil.Process().memory_info()
        return MemoryReading(info.rss, None, info.vms)
    return MemoryReading(values.get("VmRSS"), values.get("VmHWM"), values.get("VmSize"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the job's own."""
    try:
        CLEAR_REFS_PATH.write_text("5")
    except OSError:
        return False
    return True


class PeriodicSampler:
    """A daemon thread calling `sample()` every 1/hz seconds until `stop()`."""

    name = "sampler"

    def __init__(self, hz: float) -> None:
        self._period_s = 1.0 / hz
        self._stop = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def start(self) -> None:
        """Create the thread now (before memory limits apply); it samples after `begin()`."""
        self._thread.start()

    def begin(self) -> None:
        """Start sampling (after `job_start`, so that no sample precedes it)."""
        self._go.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._go.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        self._go.wait()
        if self._stop.is_set():
            return
        self.sample()  # one reading at the start, so even a short job has one
        while not self._stop.wait(self._period_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class MemorySampler(PeriodicSampler):
    """Emits `memory` events: RSS, VmHWM and the engine's tensor-level peak of the last step."""

    name = "memory-sampler"

    def __init__(self, writer: EventWriter, hz: float) -> None:
        super().__init__(hz)
        self._writer = writer
        self.step: int | None = None
        self.tensor_peak_bytes: int | None = None  # set by the job from the engine's step records
        self.peak_rss_bytes = 0

    def sample(self) -> None:
        reading = read_memory()
        self.peak_rss_bytes = max(self.peak_rss_bytes, reading.rss_bytes or 0)
        self._writer.emit(
            "memory",
            rss_bytes=reading.rss_bytes,
            hwm_bytes=reading.hwm_bytes,
            vm_bytes=reading.vm_bytes,
            tensor_peak_bytes=self.tensor_peak_bytes,
            step=self.step,
        )


_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-0-9.eE+]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> tuple[float, dict[str, float]]:
    """Total power (W) and per-rail power from `vcgencmd pmic_read_adc` output.

    Each rail prints a current line `NAME_A current(i)=xA` and a voltage line
    `NAME_V volt(j)=yV`; rails with both are summed as V x I.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            rail, unit, value = match.groups()
            (amps if unit == "A" else volts)[rail] = float(value)
    rails = {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}
    return sum(rails.values()), rails


class PmicSampler(PeriodicSampler):
    """Raspberry Pi 5 on-board power: emits `power` events with source `pmic`."""

    name = "pmic-sampler"

    def __init__(self, writer: EventWriter, hz: float, vcgencmd: str) -> None:
        super().__init__(hz)
        self._writer = writer
        self._vcgencmd = vcgencmd

    @classmethod
    def available(cls, pi_model: str | None) -> str | None:
        """The vcgencmd path on a Pi 5, else None."""
        if pi_model and "Raspberry Pi 5" in pi_model:
            return shutil.which("vcgencmd")
        return None

    def sample(self) -> None:
        try:
            out = subprocess.run(
                [self._vcgencmd, "pmic_read_adc"], capture_output=True, text=True, timeout=2
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return
        power_w, rails = parse_pmic_adc(out)
        if rails:
            self._writer.emit("power", source="pmic", power_w=power_w, rails=len(rails))
