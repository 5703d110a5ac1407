"""The meter contract shared by every power source: samples, errors, connect/read/close.

A driver turns one meter's wire protocol into `PowerSample`s. Units are converted once,
here at the driver boundary, so everything downstream speaks watts, volts, amps, seconds.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class PowerSample:
    """One distinct reading of one meter.

    `t_host_s` is the host's wall clock when the reading was taken (to align machines);
    `t_mono_ns` the host's monotonic clock at the same moment (for intervals);
    `t_meter_s` the meter's own clock where it has one. `modeled` marks estimates that
    were computed, not measured, so they are never mixed silently with measured power.
    `counter_wh` is the meter's own energy counter where it has one (a UM's selected data
    group, in whole mWh): an independent cross-check of the integrated energy.
    Not frozen: a frozen dataclass costs five times as much to build, and a fleet of fast
    line meters builds tens of thousands a second.
    """

    t_host_s: float
    t_mono_ns: int
    power_w: float
    volts: float | None = None
    amps: float | None = None
    t_meter_s: float | None = None
    seq: int = 0
    modeled: bool = False
    counter_wh: float | None = None  # the meter's own cumulative energy counter, if it has one


def host_now() -> tuple[float, int]:
    """The host's wall and monotonic clocks, read together."""
    return time.time(), time.monotonic_ns()


class MeterError(Exception):
    """A meter could not be read."""


class MeterDisconnected(MeterError):
    """The port went away (unplugged, Bluetooth dropped, pty closed); reconnecting may help."""


class CorruptFrame(MeterError):
    """A frame failed validation (unknown model id, bad end marker, bad checksum, bad line)."""


class Meter(Protocol):
    """connect / read / close, as in rd-usb: the recorder needs nothing more.

    `read` blocks for at most about a second and returns the distinct samples it got (maybe
    none); it raises `MeterDisconnected` when the port is gone. `rejected_records` counts
    frames that failed validation since construction.
    """

    name: str
    nominal_hz: float

    def connect(self) -> None: ...

    def read(self) -> list[PowerSample]: ...

    def close(self) -> None: ...

    @property
    def rejected_records(self) -> int: ...


def close_serial(port) -> None:
    """Close a pyserial port, ignoring the errors of a port that has already gone away."""
    import serial

    with contextlib.suppress(serial.SerialException, OSError):
        port.close()


# Supply range over which a power class derived below holds: USB's 5 V +-5 % (a Pi's supply).
SUPPLY_VOLTS = (4.75, 5.25)


def power_bound(volts_fraction: float, volts_offset: float, amps_fraction: float,
                amps_offset: float, supply_volts: tuple[float, float] = SUPPLY_VOLTS,
                power_count_w: float = 0.0) -> tuple[float, float]:
    """A power reading's bound as (relative, offset_w), from the voltage and current classes
    (docs/energy.md): with |dV| <= aV V + dV0 and |dI| <= aI I + dI0, |dP| <= |dV| I + V |dI|
    + |dV| |dI|; for V in `supply_volts` and any current this is at most
    (aV + aI + aV aI + dV0 (1 + aI) / Vmin) P + dI0 Vmax (1 + aV) + dV0 dI0, plus half a
    count of the power the meter reports."""
    v_min, v_max = supply_volts
    relative = (volts_fraction + amps_fraction + volts_fraction * amps_fraction
                + volts_offset * (1 + amps_fraction) / v_min)
    offset_w = (amps_offset * v_max * (1 + volts_fraction) + volts_offset * amps_offset
                + power_count_w / 2)
    return relative, offset_w
