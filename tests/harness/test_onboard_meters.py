"""On-board and software sources: Pi 5 PMIC output, RAPL counters, the modeled source."""

from __future__ import annotations

import ast
import itertools
import time
from pathlib import Path

import pytest

from harness.errors import HarnessUsageError
from harness.meters import meter_from_config
from harness.meters.base import MeterError
from harness.meters.modeled import POWER_PROFILES, ModeledMeter
from harness.meters.pmic import PmicParseError, parse_pmic_adc
from harness.meters.rapl import RaplMeter, energy_delta_uj

# The shape of `vcgencmd pmic_read_adc` on a Raspberry Pi 5 (values made up).
PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05000000A
       1V8_SYS_A current(2)=0.20000000A
      DDR_VDD2_A current(3)=0.02000000A
      VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
       3V3_SYS_V volt(9)=3.30000000V
       1V8_SYS_V volt(10)=1.80000000V
      DDR_VDD2_V volt(11)=1.10000000V
      VDD_CORE_V volt(15)=0.80000000V
         EXT5V_V volt(24)=5.12000000V
          BATT_V volt(25)=0.00000000V
"""


def test_pmic_rails_pair_volts_and_amps():
    reading = parse_pmic_adc(PMIC_OUTPUT)
    rails = {rail.rail: rail for rail in reading.rails}
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "1V8_SYS", "DDR_VDD2", "VDD_CORE"}
    assert rails["VDD_CORE"].power_w == pytest.approx(1.6)
    assert reading.power_w == pytest.approx(0.165 + 0.36 + 0.022 + 1.6)
    assert reading.input_volts == pytest.approx(5.12)
    assert reading.unparsed_lines == 0


def test_pmic_tolerates_junk_and_refuses_nothing_useful():
    reading = parse_pmic_adc(PMIC_OUTPUT + "garbage line\n  X_A current(9)=1.0V\n")
    assert reading.unparsed_lines == 2
    with pytest.raises(PmicParseError, match="no rail"):
        parse_pmic_adc("error: unknown command\n")


def test_pmic_module_is_standard_library_only():
    source = Path(__file__).resolve().parents[2] / "harness" / "meters" / "pmic.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "re", "dataclasses"}


def test_rapl_counter_wraps():
    assert energy_delta_uj(100, 350, 1000) == 250
    assert energy_delta_uj(900, 50, 1000) == 150


def make_powercap(root: Path, energy_uj: int, max_uj: int = 10**6) -> Path:
    zone = root / "intel-rapl:0"
    (root / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone (core), not summed
    zone.mkdir(exist_ok=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    return zone / "energy_uj"


def test_rapl_power_from_a_powercap_tree(tmp_path):
    counter = make_powercap(tmp_path, 999_000)
    meter = RaplMeter(root=tmp_path, interval_s=0.2)
    meter.connect()
    t0 = time.monotonic()
    counter.write_text("4000\n")  # wrapped: 1000 + 4000 uJ
    (sample,) = meter.read()
    elapsed = time.monotonic() - t0
    assert sample.power_w == pytest.approx(5000e-6 / elapsed, rel=0.25)
    assert not sample.modeled


def test_rapl_unreadable_says_why(tmp_path):
    with pytest.raises(MeterError, match="usually root-only"):
        RaplMeter(root=tmp_path).connect()


def test_modeled_meter_labels_every_sample():
    meter = ModeledMeter(POWER_PROFILES["pi5"], interval_s=0.1)
    meter.connect()
    samples = [s for _ in range(3) for s in meter.read()]
    assert len(samples) == 3 and all(s.modeled for s in samples)
    assert all(2.7 <= s.power_w <= 7.5 for s in samples)
    assert samples[0].amps == pytest.approx(samples[0].power_w / 5.1)
    assert POWER_PROFILES["pi4"].power_w(1.5) == POWER_PROFILES["pi4"].busy_w  # clamped


def test_a_late_modeled_read_covers_every_interval_it_spans_without_a_burst_after():
    meter = ModeledMeter(POWER_PROFILES["pi5"], interval_s=0.05)
    meter.connect()
    first = meter.read()
    time.sleep(0.4)  # the reading thread was not scheduled for about 8 intervals
    late = meter.read()
    assert len(first) == 1 and 7 <= len(late) <= 10, (len(first), len(late))
    stamps = [s.t_host_s for s in first + late]
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(0.02 < step < 0.08 for step in steps), steps  # no hole, evenly spread
    assert len({s.power_w for s in late}) == 1  # one mean over the late period
    assert [s.seq for s in first + late] == list(range(1, len(stamps) + 1))
    started = time.monotonic()
    after = meter.read()  # back on its cadence: waits, no burst of near-empty reads
    assert len(after) == 1 and time.monotonic() - started >= 0.02


def test_modeled_profile_takes_the_boards_own_watts_and_refuses_bad_ones():
    meter = meter_from_config({"type": "modeled", "profile": "pi4", "idle_w": 3, "busy_w": 5.5})
    assert (meter.profile.idle_w, meter.profile.busy_w) == (3.0, 5.5)
    assert meter.profile.name == "pi4 (calibrated)"
    assert meter.profile.power_w(0.5) == pytest.approx(4.25)
    assert meter_from_config({"type": "modeled", "profile": "pi4"}).profile == POWER_PROFILES["pi4"]
    for config, message in (
        ({"busy_w": 2.0}, r"device d1: meter.busy_w: 2.0 is below idle_w 2.7"),
        ({"idle_w": -1}, r"device d1: meter.idle_w: -1 must be positive"),
        ({"idle_w": "low"}, r"device d1: meter.idle_w: 'low' is not a float"),
    ):
        with pytest.raises(HarnessUsageError, match=message):
            meter_from_config({"type": "modeled", "profile": "pi4", **config}, "d1")
