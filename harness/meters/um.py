"""RDTech UM24C / UM25C / UM34C: the 130-byte record (pure parser) and the serial driver.

The parser is a pure function of bytes, shared by the driver, the emulator's tests and the
fuzzing tests; the driver only polls (one byte 0xF0), feeds what arrives to the stream
parser, drops repeats of the same display refresh and stamps the host clocks.
"""

from __future__ import annotations

import struct
import time
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

RECORD_BYTES = 130
POLL = b"\xf0"
END_MARKER = 0xFFF1
# Bytes whose XOR is the UM34C checksum in byte 129 (METERS.md).
UM34C_CHECKSUM_OFFSETS = (
    1, 3, 7, 9, 15, 17, 19, 23, 31, 39, 41, 45, 49, 53, 55, 57,
    59, 63, 67, 69, 73, 79, 83, 89, 97, 99, 109, 111, 113, 119, 121, 127,
)  # fmt: skip


@dataclass(frozen=True)
class UmModel:
    """Per-model identity and scaling of the record's voltage and current fields."""

    name: str
    model_id: int
    volts_per_count: float
    amps_per_count: float
    has_checksum: bool  # UM34C: XOR checksum in byte 129; others: end marker 0xFFF1


UM_MODELS: dict[str, UmModel] = {
    "um24c": UmModel("um24c", 0x0963, 0.01, 0.001, has_checksum=False),
    "um25c": UmModel("um25c", 0x09C9, 0.001, 0.0001, has_checksum=False),
    "um34c": UmModel("um34c", 0x0D4C, 0.01, 0.001, has_checksum=True),
}
MODELS_BY_ID = {model.model_id: model for model in UM_MODELS.values()}


@dataclass(frozen=True)
class UmSpec:
    """A model's accuracy as its maker states it (or, where no statement was found, as
    assumed): +-(fraction of reading + digits) for voltage and for current, a digit being
    the model's resolution (`UmModel.volts_per_count` / `amps_per_count`)."""

    volts_fraction: float
    volts_digits: int
    amps_fraction: float
    amps_digits: int
    source: str
    assumed: bool  # no manufacturer figure was found: the class is a stated assumption


POWER_COUNT_W = 0.001  # the record's power field counts mW: half a count of rounding
RESOLUTION_SOURCE = ("resolution 1 mV / 0.1 mA on the UM25C, 10 mV / 1 mA on the UM24C and "
                     "UM34C: sigrok wiki, RDTech UM series page (sigrok.org/wiki/RDTech_UM_series)")
UM_SPECS: dict[str, UmSpec] = {
    "um25c": UmSpec(
        0.0005, 2, 0.001, 4, assumed=False,
        source="RDTech's UM25C specification as listed by the seller and reproduced in the "
               "README of github.com/davatorium/um25c-client (the maker's own page was not "
               "among the sources searched): voltage 4-24 V to 0.5 per mille of the reading "
               "plus 2 digits, current 0-5 A to 1 per mille plus 4 digits; " + RESOLUTION_SOURCE,
    ),
    # No accuracy statement for the UM24C or UM34C was found (sigrok wiki, rdserialtool,
    # rd-usb, pyummeter, sebastianha/um34c, the pages and documentation corpora searched):
    # assumed 20x the UM25C's gain terms (1 % each) and its digit counts at these models'
    # 10x coarser resolution, wider than the UM25C's class at every reading.
    "um24c": UmSpec(
        0.01, 2, 0.01, 4, assumed=True,
        source="assumed (no published accuracy found for the UM24C): voltage 1 % of the "
               "reading plus 2 digits of 10 mV, current 1 % plus 4 digits of 1 mA, the "
               "UM25C's published class widened; " + RESOLUTION_SOURCE,
    ),
    "um34c": UmSpec(
        0.01, 2, 0.01, 4, assumed=True,
        source="assumed (no published accuracy found for the UM34C): voltage 1 % of the "
               "reading plus 2 digits of 10 mV, current 1 % plus 4 digits of 1 mA, the "
               "UM25C's published class widened; " + RESOLUTION_SOURCE,
    ),
}


