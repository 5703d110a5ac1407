"""The recorder against real ptys and the real run store: latency, unplug/replug, stalls."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from harness.errors import HarnessUsageError
from harness.meters import AgentSourcedRecorder, meter_from_config, start_recorder
from harness.meters.emulator import ConstantSignal, FaultPlan, LineEmulator, UmEmulator
from harness.store import RunStore


class TimingSink:
    """An in-test store that remembers when each batch was handed over."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[float, list]] = []
        self.gaps: list[tuple[float, float, str]] = []
        self.stats: dict = {}

    def add_power_samples(self, device, meter, samples):
        with self.lock:
            self.batches.append((time.time(), list(samples)))

    def add_meter_gap(self, device, meter, t_start_s, t_end_s, reason):
        with self.lock:
            self.gaps.append((t_start_s, t_end_s, reason))

    def set_meter_stats(self, device, meter, **stats):
        self.stats = stats

    @property
    def samples(self) -> list:
        return [s for _, batch in self.batches for s in batch]


def store_rows(store: RunStore, table: str) -> list:
    store.flush()
    return store.query(f"SELECT * FROM {table} ORDER BY rowid")


def test_every_sample_is_handed_to_the_store_within_a_second():
    sink = TimingSink()
    with LineEmulator(ConstantSignal(1.5), rate_hz=200) as emulator:
        recorder = start_recorder(
            {"type": "line", "port": emulator.path, "rate_hz": 200}, sink, "d"
        )
        time.sleep(2.0)
        stats = recorder.stop()
    delays = [handed - s.t_host_s for handed, batch in sink.batches for s in batch]
    assert len(delays) > 300
    assert max(delays) < 1.0
    assert sink.stats["samples"] == stats.samples == len(delays)
    assert sink.stats["achieved_hz"] == pytest.approx(200, rel=0.05)
    assert sink.stats["rejected_records"] == 0 and sink.stats["gaps"] == 0


def test_unplug_and_replug_mid_recording_line_meter(tmp_path):
    store = RunStore.create(tmp_path / "run").start()
    link = tmp_path / "ttyACM0"
    with LineEmulator(ConstantSignal(2.0), rate_hz=500, link=link) as emulator:
        recorder = start_recorder({"type": "line", "port": str(link), "rate_hz": 500}, store, "pi")
        time.sleep(1.0)
        t_unplug = time.time()
        emulator.unplug(1.0)
        time.sleep(1.0)
        t_replug = time.time()
        time.sleep(1.5)
        emulator.stall(30)  # the board stops sending; the port stays up
        time.sleep(0.5)
        last_sent_t_us = emulator.last_t_us
        recorder.stop()
    samples = store_rows(store, "power_samples")
    gaps = store_rows(store, "meter_gaps")
    stats = store_rows(store, "meter_stats")
    store.close()

    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["t_start_s"] <= t_unplug + 0.05 and gap["t_end_s"] >= t_replug - 0.05
    assert gap["device"] == "pi" and gap["meter"] == "line"
    t_host = np.array([row["t_host_s"] for row in samples])
    assert not np.any((t_host > gap["t_start_s"]) & (t_host < gap["t_end_s"]))
    after = [round(row["t_meter_s"] * 1e6) for row in samples if row["t_host_s"] >= gap["t_end_s"]]
    assert len(after) > 300
    assert np.all(np.diff(after) == 2000), "a line after the gap was lost"
    assert after[-1] == last_sent_t_us, "the last lines sent never reached the store"
    (row,) = stats
    assert row["samples"] == len(samples) and row["gaps"] == 1
    assert row["rejected_records"] == 0


def test_unplug_and_replug_um25c_keeps_recording(tmp_path):
    sink = TimingSink()
    link = tmp_path / "rfcomm0"
    config = {"type": "um25c", "port": str(link), "poll_hz": 10, "refresh_hz": 10}
    signal = ConstantSignal(3.0)
    with UmEmulator("um25c", signal, refresh_hz=10, link=link) as emulator:
        recorder = start_recorder(config, sink, "pi")
        time.sleep(1.0)
        emulator.unplug(1.0)
        time.sleep(3.0)
        stats = recorder.stop()
    assert len(sink.gaps) == 1
    start, end, reason = sink.gaps[0]
    assert 0.9 < end - start < 2.5
    assert str(link) in reason  # pyserial's own words: an I/O error or "device disconnected"
    after = [s for s in sink.samples if s.t_host_s >= end]
    assert len(after) >= 10  # back at the meter's rate
    assert stats.reconnects >= 1
    assert sink.stats["gaps"] == 1


def test_a_silent_bluetooth_link_is_noticed_and_reopened(tmp_path):
    """An rfcomm link that dies without an error: the meter stops answering, the port stays
    open. The driver notices the silence, the recorder reopens the port, the meter answers
    again (the emulator stays quiet until the port is opened anew, like a dead link)."""
    sink = TimingSink()
    link = tmp_path / "rfcomm0"
    config = {"type": "um34c", "port": str(link), "poll_hz": 10, "refresh_hz": 10,
              "silent_s": 1.0}
    with UmEmulator("um34c", ConstantSignal(2.5), refresh_hz=10, link=link) as emulator:
        recorder = start_recorder(config, sink, "pi")
        time.sleep(1.0)
        t_quiet = time.time()
        emulator.go_quiet()
        time.sleep(3.0)
        stats = recorder.stop()
        assert not emulator.quiet
    assert emulator.injected["silent_link"] == 1 and emulator.injected["relink"] == 1
    assert stats.reconnects == 1
    assert len(sink.gaps) == 1
    start, end, reason = sink.gaps[0]
    assert "link silent" in reason and str(link) in reason
    assert t_quiet - 0.3 <= start <= t_quiet + 0.1
    assert 1.0 <= end - t_quiet < 2.5  # noticed after silent_s, answered right after reopening
    assert len([s for s in sink.samples if s.t_host_s >= end]) >= 5


