"""Line-oriented serial meters (INA219/INA226 on an Arduino, Pico or ESP32).

The harness defines the format (METERS.md): one line per conversion,
`t_us,bus_mV,current_uA\\n` by default, header lines starting with `#` are metadata.
The column list is configurable; each column name is `<quantity>_<unit>` so the units
live in the names, e.g. `t_ms,bus_V,current_mA` or `t_us,power_mW`; `skip` ignores a
column. The board's own time stamps are kept (`t_meter_s`). `ina226_reference.ino` beside
this module is a reference firmware sketch that speaks the default format.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import serial

from harness.meters.base import (
    CorruptFrame,
    MeterDisconnected,
    PowerSample,
    close_serial,
    host_now,
    power_bound,
)

DEFAULT_COLUMNS = ("t_us", "bus_mV", "current_uA")
# Accuracy class (a bound on each power reading) of the reference INA226 board, by the same
# derivation as the UM meters' (`base.power_bound`). The chip's figures are TI's; the 1 %
# 0.1 ohm shunt is the usual breakout board's part, not the maker's: the class is therefore
# marked assumed. A board with another shunt, or calibrated, sets `accuracy_pct` /
# `accuracy_w` in the inventory.
SHUNT_OHM = 0.1
SHUNT_TOLERANCE = 0.01
_RELATIVE, _OFFSET_W = power_bound(0.001, 0.0075, 0.001 + SHUNT_TOLERANCE, 10e-6 / SHUNT_OHM)
ACCURACY: dict[str, object] = {
    "relative": _RELATIVE, "offset_w": _OFFSET_W, "assumed": True,
    "source": "TI INA226 datasheet (SBOS547, electrical characteristics, maximum values): bus "
              "voltage gain error 0.1 % and offset 7.5 mV, shunt voltage gain error 0.1 % and "
              "offset 10 uV (0.1 mA on a 0.1 ohm shunt); assumed: a 1 % shunt resistor, as on "
              "common breakout boards (set accuracy_pct / accuracy_w for yours)",
}
# quantity -> unit -> factor to SI (seconds, volts, amps, watts)
UNITS: dict[str, dict[str, float]] = {
    "t": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9},
    "bus": {"V": 1.0, "mV": 1e-3, "uV": 1e-6},
    "current": {"A": 1.0, "mA": 1e-3, "uA": 1e-6},
    "power": {"W": 1.0, "mW": 1e-3, "uW": 1e-6},
}


@dataclass(frozen=True)
class LineFormat:
    """Where each quantity sits in a line and its factor to SI units."""

    columns: tuple[str, ...]
    delimiter: bytes = b","

    def __post_init__(self) -> None:
        seen = set()
        for column in self.columns:
            if column == "skip":
                continue
            quantity, _, unit = column.partition("_")
            if quantity not in UNITS or unit not in UNITS[quantity]:
                choices = ", ".join(f"{q}_{u}" for q, units in UNITS.items() for u in units)
                raise ValueError(f"unknown column {column!r} (choices: {choices}, skip)")
            if quantity in seen:
                raise ValueError(f"column {column!r} repeats quantity {quantity!r}")
            seen.add(quantity)
        if "power" not in seen and not {"bus", "current"} <= seen:
            raise ValueError(f"columns {list(self.columns)} need power, or bus and current")

    def _index(self, quantity: str) -> tuple[int, float] | None:
        for index, column in enumerate(self.columns):
            name, _, unit = column.partition("_")
            if name == quantity:
                return index, UNITS[quantity][unit]
        return None

    @classmethod
    def from_columns(cls, columns: str | Sequence[str]) -> LineFormat:
        if isinstance(columns, str):
            columns = [part.strip() for part in columns.split(",")]
        return cls(tuple(columns))


@dataclass(slots=True)
class LineRecord:
    t_meter_s: float | None
    volts: float | None
    amps: float | None
    power_w: float


class LineParser:
    """Parses lines of one `LineFormat`; pure apart from its counters."""

    def __init__(self, line_format: LineFormat) -> None:
        self.format = line_format
        self._n = len(line_format.columns)
        # (index, factor) of time, volts, current, power; index -1 where the format lacks it.
        self._slots = tuple(
            line_format._index(q) or (-1, 0.0) for q in ("t", "bus", "current", "power")
        )
        self.records = 0
        self.rejected = 0
        self.headers: list[str] = []
        self.last_error: str | None = None

    def parse_line(self, line: bytes) -> LineRecord | None:
        """One line without its newline -> a record, or None for a header/blank line.

        Raises `CorruptFrame` for a line that is not a valid record.
        """
        parts = line.split(self.format.delimiter)
        if len(parts) != self._n:
            stripped = line.strip()
            if not stripped or stripped.startswith(b"#"):
                return None
            raise CorruptFrame(f"{len(parts)} fields, expected {self._n}")
        (ti, ts), (vi, vs), (ai, as_), (pi, ps) = self._slots
        try:
            t = float(parts[ti]) * ts if ti >= 0 else None
            volts = float(parts[vi]) * vs if vi >= 0 else None
            amps = float(parts[ai]) * as_ if ai >= 0 else None
            power = float(parts[pi]) * ps if pi >= 0 else None
        except ValueError as exc:
            if line.lstrip().startswith(b"#"):
                return None
            raise CorruptFrame(f"not a number: {exc}") from None
        if power is None:
            power = volts * amps
        if not math.isfinite(power + (t or 0.0) + (volts or 0.0) + (amps or 0.0)):
            raise CorruptFrame("non-finite value")
        return LineRecord(t, volts, amps, power)

    def feed_lines(self, lines: Sequence[bytes]) -> list[LineRecord]:
        """Parse complete lines, counting every rejected one; headers are kept as metadata."""
        records = []
        parse = self.parse_line
        for line in lines:
            try:
                record = parse(line)
            except CorruptFrame as exc:
                self.rejected += 1
                self.last_error = str(exc)
                continue
            if record is None:
                text = line.strip()
                if text.startswith(b"#"):
                    self.headers.append(text[1:].strip().decode("utf-8", "replace"))
                continue
            records.append(record)
        self.records += len(records)
        return records


class LineMeter:
    """Reads a line-based meter from a serial port without losing lines at 1000/s.

    Reads whatever is buffered in one call and splits it. Host times come from the board's
    own clock mapped through `BoardClock`, so lines that arrived together keep their true
    spacing. The fragment before the first newline after
    connecting is a partial line (joined mid-stream) and is dropped without counting.
    """

    def __init__(
        self,
        port: str,
        columns: str | Sequence[str] = DEFAULT_COLUMNS,
        baud: int = 115200,
        nominal_hz: float = 1000.0,
        max_step_s: float = 1.0,
        name: str | None = None,
    ) -> None:
        self.port = port
        self.max_step_s = max_step_s
        self.batch_s = min(0.05, 20.0 / nominal_hz)
        self._next_read = 0.0
        self.baud = baud
        self.nominal_hz = nominal_hz
        self.name = name or "line"
        self.parser = LineParser(LineFormat.from_columns(columns))
        self._serial: serial.Serial | None = None
        self._partial = b""
        self._joined_mid_line = True
        self._seq = 0
        self._clock = BoardClock()
        self._last_mono_s = 0.0
        self._last_host_s = 0.0
        self._last: LineRecord | None = None
        self._held: LineRecord | None = None

    @property
    def rejected_records(self) -> int:
        return self.parser.rejected

    def connect(self) -> None:
        try:
            self._serial = serial.Serial(self.port, self.baud, timeout=0.2)
        except (serial.SerialException, OSError) as exc:
            raise MeterDisconnected(f"cannot open {self.port}: {exc}") from exc
        self._partial = b""
        self._joined_mid_line = True
        self._last = self._held = None

    def close(self) -> None:
        if self._serial is not None:
            close_serial(self._serial)
            self._serial = None

    def read(self) -> list[PowerSample]:
        port = self._serial
        if port is None:
            raise MeterDisconnected(f"{self.port} is not open")
        # Let lines gather for a moment (well inside what the tty buffer holds), so that a
        # fast board costs one wake-up per batch rather than one per write.
        delay = self._next_read - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_read = time.monotonic() + self.batch_s
        try:
            chunk = port.read(port.in_waiting or 1)
            if chunk and port.in_waiting:
                chunk += port.read(port.in_waiting)
        except (serial.SerialException, OSError) as exc:
            raise MeterDisconnected(f"{self.port}: {exc}") from exc
        if not chunk:
            return []
        t_host_s, t_mono_ns = host_now()
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if self._joined_mid_line and lines:
            self._joined_mid_line = False
            first = lines[0]
            try:
                self.parser.parse_line(first)
            except CorruptFrame:
                lines = lines[1:]
        records = self._plausible(self.parser.feed_lines(lines))
        return self._samples(records, t_host_s, t_mono_ns)

    def _follows(self, before: LineRecord, after: LineRecord) -> bool:
        if before.t_meter_s is None or after.t_meter_s is None:
            return True
        return 0.0 < after.t_meter_s - before.t_meter_s <= self.max_step_s

    def _plausible(self, records: list[LineRecord]) -> list[LineRecord]:
        """Drop lines whose board time does not follow on (the format has no checksum).

        Bytes lost inside the time field can join two lines into one that parses, with a
        time far off. A line that does not follow the last good one is held until the
        next line shows which is right: if the next follows the held line, the board
        really jumped (a stall, a reset) and both are kept; otherwise the held line is
        rejected and counted.
        """
        kept = []
        for record in records:
            held = self._held
            if held is not None:
                self._held = None
                if self._follows(held, record):
                    kept += (held, record)
                    self._last = record
                    continue
                self.parser.rejected += 1
                self.parser.records -= 1
            if self._last is None or self._follows(self._last, record):
                kept.append(record)
                self._last = record
            else:
                self._held = record
        return kept

    def _samples(
        self, records: list[LineRecord], t_host_s: float, t_mono_ns: int
    ) -> list[PowerSample]:
        if not records:
            return []
        offset_s = self._clock.offset_s(records[-1].t_meter_s, t_mono_ns)
        wall_minus_mono_s = t_host_s - t_mono_ns / 1e9
        samples = []
        for record in records:
            if offset_s is None or record.t_meter_s is None:
                mono_s = t_mono_ns / 1e9
            else:
                mono_s = min(record.t_meter_s + offset_s, t_mono_ns / 1e9)
            mono_s = max(mono_s, self._last_mono_s + 1e-7)  # keep host times increasing
            self._last_mono_s = mono_s
            # Host times stay increasing too: the wall-minus-monotonic difference is read
            # anew for each chunk (a preemption may fall between its two clock reads), and
            # at ~1.7e9 s a float64 resolves only ~0.24 us (1e-7 s steps can vanish).
            t_host = max(mono_s + wall_minus_mono_s, self._last_host_s + 1e-6)
            self._last_host_s = t_host
            self._seq += 1
            samples.append(
                PowerSample(
                    t_host_s=t_host,
                    t_mono_ns=int(mono_s * 1e9),
                    power_w=record.power_w,
                    volts=record.volts,
                    amps=record.amps,
                    t_meter_s=record.t_meter_s,
                    seq=self._seq,
                )
            )
        return samples


class BoardClock:
    """Maps the board's clock to the host's monotonic clock.

    The offset (host minus board) is the smallest seen over the last `window_s` seconds
    of chunk arrivals: the chunk that arrived fastest bounds it best, and the window lets
    the estimate follow the drift of the board's crystal. A board clock that runs
    backwards (reset, 32-bit wrap) starts the estimate afresh.
    """

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_ns = int(window_s * 1e9)
        self._minima: deque[tuple[int, float]] = deque()  # (arrival mono ns, offset), rising
        self._last_meter_s: float | None = None

    def offset_s(self, t_meter_s: float | None, arrival_ns: int) -> float | None:
        if t_meter_s is None:
            return None
        if self._last_meter_s is not None and t_meter_s < self._last_meter_s:
            self._minima.clear()
        self._last_meter_s = t_meter_s
        offset = arrival_ns / 1e9 - t_meter_s
        while self._minima and self._minima[-1][1] >= offset:
            self._minima.pop()
        self._minima.append((arrival_ns, offset))
        while self._minima[0][0] < arrival_ns - self.window_ns:
            self._minima.popleft()
        return self._minima[0][1]