def power_class(model: UmModel, spec: UmSpec) -> dict[str, object]:
    """A power reading's bound, `relative` x P + `offset_w` (`base.power_bound`), from the
    model's voltage and current classes, with half a count of the record's mW field."""
    relative, offset_w = power_bound(
        spec.volts_fraction, spec.volts_digits * model.volts_per_count,
        spec.amps_fraction, spec.amps_digits * model.amps_per_count,
        power_count_w=POWER_COUNT_W)
    return {"relative": relative, "offset_w": offset_w, "source": spec.source,
            "assumed": spec.assumed}


# Each model's class as a bound on a power reading (override per device with the
# inventory's `accuracy_pct` / `accuracy_w`).
ACCURACY: dict[str, dict[str, object]] = {
    name: power_class(UM_MODELS[name], spec) for name, spec in UM_SPECS.items()
}


@dataclass(frozen=True)
class UmRecord:
    """The fields of one record that the harness uses, in SI units; `raw` keeps the bytes."""

    model: str
    volts: float
    amps: float
    power_w: float
    temp_c: int
    data_group: int
    group_mwh: int  # the selected data group's cumulative energy counter (integer mWh)
    recorded_mah: int
    recorded_mwh: int
    recording_s: int
    load_ohm: float
    raw: bytes


def um34c_checksum(frame: bytes) -> int:
    """XOR of the bytes METERS.md lists; stored in byte 129 of a UM34C record."""
    value = 0
    for offset in UM34C_CHECKSUM_OFFSETS:
        value ^= frame[offset]
    return value


def parse_record(frame: bytes) -> UmRecord:
    """Decode one 130-byte record; `CorruptFrame` says why a frame is refused."""
    if len(frame) != RECORD_BYTES:
        raise CorruptFrame(f"record is {len(frame)} bytes, expected {RECORD_BYTES}")
    model_id = (frame[0] << 8) | frame[1]
    model = MODELS_BY_ID.get(model_id)
    if model is None:
        raise CorruptFrame(f"unknown model id 0x{model_id:04X}")
    if model.has_checksum:
        expected = um34c_checksum(frame)
        if frame[129] != expected:
            raise CorruptFrame(f"checksum 0x{frame[129]:02X}, expected 0x{expected:02X}")
    else:
        marker = (frame[128] << 8) | frame[129]
        if marker != END_MARKER:
            raise CorruptFrame(f"end marker 0x{marker:04X}, expected 0x{END_MARKER:04X}")
    volts_raw, amps_raw, power_mw, temp_c = struct.unpack_from(">HHIH", frame, 2)
    (group,) = struct.unpack_from(">H", frame, 14)
    (group_mwh,) = struct.unpack_from(">I", frame, 16 + 8 * min(group, 9) + 4)
    recorded_mah, recorded_mwh = struct.unpack_from(">II", frame, 102)
    (recording_s,) = struct.unpack_from(">I", frame, 112)
    (load_decohm,) = struct.unpack_from(">I", frame, 122)
    return UmRecord(
        model=model.name,
        volts=volts_raw * model.volts_per_count,
        amps=amps_raw * model.amps_per_count,
        power_w=power_mw * 0.001,
        temp_c=temp_c,
        data_group=group,
        group_mwh=group_mwh,
        recorded_mah=recorded_mah,
        recorded_mwh=recorded_mwh,
        recording_s=recording_s,
        load_ohm=load_decohm * 0.1,
        raw=bytes(frame),
    )


def encode_record(
    model_name: str,
    volts: float,
    amps: float,
    power_w: float,
    temp_c: int = 25,
    corrupt_check: bool = False,
    group_mwh: int = 0,
) -> bytes:
    """Build a record as the meter would send it (used by the emulator).

    Values are rounded to the model's resolution and clamped to the field widths;
    `corrupt_check` breaks the end marker or checksum on purpose (fault injection).
    """
    model = UM_MODELS[model_name]
    frame = bytearray(RECORD_BYTES)

    def u16(value: float) -> int:
        return max(0, min(0xFFFF, round(value)))

    volts_raw = u16(volts / model.volts_per_count)
    amps_raw = u16(amps / model.amps_per_count)
    power_mw = max(0, min(0xFFFFFFFF, round(power_w * 1000)))
    load_decohm = round(10 * volts / amps) if amps > 0 else 99999
    struct.pack_into(
        ">HHHIHH",
        frame,
        0,
        model.model_id,
        volts_raw,
        amps_raw,
        power_mw,
        temp_c,
        round(temp_c * 9 / 5 + 32),
    )
    struct.pack_into(">I", frame, 122, min(load_decohm, 0xFFFFFFFF))
    struct.pack_into(">I", frame, 16 + 4, min(group_mwh, 0xFFFFFFFF))  # data group 0, selected
    struct.pack_into(">HH", frame, 118, 2, 5)  # screen timeout, brightness
    if model.has_checksum:
        frame[129] = um34c_checksum(frame) ^ (0x5A if corrupt_check else 0)
    else:
        struct.pack_into(">H", frame, 128, END_MARKER ^ (0x0F0F if corrupt_check else 0))
    return bytes(frame)


