"""The agent's board readings: temperature and throttling at most once a second, the Pi 5
PMIC read no more often than keeps its vcgencmd calls under 1 % of a core."""

from __future__ import annotations

import io
import json
import stat
import sys
import time
from pathlib import Path

from device_agent.events import EventWriter
from device_agent.sampler import (
    SAMPLER_CPU_SHARE,
    BoardStateSampler,
    PmicSampler,
    decode_throttled,
    run_measured,
)

PMIC_OUTPUT = (" VDD_CORE_A current(7)=2.00000000A\\n VDD_CORE_V volt(15)=0.80000000V\\n"
               " 3V3_SYS_A current(1)=0.20000000A\\n 3V3_SYS_V volt(9)=3.30000000V\\n")


def fake_vcgencmd(tmp_path: Path, busy_s: float) -> str:
    """A `vcgencmd` that spends `busy_s` of CPU, then answers like the real one."""
    script = tmp_path / "vcgencmd"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"end = time.process_time() + {busy_s}\n"
        "while time.process_time() < end: pass\n"
        "if sys.argv[1] == 'get_throttled': print('throttled=0x50005')\n"
        f"else: sys.stdout.write('{PMIC_OUTPUT}')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def events(stream: io.StringIO, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line["data"] for line in lines if line["kind"] == kind]


def test_run_measured_counts_the_childs_own_cpu(tmp_path):
    run = run_measured([fake_vcgencmd(tmp_path, 0.2), "get_throttled"], timeout_s=60)
    assert run.ok and run.stdout.strip() == "throttled=0x50005"
    assert 0.15 <= run.cpu_s <= run.wall_s + 0.05
    assert not run_measured([str(tmp_path / "missing")]).ok


def test_throttling_word_decoded():
    assert decode_throttled(0x50005) == ["under-voltage", "throttled", "under-voltage occurred",
                                         "throttling occurred"]
    assert decode_throttled(0) == []


def test_board_sampler_reads_sysfs_at_most_once_a_second(tmp_path):
    thermal, throttled = tmp_path / "temp", tmp_path / "get_throttled"
    thermal.write_text("61250\n")
    throttled.write_text("50000\n")
    stream = io.StringIO()
    sampler = BoardStateSampler(EventWriter(stream), hz=50, thermal=thermal,
                                throttled_file=throttled)
    sampler.start()
    sampler.begin()
    time.sleep(0.5)
    thermal.write_text("70500\n")
    throttled.write_text("50004\n")
    time.sleep(1.2)
    sampler.stop()
    readings = events(stream, "board")
    assert len(readings) == 2  # asked for 50 Hz, read at 1 Hz: at 0 s and 1 s
    assert readings[0] == {"temp_c": 61.25, "throttled": "0x50000", "throttled_now": None,
                           "source": "sysfs"}
    assert readings[1]["temp_c"] == 70.5 and readings[1]["throttled_now"] == ["throttled"]
    assert sampler.state.to_metrics() == {
        "cpu_temp_max_c": 70.5, "throttled_bits": "0x50004",
        "throttled": "throttled, under-voltage occurred, throttling occurred"}


def test_vcgencmd_throttling_read_stays_under_one_percent_of_a_core(tmp_path):
    stream = io.StringIO()
    sampler = BoardStateSampler(EventWriter(stream), thermal=tmp_path / "none",
                                vcgencmd=fake_vcgencmd(tmp_path, 0.05))
    sampler.sample()
    assert events(stream, "board")[0]["source"] == "vcgencmd"
    assert sampler._period_s >= 0.3 * 0.05 / SAMPLER_CPU_SHARE  # 1.5 s after one 50 ms read
    assert sampler.state.to_metrics()["cpu_temp_max_c"] is None


def test_pmic_sampler_stretches_its_period_to_its_measured_cost(tmp_path):
    stream = io.StringIO()
    sampler = PmicSampler(EventWriter(stream), hz=5, vcgencmd=fake_vcgencmd(tmp_path, 0.03))
    for _ in range(3):
        sampler.sample()
    power = events(stream, "power")
    assert len(power) == 3 and power[0]["power_w"] == 2.0 * 0.8 + 0.2 * 3.3
    assert all(p["read_cpu_s"] >= 0.025 for p in power)
    # 30 ms of CPU per read -> at least 3 s between reads, not the 0.2 s asked for
    assert sampler._period_s >= 0.025 / SAMPLER_CPU_SHARE
    assert sampler.cpu_share is not None and sampler.cpu_share <= SAMPLER_CPU_SHARE + 1e-9
    cheap_script = tmp_path / "cheap" / "vcgencmd"
    cheap_script.parent.mkdir()
    cheap_script.write_text(f"#!/bin/sh\nprintf '{PMIC_OUTPUT}'\n")
    cheap_script.chmod(0o755)
    cheap = PmicSampler(EventWriter(io.StringIO()), hz=5, vcgencmd=str(cheap_script))
    cheap.sample()
    # the period follows the measured cost (an emulated device's `sh` alone costs ~40 ms)
    assert cheap.mean_cpu_s is not None
    assert cheap._period_s == max(0.2, cheap.mean_cpu_s / SAMPLER_CPU_SHARE)


def test_an_emulated_device_says_so():
    from device_agent.facts import device_facts, emulation

    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU\n"
    pi = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    assert emulation("aarch64", x86) == "qemu-user on Intel(R) Xeon(R) CPU"
    assert emulation("aarch64", pi) is None
    assert emulation("x86_64", x86) is None
    assert "emulation" in device_facts()
