"""Meter emulators on real pseudo-terminals, byte for byte on each wire protocol.

An emulator owns a pty whose slave end is reachable at a stable symlink; the real
driver opens that path with pyserial exactly as it would open /dev/rfcomm0 or
/dev/ttyACM0. It follows a power signal (constant, a recorded trace, or the CPU load of a
process tree through a device power profile), can log the signal it emits, and injects
faults: torn records, corrupt bytes, bad checksums, stalls, and the port disappearing and
reappearing (the pty is closed and a new one is linked at the same path), and a link
that goes silent without an error until the host opens the port again (a Bluetooth rfcomm
link whose meter rebooted or walked out of range).
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import select
import tempfile
import termios
import threading
import time
import tty
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np

from harness.errors import HarnessUsageError
from harness.meters.modeled import PowerProfile, ProcessTreeLoad
from harness.meters.um import POLL, RECORD_BYTES, UM_MODELS, encode_record


class Signal(Protocol):
    """The power the emulated load draws now, in watts."""

    def power_w(self) -> float: ...


@dataclass
class ConstantSignal:
    watts: float

    def power_w(self) -> float:
        return self.watts


class TraceSignal:
    """A recorded trace (CSV with columns `t_s,power_w`), replayed in a loop, interpolated."""

    def __init__(self, t_s: np.ndarray, power_w: np.ndarray) -> None:
        self.t_s = t_s - t_s[0]
        self.power = power_w
        self.period_s = float(self.t_s[-1]) if len(t_s) > 1 else 1.0
        self._start: float | None = None

    @classmethod
    def from_csv(cls, path: Path | str) -> TraceSignal:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        except OSError as exc:
            raise HarnessUsageError(f"{path}: cannot read trace: {exc.strerror}") from exc
        t_s, power = [], []
        for line, row in enumerate(rows, start=2):
            try:
                t_s.append(float(row["t_s"]))
                power.append(float(row["power_w"]))
            except (KeyError, TypeError, ValueError):
                raise HarnessUsageError(
                    f"{path}:{line}: fields t_s, power_w must be numbers, got {row!r}"
                ) from None
        if not t_s or any(b <= a for a, b in itertools.pairwise(t_s)):
            raise HarnessUsageError(f"{path}: field t_s must be non-empty and increasing")
        return cls(np.array(t_s), np.array(power))

    def power_w(self) -> float:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        phase = (now - self._start) % self.period_s if self.period_s > 0 else 0.0
        return float(np.interp(phase, self.t_s, self.power))


class LoadSignal:
    """The CPU load of a process tree (or the machine) mapped through a power profile."""

    def __init__(self, profile: PowerProfile, pid: int | None = None) -> None:
        self.profile = profile
        self.load = ProcessTreeLoad(pid)

    def power_w(self) -> float:
        return self.profile.power_w(self.load.utilisation())


@dataclass(frozen=True)
class FaultPlan:
    """Which faults to inject: per-record probabilities and periodic stalls and unplugs."""

    torn: float = 0.0  # a record/line cut short (its tail never arrives)
    corrupt: float = 0.0  # garbage bytes injected before a record/line
    bad_checksum: float = 0.0  # UM: end marker (UM24C/UM25C) or checksum (UM34C) broken
    stall_every_s: float | None = None
    stall_s: float = 0.0
    unplug_every_s: float | None = None
    unplug_s: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """`torn=0.05,corrupt=0.02,checksum=0.02,stall=EVERY:SECONDS,unplug=EVERY:SECONDS`."""
        fields: dict[str, float | int | None] = {}
        known = ("torn", "corrupt", "checksum", "stall", "unplug", "seed")
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in known:
                raise HarnessUsageError(
                    f"--faults: unknown fault {key!r} (choices: {', '.join(known)})"
                )
            try:
                if key in ("torn", "corrupt", "checksum"):
                    probability = float(value)
                    if not 0.0 <= probability <= 1.0:
                        raise ValueError
                    fields["bad_checksum" if key == "checksum" else key] = probability
                elif key in ("stall", "unplug"):
                    every, _, seconds = value.partition(":")
                    fields[f"{key}_every_s"], fields[f"{key}_s"] = float(every), float(seconds)
                    if float(every) <= float(seconds) or float(seconds) <= 0:
                        raise ValueError
                else:
                    fields["seed"] = int(value)
            except ValueError:
                raise HarnessUsageError(
                    f"--faults: bad value {item!r} (probabilities in 0..1; "
                    "stall/unplug as EVERY:SECONDS with EVERY > SECONDS > 0)"
                ) from None
        return cls(**fields)  # type: ignore[arg-type]


class PtyEndpoint:
    """A pseudo-terminal in raw mode whose slave is reachable at a stable symlink."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master: int | None = None
        self._slave: int | None = None
        self.slave_name = ""

    def open(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.master, self._slave, self.slave_name = master, slave, os.ttyname(slave)
        staging = self.link.with_name(self.link.name + ".new")
        staging.unlink(missing_ok=True)
        staging.symlink_to(self.slave_name)
        os.replace(staging, self.link)

    def mark_link(self) -> None:
        """Set a line speed no host uses (50 baud) on the slave: opening the port again
        (pyserial sets its speed on every open) replaces it, which `reopened` notices."""
        if self._slave is None:
            return
        attributes = termios.tcgetattr(self._slave)
        attributes[4] = attributes[5] = termios.B50
        termios.tcsetattr(self._slave, termios.TCSANOW, attributes)

    def reopened(self) -> bool:
        """True once the host has opened the port since `mark_link`."""
        if self._slave is None:
            return False
        return termios.tcgetattr(self._slave)[4] != termios.B50

    def close(self) -> None:
        self.link.unlink(missing_ok=True)
        for fd in (self.master, self._slave):
            if fd is not None:
                os.close(fd)
        self.master = self._slave = None


class PtyEmulator:
    """Runs one emulated meter in a thread: the protocol in `_serve`, faults around it."""

    def __init__(
        self,
        signal: Signal,
        faults: FaultPlan | None = None,
        link: Path | str | None = None,
        log_path: Path | str | None = None,
        volts: float = 5.1,
        tx_buffer_s: float = 0.5,
    ) -> None:
        self.signal = signal
        self.tx_buffer_s = tx_buffer_s
        self.faults = faults or FaultPlan()
        if link is None:
            link = Path(tempfile.mkdtemp(prefix="bnn-meter-")) / "tty"
        self.endpoint = PtyEndpoint(Path(link))
        self.volts = volts
        self.injected: Counter[str] = Counter()
        self.overrun_bytes = 0
        self._random = random.Random(self.faults.seed)
        self._log_path = Path(log_path) if log_path else None
        self._log: TextIO | None = None
        self._stop = threading.Event()
        self._unplug_requested: float | None = None
        self._stall_requested: float | None = None
        self._quiet_requested = False
        self.quiet = False
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """The stable path to point a driver at (a symlink to the current pty)."""
        return str(self.endpoint.link)

    def start(self) -> PtyEmulator:
        self.endpoint.open()
        if self._log_path is not None:
            self._log = open(self._log_path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
            self._log.write("t_host_s,power_w\n")
        self._thread = threading.Thread(target=self._run, name=f"emulator {self.path}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.endpoint.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PtyEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stall(self, seconds: float) -> None:
        """Stop answering/sending now, for `seconds` (the port stays open)."""
        self._stall_requested = seconds

    def go_quiet(self) -> None:
        """The link goes silent without an error, as a Bluetooth link does when the meter
        reboots or leaves range: no answers, the port stays open, no I/O error; it answers
        again once the host has opened the port anew (rfcomm then sets up a new link)."""
        self._quiet_requested = True

    def unplug(self, seconds: float) -> None:
        """Make the port disappear now and reappear after `seconds` (at the same path)."""
        self._unplug_requested = seconds

    def log_signal(self, t_host_s: float, power_w: float) -> None:
        if self._log is not None:
            self._log.write(f"{t_host_s:.6f},{power_w:.6f}\n")

    def _write(self, data: bytes) -> None:
        """Write like a board with a transmit buffer: when the host's tty buffer is full,
        wait up to `tx_buffer_s` for the host to read; what still does not fit is lost
        (and counted in `overrun_bytes`), as a board's full buffer would drop it."""
        master = self.endpoint.master
        if master is None:
            return
        deadline = time.monotonic() + self.tx_buffer_s
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(master, view) :]
            except BlockingIOError:
                pass
            except OSError:
                return
            remaining = deadline - time.monotonic()
            if not view or remaining <= 0 or self._stop.is_set():
                break
            select.select([], [master], [], min(remaining, 0.05))
        self.overrun_bytes += len(view)

    def _due(self, every_s: float | None, start: float, now: float, last: float) -> bool:
        return every_s is not None and (now - start) // every_s > (last - start) // every_s

    def _run(self) -> None:
        start = last = time.monotonic()
        stalled_until = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._unplug_requested is not None or self._due(
                self.faults.unplug_every_s, start, now, last
            ):
                seconds = self._unplug_requested or self.faults.unplug_s
                self._unplug_requested = None
                self.injected["unplug"] += 1
                self.endpoint.close()
                self._idle(seconds)
                if self._stop.is_set():
                    return
                self.endpoint.open()
            if self._stall_requested is not None:
                stalled_until, self._stall_requested = now + self._stall_requested, None
            if self._due(self.faults.stall_every_s, start, now, last):
                self.injected["stall"] += 1
                stalled_until = now + self.faults.stall_s
            if self._quiet_requested:
                self._quiet_requested, self.quiet = False, True
                self.injected["silent_link"] += 1
                self.endpoint.mark_link()
            elif self.quiet and self.endpoint.reopened():
                self.quiet = False
                self.injected["relink"] += 1
            last = now
            self._serve(stalled=self.quiet or now < stalled_until)

    def _idle(self, seconds: float) -> None:
        """Wait while keeping the signal (and its log) running."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._refresh()
            self._stop.wait(0.05)

    def _refresh(self) -> None:
        """Advance the emulated signal (the meter keeps measuring while unreachable)."""

    def _serve(self, stalled: bool) -> None:
        raise NotImplementedError


class UmEmulator(PtyEmulator):
    """A UM24C/UM25C/UM34C: refreshes its display `refresh_hz` times a second and answers
    every 0xF0 poll with the current 130-byte record; other command bytes are ignored."""

    def __init__(self, model: str, signal: Signal, refresh_hz: float = 2.0, **kwargs) -> None:
        super().__init__(signal, **kwargs)
        if model not in UM_MODELS:
            raise HarnessUsageError(
                f"--type: unknown UM model {model!r} (choices: {', '.join(UM_MODELS)})"
            )
        self.model = model
        self.refresh_s = 1.0 / refresh_hz
        self.records_sent = 0
        self._next_refresh = 0.0
        self._power_w = 0.0
        self._energy_wh = 0.0  # the meter's own counter: integrated from refresh to refresh
        self._last_refresh: float | None = None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = max(self._next_refresh + self.refresh_s, now)
        power_w = max(0.0, self.signal.power_w())
        if self._last_refresh is not None:  # trapezoid between refreshes, as the meter counts
            self._energy_wh += 0.5 * (self._power_w + power_w) * (now - self._last_refresh) / 3600
        self._last_refresh, self._power_w = now, power_w
        self.log_signal(time.time(), self._power_w)

    def _record(self) -> bytes:
        """The current record, with at most one of torn / bad check, maybe after garbage."""
        power = self._power_w
        draw = self._random.random()
        torn = draw < self.faults.torn
        bad = not torn and draw < self.faults.torn + self.faults.bad_checksum
        record = encode_record(self.model, self.volts, power / self.volts, power,
                               corrupt_check=bad, group_mwh=int(self._energy_wh * 1000))
        if bad:
            self.injected["bad_checksum"] += 1
        if torn:
            self.injected["torn"] += 1
            record = record[: self._random.randrange(1, RECORD_BYTES)]
        if self._random.random() < self.faults.corrupt:
            self.injected["corrupt"] += 1
            record = self._random.randbytes(self._random.randrange(1, 40)) + record
        return record

    def _serve(self, stalled: bool) -> None:
        self._refresh()
        master = self.endpoint.master
        if master is None:
            return
        timeout = max(0.0, min(0.05, self._next_refresh - time.monotonic()))
        readable, _, _ = select.select([master], [], [], timeout)
        if not readable:
            return
        try:
            request = os.read(master, 4096)
        except (BlockingIOError, OSError):
            return
        if stalled:
            return
        for _ in range(request.count(POLL)):
            record = self._record()
            cut = len(record) // 2  # bytes may arrive in several chunks
            self._write(record[:cut])
            time.sleep(0.001)
            # counted before its last byte goes out, so that a reader who has the whole record
            # never sees it uncounted
            self.records_sent += 1
            self._write(record[cut:])


class LineEmulator(PtyEmulator):
    """An INA219/INA226 board streaming `t_us,bus_mV,current_uA` lines at `rate_hz`.

    `t_us` is the board's microsecond clock: line n carries n / rate_hz exactly, so a lost
    line shows as a jump. Lines due while stalled or unplugged are never sent.
    """

    def __init__(self, signal: Signal, rate_hz: float = 1000.0, tick_s: float = 0.01, **kwargs):
        super().__init__(signal, **kwargs)
        self.rate_hz = rate_hz
        self.tick_s = tick_s
        self.lines_sent = 0
        self.last_t_us: int | None = None
        self._start: float | None = None
        self._next_line = 0
        self._header_sent = False

    def _due_lines(self) -> int:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        return int((now - self._start) * self.rate_hz) + 1

    def _refresh(self) -> None:
        """While unplugged the board keeps converting; those lines are never sent."""
        self._next_line = max(self._next_line, self._due_lines())

    def _serve(self, stalled: bool) -> None:
        due = self._due_lines()
        if due > self._next_line:
            first, self._next_line = self._next_line, due
            if not stalled:
                self._send(first, due)
        self._stop.wait(self.tick_s)

    def _send(self, first: int, end: int) -> None:
        power = max(0.0, self.signal.power_w())
        self.log_signal(time.time(), power)
        bus_mv = round(self.volts * 1000)
        current_ua = round(power / self.volts * 1e6)
        period_us = 1e6 / self.rate_hz
        parts = []
        if not self._header_sent:
            self._header_sent = True
            parts.append(f"# emulated INA226 rate_hz={self.rate_hz:g}\n# t_us,bus_mV,current_uA\n")
        for n in range(first, end):
            line = f"{round(n * period_us)},{bus_mv},{current_ua}\n"
            if self.faults.torn and self._random.random() < self.faults.torn:
                self.injected["torn"] += 1
                line = line[: self._random.randrange(1, len(line) - 1)]
            elif self.faults.corrupt and self._random.random() < self.faults.corrupt:
                self.injected["corrupt"] += 1
                line = self._random.randbytes(8).hex(" ") + "\n" + line
            parts.append(line)
        self._write("".join(parts).encode())
        self.lines_sent += end - first
        self.last_t_us = round((end - 1) * period_us)