class UmStreamParser:
    """Finds records in a byte stream that may be chunked, torn or polluted.

    Accumulate; if bytes 0-1 are not a known model id, drop a byte and resync; a
    130-byte window with a known id but a bad marker or checksum is rejected and the
    search resumes one byte further (a torn record may hide the start of the next one).
    Rejected windows that overlap count once, so `rejected` counts bad records, not
    resync attempts. Invariant: bytes fed == 130 * records + skipped_bytes + pending.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0  # stream offset of _buffer[0]
        self._rejected_until = 0  # stream offset where the last rejected window ends
        self.records = 0
        self.rejected = 0
        self.skipped_bytes = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _skip(self, count: int) -> None:
        del self._buffer[:count]
        self._position += count
        self.skipped_bytes += count

    def _next_candidate(self) -> int:
        """Offset of the first known model id in the buffer (or where one may start)."""
        buffer = self._buffer
        found = [buffer.find(model.model_id.to_bytes(2, "big")) for model in UM_MODELS.values()]
        hits = [index for index in found if index >= 0]
        if hits:
            return min(hits)
        # Keep a last byte that may be the first half of an id.
        last = len(buffer) - 1
        if last >= 0 and any(buffer[last] == model.model_id >> 8 for model in UM_MODELS.values()):
            return last
        return len(buffer)

    def feed(self, data: bytes) -> list[UmRecord]:
        """Add bytes; return the records completed by them, in stream order."""
        self._buffer += data
        records: list[UmRecord] = []
        while len(self._buffer) >= 2:
            start = self._next_candidate()
            if start:
                self._skip(start)
                continue
            if len(self._buffer) < RECORD_BYTES:
                break
            try:
                record = parse_record(bytes(self._buffer[:RECORD_BYTES]))
            except CorruptFrame as exc:
                self.last_error = str(exc)
                if self._position >= self._rejected_until:
                    self.rejected += 1
                self._rejected_until = self._position + RECORD_BYTES
                self._skip(1)
                continue
            del self._buffer[:RECORD_BYTES]
            self._position += RECORD_BYTES
            self.records += 1
            records.append(record)
        return records


class UmMeter:
    """Polls a UM meter over its serial port (Bluetooth rfcomm, or a pty emulator).

    The meter refreshes `refresh_hz` (about 2) times a second and answers every poll with
    its current display, so polling faster returns repeats: a record identical to the last
    one and younger than 0.9 refresh periods is dropped as a repeat (counted in
    `duplicates`); an identical record after that is a steady load, and is kept.

    Time stamps: a reading is the display as of the meter's last refresh, and the record
    arrives a frame time (130 bytes at 9600 baud: 135 ms) plus the link's delay after the
    poll. So a sample is stamped at the poll, not at its arrival, less half the age a
    first-seen refresh can have at that poll: half of 1 / max(poll_hz, refresh_hz)
    (`age_correction_s`). What remains, +- that much, is covered by the energy interval's
    sampling term (docs/energy.md).

    A Bluetooth link can die without an error: the rfcomm tty stays open and every poll
    goes unanswered (the meter rebooted, walked out of range, its link supervision has not
    timed out yet). Since the meter answers every poll, `silent_s` seconds without one
    valid record on an open port raise `MeterDisconnected`; the recorder then closes the
    port and opens it again, which makes rfcomm set up a new link.
    """

    def __init__(
        self,
        model: str,
        port: str,
        poll_hz: float = 4.0,
        baud: int = 9600,
        timeout_s: float = 1.0,
        refresh_hz: float = 2.0,
        name: str | None = None,
        silent_s: float = 5.0,
    ) -> None:
        self.model = UM_MODELS[model]
        self.port = port
        self.poll_hz = poll_hz
        self.nominal_hz = min(poll_hz, refresh_hz)
        self.baud = baud
        self.timeout_s = timeout_s
        self.repeat_window_s = 0.9 / refresh_hz
        self.age_correction_s = 0.5 / max(poll_hz, refresh_hz)
        self.name = name or model
        self.parser = UmStreamParser()
        self.duplicates = 0
        self.timeouts = 0
        self.wrong_model = 0
        self.silent_s = silent_s
        self.silent_links = 0
        self._last_heard = 0.0  # monotonic time of the last valid record (or of connecting)
        self._serial: serial.Serial | None = None
        self._next_poll = 0.0
        self._last_raw: bytes | None = None
        self._last_accept_ns = 0
        self._seq = 0

    @property
    def rejected_records(self) -> int:
        return self.parser.rejected + self.wrong_model

    def connect(self) -> None:
        try:
            self._serial = serial.Serial(
                self.port, self.baud, timeout=0.05, write_timeout=self.timeout_s
            )
        except (serial.SerialException, OSError) as exc:
            raise MeterDisconnected(f"cannot open {self.port}: {exc}") from exc
        self.parser = _carry_counts(self.parser)
        self._next_poll = self._last_heard = time.monotonic()

    def close(self) -> None:
        if self._serial is not None:
            close_serial(self._serial)
            self._serial = None

    def read(self) -> list[PowerSample]:
        """Poll once (at `poll_hz`) and return the new reading, if the meter gave one."""
        port = self._serial
        if port is None:
            raise MeterDisconnected(f"{self.port} is not open")
        delay = self._next_poll - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_poll = max(self._next_poll + 1.0 / self.poll_hz, time.monotonic())
        # A record takes ~135 ms at 9600 baud; give up on this poll well before the next ones.
        deadline = time.monotonic() + max(0.3, min(self.timeout_s, 2.0 / self.poll_hz))
        try:
            t_poll_s, t_poll_ns = host_now()
            port.write(POLL)
            while time.monotonic() < deadline:
                chunk = port.read(port.in_waiting or 1)
                if not chunk:
                    continue
                records = self.parser.feed(chunk)
                if records:
                    self._last_heard = time.monotonic()
                    return self._accept(records[-1], t_poll_s, t_poll_ns)
        except (serial.SerialException, OSError) as exc:
            raise MeterDisconnected(f"{self.port}: {exc}") from exc
        self.timeouts += 1
        silent_for = time.monotonic() - self._last_heard
        if silent_for > self.silent_s:
            self.silent_links += 1
            raise MeterDisconnected(
                f"{self.port}: link silent: no reply to {self.poll_hz:g} Hz polls for "
                f"{silent_for:.1f} s (port open, no error); reopening it"
            )
        return []

    def _accept(self, record: UmRecord, t_poll_s: float, t_poll_ns: int) -> list[PowerSample]:
        """A new reading, stamped at its poll less `age_correction_s`; repeats dropped."""
        t_mono_ns = t_poll_ns
        if record.model != self.model.name:
            self.wrong_model += 1  # a different meter answers on this port
            return []
        age_s = (t_mono_ns - self._last_accept_ns) / 1e9
        if record.raw == self._last_raw and age_s < self.repeat_window_s:
            self.duplicates += 1
            return []
        self._last_raw = record.raw
        self._last_accept_ns = t_mono_ns
        self._seq += 1
        return [
            PowerSample(
                t_host_s=t_poll_s - self.age_correction_s,
                t_mono_ns=t_poll_ns - int(self.age_correction_s * 1e9),
                power_w=record.power_w,
                volts=record.volts,
                amps=record.amps,
                seq=self._seq,
                counter_wh=record.group_mwh / 1000.0,
            )
        ]


def _carry_counts(old: UmStreamParser) -> UmStreamParser:
    """A fresh parser for a new connection that keeps the running counts."""
    fresh = UmStreamParser()
    fresh.records, fresh.rejected, fresh.skipped_bytes = (
        old.records,
        old.rejected,
        old.skipped_bytes,
    )
    return fresh
