"""The line-based serial format (INA219/INA226 boards): parser, units, fuzzing, driver on a pty."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.meters.base import CorruptFrame
from harness.meters.emulator import ConstantSignal, FaultPlan, LineEmulator
from harness.meters.line import LineFormat, LineMeter, LineParser


def test_default_columns_and_units():
    record = LineParser(LineFormat.from_columns("t_us,bus_mV,current_uA")).parse_line(
        b"1500000,5012,812345\r"
    )
    assert record.t_meter_s == pytest.approx(1.5)
    assert record.volts == pytest.approx(5.012)
    assert record.amps == pytest.approx(0.812345)
    assert record.power_w == pytest.approx(5.012 * 0.812345)


def test_configurable_order_units_skip_and_power_column():
    parser = LineParser(LineFormat.from_columns(["current_mA", "skip", "bus_V", "t_ms"]))
    record = parser.parse_line(b"250.5,xyz,4.9,1234")
    assert (record.amps, record.volts, record.t_meter_s) == pytest.approx((0.2505, 4.9, 1.234))
    powered = LineParser(LineFormat.from_columns("t_s,power_mW")).parse_line(b"2.5,3100")
    assert powered.power_w == pytest.approx(3.1)
    assert powered.volts is None and powered.amps is None
    semicolon = LineParser(LineFormat(("t_us", "bus_mV", "current_uA"), delimiter=b";"))
    assert semicolon.parse_line(b"1;5000;100000").power_w == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ("t_us,bus_kV,current_uA", "unknown column 'bus_kV'"),
        ("t_us,bus_mV", "need power, or bus and current"),
        ("t_us,bus_mV,bus_V,current_uA", "repeats quantity 'bus'"),
    ],
)
def test_bad_formats_are_refused(columns, message):
    with pytest.raises(ValueError, match=message):
        LineFormat.from_columns(columns)


def test_headers_are_metadata_and_bad_lines_are_counted():
    parser = LineParser(LineFormat.from_columns("t_us,bus_mV,current_uA"))
    lines = [b"# INA226 avg=4", b"1,5000,1000", b"", b"2,5000", b"3,5000,nan", b"x,1,2", b"4,5,6"]
    records = parser.feed_lines(lines)
    assert [r.t_meter_s for r in records] == pytest.approx([1e-6, 4e-6])
    assert parser.rejected == 3
    assert parser.headers == ["INA226 avg=4"]
    with pytest.raises(CorruptFrame, match="2 fields"):
        parser.parse_line(b"2,5000")


good_line = st.tuples(
    st.integers(0, 2**40), st.integers(0, 30000), st.integers(-(10**6), 5 * 10**6)
).map(lambda f: (f, f"{f[0]},{f[1]},{f[2]}".encode()))
# Garbage starts with a letter, so it cannot be a number (nor a '#' header).
garbage_line = st.binary(max_size=60).map(lambda raw: b"x" + raw.replace(b"\n", b""))


@settings(max_examples=200)
@given(raw=st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise_and_every_line_is_accounted_for(raw):
    parser = LineParser(LineFormat.from_columns("t_us,bus_mV,current_uA"))
    lines = raw.split(b"\n")
    records = parser.feed_lines(lines)
    ignored = sum(1 for line in lines if not line.strip() or line.strip().startswith(b"#"))
    assert len(records) + parser.rejected + ignored == len(lines)


@settings(max_examples=200)
@given(items=st.lists(st.one_of(good_line.map(lambda g: ("good", g)), garbage_line), max_size=40))
def test_good_lines_among_garbage_are_all_found(items):
    parser = LineParser(LineFormat.from_columns("t_us,bus_mV,current_uA"))
    lines = [item[1][1] if isinstance(item, tuple) else item for item in items]
    expected = [item[1][0] for item in items if isinstance(item, tuple)]
    records = parser.feed_lines(lines)
    assert [
        (round(r.t_meter_s * 1e6), round(r.volts * 1e3), round(r.amps * 1e6)) for r in records
    ] == [tuple(e) for e in expected]
    assert parser.rejected == len(lines) - len(expected)


def read_for(meter: LineMeter, seconds: float) -> list:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples += meter.read()
    return samples


def test_driver_keeps_every_line_and_the_board_clock_at_1000_per_s():
    with LineEmulator(ConstantSignal(2.5), rate_hz=1000) as emulator:
        meter = LineMeter(emulator.path)
        meter.connect()
        samples = read_for(meter, 2.0)
        meter.close()
    t_us = np.array([round(s.t_meter_s * 1e6) for s in samples])
    assert len(samples) > 1500
    assert np.all(np.diff(t_us) == 1000), "a line was lost or reordered"
    t_host = np.array([s.t_host_s for s in samples])
    assert np.all(np.diff(t_host) > 0)
    # Back-dating by the board clock keeps the true spacing of lines read in one chunk.
    assert np.median(np.diff(t_host)) == pytest.approx(1e-3, rel=0.05)
    assert samples[0].power_w == pytest.approx(2.5, rel=1e-3)
    assert meter.rejected_records == 0


def test_corrupt_and_torn_lines_are_rejected_and_counted():
    faults = FaultPlan(corrupt=0.02, seed=3)
    with LineEmulator(ConstantSignal(1.0), rate_hz=500, faults=faults) as emulator:
        meter = LineMeter(emulator.path)
        meter.connect()
        samples = read_for(meter, 1.5)
        meter.close()
        sent_corrupt = emulator.injected["corrupt"]
    assert sent_corrupt > 3
    # Corruption injected before the port was opened was flushed with the input buffer.
    assert 1 <= meter.rejected_records <= sent_corrupt
    t_us = np.array([round(s.t_meter_s * 1e6) for s in samples])
    assert np.all(np.diff(t_us) == 2000), "a corrupt line cost a good line"

    with LineEmulator(ConstantSignal(1.0), rate_hz=500, faults=FaultPlan(torn=0.02, seed=4)) as em:
        meter = LineMeter(em.path)
        meter.connect()
        samples = read_for(meter, 1.5)
        meter.close()
    steps = np.diff([round(s.t_meter_s * 1e6) for s in samples]) // 2000
    jumps = steps[steps > 1]
    # A torn line merges with the next one: each rejected line is one jump that loses both.
    assert meter.rejected_records >= 1
    assert len(jumps) == meter.rejected_records
    assert np.all(jumps - 1 >= 2)


def test_the_ina226_class_bounds_every_worst_case_reading_and_says_it_is_assumed():
    """TI's maximum gain errors and offsets plus the assumed 1 % shunt, through the same
    derivation as the UM meters': no reading off by the full classes exceeds the bound."""
    from harness.meters.base import SUPPLY_VOLTS
    from harness.meters.line import ACCURACY, SHUNT_OHM, SHUNT_TOLERANCE

    for volts in (SUPPLY_VOLTS[0], 5.0, SUPPLY_VOLTS[1]):
        for amps in (0.0, 0.05, 0.5, 2.0, 3.0):
            dv = 0.001 * volts + 0.0075
            di = (0.001 + SHUNT_TOLERANCE) * amps + 10e-6 / SHUNT_OHM
            error = max(abs((volts + sv * dv) * (amps + si * di) - volts * amps)
                        for sv in (-1, 1) for si in (-1, 1))
            assert error <= ACCURACY["relative"] * volts * amps + ACCURACY["offset_w"]
    assert ACCURACY["assumed"] and "SBOS547" in ACCURACY["source"]