def test_without_silence_detection_a_dead_link_stays_silent(tmp_path):
    """The emulator's quiet link does not come back by itself: what the test above shows
    is the recorder's doing."""
    sink = TimingSink()
    link = tmp_path / "rfcomm0"
    config = {"type": "um34c", "port": str(link), "poll_hz": 10, "refresh_hz": 10,
              "silent_s": 60.0}
    with UmEmulator("um34c", ConstantSignal(2.5), refresh_hz=10, link=link) as emulator:
        recorder = start_recorder(config, sink, "pi")
        time.sleep(0.8)
        emulator.go_quiet()
        t_quiet = time.time()
        time.sleep(1.5)
        stats = recorder.stop()
    assert stats.reconnects == 0
    assert not [s for s in sink.samples if s.t_host_s > t_quiet + 0.3]


def test_a_stalled_meter_leaves_a_gap():
    sink = TimingSink()
    faults = FaultPlan(stall_every_s=1.5, stall_s=1.0)
    with LineEmulator(ConstantSignal(1.0), rate_hz=200, faults=faults) as emulator:
        recorder = start_recorder(
            {"type": "line", "port": emulator.path, "rate_hz": 200}, sink, "d"
        )
        time.sleep(2.8)
        recorder.stop()
    assert len(sink.gaps) >= 1
    start, end, reason = sink.gaps[0]
    assert reason.startswith("no samples for")
    assert end - start == pytest.approx(1.0, abs=0.2)


def test_a_missing_port_is_retried_until_it_appears(tmp_path):
    sink = TimingSink()
    link = tmp_path / "later"
    t0 = time.time()
    recorder = start_recorder({"type": "line", "port": str(link), "rate_hz": 200}, sink, "d")
    time.sleep(0.8)
    with LineEmulator(ConstantSignal(1.0), rate_hz=200, link=link):
        time.sleep(1.5)
        stats = recorder.stop()
    assert stats.samples > 100
    (gap,) = sink.gaps
    assert gap[0] == pytest.approx(t0, abs=0.3) and gap[2].startswith("not connected")
    assert stats.errors and "cannot open" in stats.errors[0]


def test_stop_is_prompt_and_idempotent_when_nothing_answers(tmp_path):
    sink = TimingSink()
    recorder = start_recorder({"type": "um24c", "port": str(tmp_path / "none")}, sink, "d")
    time.sleep(0.3)
    t0 = time.monotonic()
    recorder.stop()
    recorder.stop()
    assert time.monotonic() - t0 < 3.0
    assert sink.stats["samples"] == 0 and sink.stats["gaps"] == 1
    (gap,) = sink.gaps  # the whole time without the meter is a gap
    assert "not connected" in gap[2] and "not back before stop" in gap[2]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "ina999"}, "meter.type: 'ina999' (choices: um24c"),
        ({"type": "um25c"}, "meter.port: missing"),
        ({"type": "um25c", "port": "/dev/x", "poll_hz": -1}, "meter.poll_hz: -1 must be positive"),
        ({"type": "um25c", "port": "/dev/x", "baud": "fast"}, "meter.baud: 'fast' is not an int"),
        (
            {"type": "line", "port": "/dev/x", "columns": "t_us,bus_kV"},
            "meter.columns: 't_us,bus_kV'",
        ),
        ({"type": "modeled", "profile": "pi9"}, "meter.profile: 'pi9' (choices: pi3b+"),
        ({"type": "rapl", "port": "/dev/x"}, "meter.port: not a field of type rapl"),
        ("um25c", "meter: 'um25c' is not a mapping"),
    ],
)
def test_meter_sections_are_validated(config, message):
    with pytest.raises(
        HarnessUsageError, match="device pi3: " + message.replace("(", r"\(").replace("+", r"\+")
    ):
        start_recorder(config, TimingSink(), "pi3")


def test_pmic_is_read_by_the_agent_not_the_recorder():
    assert meter_from_config({"type": "pmic"}) is None
    recorder = start_recorder({"type": "pmic"}, TimingSink(), "pi5")
    assert isinstance(recorder, AgentSourcedRecorder)
    assert recorder.stop().samples == 0


def test_modeled_meter_in_the_store_is_labelled(tmp_path):
    sink = TimingSink()
    recorder = start_recorder(
        {"type": "modeled", "profile": "pi4", "interval_s": 0.1, "name": "modeled-cpu"}, sink, "d"
    )
    time.sleep(0.8)
    recorder.stop()
    samples = sink.samples
    assert len(samples) >= 5
    assert all(s.modeled for s in samples)
    assert all(2.7 <= s.power_w <= 6.4 for s in samples)
    assert Path("/proc").exists()
