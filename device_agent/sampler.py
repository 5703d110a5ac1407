"""Background samplers of the agent: process memory, the board's temperature and throttling,
and, on a Pi 5, on-board power.

Each sampler is a daemon thread that wakes at its rate, reads, and emits one
event; it runs apart from the training it measures and stops in a fixed order
(stop event, join with a timeout). Reading /proc/self/status costs tens of
microseconds, so the default 10 Hz is far below 1 % of a step
(`benchmarks/agent_overhead.py` measures it).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract.events import Board, Memory, Power
from device_agent.events import EventWriter
from trainers.procmem import read_memory

THERMAL_PATH = Path("/sys/class/thermal/thermal_zone0/temp")
# Raspberry Pi OS kernels expose the firmware's throttling word here (Pi 4: soc/soc:firmware,
# Pi 5: soc@107c000000/...:firmware); `vcgencmd get_throttled` is the fallback.
THROTTLED_GLOBS = ("/sys/devices/platform/soc/soc:firmware/get_throttled",
                   "/sys/devices/platform/*/*firmware/get_throttled")
# `vcgencmd get_throttled` bits: now (0-3) and since boot (16-19).
THROTTLED_BITS = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled",
                  3: "soft temperature limit", 16: "under-voltage occurred",
                  17: "arm frequency capping occurred", 18: "throttling occurred",
                  19: "soft temperature limit occurred"}
# The agent's own reads of the board may take at most this share of one core.
SAMPLER_CPU_SHARE = 0.01

@dataclass
class CommandRun:
    """One run of a helper program (vcgencmd): its output and what it cost."""

    stdout: str
    cpu_s: float  # user + system time of the child itself (os.wait4's rusage)
    wall_s: float
    ok: bool


def run_measured(argv: list[str], timeout_s: float = 2.0) -> CommandRun:
    """Run `argv`, capture stdout, and measure the child's own CPU time (wait4's rusage,
    so other threads' children never count)."""
    start = time.perf_counter()
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, write_fd, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_CLOSE, read_fd),
        ])
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return CommandRun("", 0.0, time.perf_counter() - start, ok=False)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([pipe], [], [], left)
            if not ready:
                break
            chunk = pipe.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    if time.monotonic() >= deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    _, status, usage = os.wait4(pid, 0)
    return CommandRun(b"".join(chunks).decode("utf-8", "replace"),
                      usage.ru_utime + usage.ru_stime, time.perf_counter() - start,
                      ok=os.waitstatus_to_exitcode(status) == 0)


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
        self.peak_tensor_bytes: int | None = None  # set by the job from the engine's step records
        self.peak_rss_bytes = 0

    def sample(self) -> None:
        reading = read_memory()
        self.peak_rss_bytes = max(self.peak_rss_bytes, reading.rss_bytes or 0)
        self._writer.emit(Memory(
            rss_bytes=reading.rss_bytes,
            hwm_bytes=reading.hwm_bytes,
            vm_bytes=reading.vm_bytes,
            peak_tensor_bytes=self.peak_tensor_bytes,
            step=self.step,
        ))


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    values = [float(v) for v in fields[:8]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_frequency_fraction() -> float | None:
    """Mean current / maximum frequency over the CPUs that report them (cpufreq), else None."""
    fractions = []
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"):
        try:
            current = float((cpu / "scaling_cur_freq").read_text())
            maximum = float((cpu / "cpuinfo_max_freq").read_text())
        except (OSError, ValueError):
            continue
        if maximum > 0:
            fractions.append(min(1.0, current / maximum))
    return sum(fractions) / len(fractions) if fractions else None


class ModeledPowerSampler(PeriodicSampler):
    """The `modeled` power source where the load is: emits `power` events (source
    `modeled`, `modeled: true`) from this device's own CPU utilisation over each period and
    its frequency: idle_w + (busy_w - idle_w) x utilisation x frequency fraction (1 where
    cpufreq is absent). Each reading is the mean over the period before it (`interval_s`);
    the host stamps it at the period's middle. An estimate, always labelled so."""

    name = "modeled-power-sampler"
    source = "modeled"

    def __init__(self, writer: EventWriter, hz: float, idle_w: float, busy_w: float,
                 profile: str) -> None:
        super().__init__(hz)
        self._writer = writer
        self.idle_w, self.busy_w, self.profile = idle_w, busy_w, profile
        self._previous = cpu_times()
        self._previous_t = time.monotonic()

    def sample(self) -> None:
        now, current = time.monotonic(), cpu_times()
        elapsed_s = now - self._previous_t
        previous, self._previous, self._previous_t = self._previous, current, now
        if current is None or previous is None or current[1] <= previous[1]:
            return
        utilisation = min(1.0, max(0.0, (current[0] - previous[0]) / (current[1] - previous[1])))
        frequency = cpu_frequency_fraction()
        load = utilisation * (frequency if frequency is not None else 1.0)
        self._writer.emit(Power(
            source="modeled",
            modeled=True,
            power_w=self.idle_w + (self.busy_w - self.idle_w) * load,
            utilisation=utilisation,
            frequency_fraction=frequency,
            interval_s=elapsed_s,
            profile=self.profile,
        ))


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
    """Raspberry Pi 5 on-board power: emits `power` events with source `pmic`.

    Each read is one `vcgencmd pmic_read_adc` process; its own CPU time is measured
    (`run_measured`) and the period stretched so that reading costs at most
    `SAMPLER_CPU_SHARE` (1 %) of one core: period >= CPU per read / 0.01, from a running
    average of the reads so far. `power_hz` is the fastest it may go.

    What it sums is the PMIC's output rails (core, DDR, 3.3 V, 1.8 V, ...), after its own
    regulators: not the board's input power. The 5 V input feeds the USB ports, the fan and
    HATs directly, and the regulators' losses are not on any rail, so the sum is lower than
    what a USB meter in front of the Pi reads (by about a watt at rest on a Pi 5).
    """

    name = "pmic-sampler"
    source = "pmic"

    def __init__(self, writer: EventWriter, hz: float, vcgencmd: str) -> None:
        super().__init__(hz)
        self._writer = writer
        self._vcgencmd = vcgencmd
        self._fastest_s = 1.0 / hz
        self.reads = 0
        self.cpu_s = 0.0
        self.mean_cpu_s: float | None = None

    @classmethod
    def available(cls, pi_model: str | None) -> str | None:
        """The vcgencmd path on a Pi 5, else None."""
        if pi_model and "Raspberry Pi 5" in pi_model:
            return shutil.which("vcgencmd")
        return None

    @property
    def cpu_share(self) -> float | None:
        """CPU per read over the current period (what reading costs one core)."""
        return None if self.mean_cpu_s is None else self.mean_cpu_s / self._period_s

    def sample(self) -> None:
        run = run_measured([self._vcgencmd, "pmic_read_adc"])
        self.reads += 1
        self.cpu_s += run.cpu_s
        self.mean_cpu_s = (run.cpu_s if self.mean_cpu_s is None
                           else 0.7 * self.mean_cpu_s + 0.3 * run.cpu_s)
        self._period_s = max(self._fastest_s, self.mean_cpu_s / SAMPLER_CPU_SHARE)
        power_w, rails = parse_pmic_adc(run.stdout)
        if rails:
            self._writer.emit(Power(source="pmic", power_w=power_w, rails=len(rails),
                                    read_cpu_s=round(run.cpu_s, 6),
                                    period_s=round(self._period_s, 3)))


def decode_throttled(value: int) -> list[str]:
    """The names of the bits set in the firmware's throttling word."""
    return [name for bit, name in THROTTLED_BITS.items() if value >> bit & 1]


@dataclass
class BoardState:
    """What the board said during a job: hottest temperature, every throttling bit seen."""

    temp_max_c: float | None = None
    throttled_bits: int = 0
    readings: int = 0
    sources: set[str] = field(default_factory=set)

    def to_metrics(self) -> dict[str, object]:
        return {
            "cpu_temp_max_c": self.temp_max_c,
            "throttled_bits": None if not self.sources else hex(self.throttled_bits),
            "throttled": ", ".join(decode_throttled(self.throttled_bits)) or None,
        }


class BoardStateSampler(PeriodicSampler):
    """Temperature and throttling of the board, at most once a second: `board` events.

    Temperature from the thermal zone (sysfs, any Linux board); the throttling word from
    the firmware's sysfs file where the kernel has it, else `vcgencmd get_throttled` (a
    process per read, measured and kept under 1 % of a core like the PMIC's).
    """

    name = "board-sampler"
    MAX_HZ = 1.0

    def __init__(self, writer: EventWriter, hz: float = MAX_HZ,
                 thermal: Path = THERMAL_PATH, throttled_file: Path | None = None,
                 vcgencmd: str | None = None) -> None:
        super().__init__(min(hz, self.MAX_HZ))
        self._writer = writer
        self._fastest_s = self._period_s
        self._thermal = thermal
        self._throttled_file = throttled_file
        self._vcgencmd = vcgencmd
        self.state = BoardState()
        self._mean_cpu_s = 0.0

    @classmethod
    def for_this_board(cls, writer: EventWriter) -> BoardStateSampler | None:
        """A sampler for what this board has, or None when it has nothing to read."""
        throttled = next((Path(p) for pattern in THROTTLED_GLOBS
                          for p in sorted(Path("/").glob(pattern.lstrip("/")))), None)
        vcgencmd = None if throttled else shutil.which("vcgencmd")
        if not THERMAL_PATH.exists() and throttled is None and vcgencmd is None:
            return None
        return cls(writer, throttled_file=throttled, vcgencmd=vcgencmd)

    def _throttled(self) -> tuple[int | None, str | None]:
        if self._throttled_file is not None:
            try:
                return int(self._throttled_file.read_text().strip(), 16), "sysfs"
            except (OSError, ValueError):
                return None, None
        if self._vcgencmd is not None:
            run = run_measured([self._vcgencmd, "get_throttled"])
            self._mean_cpu_s = 0.7 * self._mean_cpu_s + 0.3 * run.cpu_s
            self._period_s = max(self._fastest_s, self._mean_cpu_s / SAMPLER_CPU_SHARE)
            _, _, value = run.stdout.strip().partition("=")
            try:
                return int(value, 16), "vcgencmd"
            except ValueError:
                return None, None
        return None, None

    def sample(self) -> None:
        temp_c = None
        with contextlib.suppress(OSError, ValueError):
            temp_c = int(self._thermal.read_text().strip()) / 1000.0
        throttled, source = self._throttled()
        state = self.state
        state.readings += 1
        if temp_c is not None:
            state.temp_max_c = temp_c if state.temp_max_c is None else max(state.temp_max_c,
                                                                            temp_c)
        if throttled is not None and source is not None:
            state.throttled_bits |= throttled
            state.sources.add(source)
        self._writer.emit(Board(temp_c=temp_c,
                                throttled=None if throttled is None else hex(throttled),
                                throttled_now=decode_throttled((throttled or 0) & 0xF) or None,
                                source=source))
