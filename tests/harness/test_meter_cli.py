"""`harness meter read` against pty emulators, and `harness meter emulate` as a process."""

from __future__ import annotations

import csv
import itertools
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harness.cli import main
from harness.meters.emulator import TraceSignal, UmEmulator


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_meter_read_writes_one_row_per_distinct_record(tmp_path, capsys):
    # A signal that differs at every display refresh, so every record is distinct.
    trace = TraceSignal(np.array([0.0, 0.35, 0.7]), np.array([2.0, 5.0, 2.0]))
    with UmEmulator("um25c", trace, refresh_hz=2, log_path=tmp_path / "signal.csv") as emulator:
        out = tmp_path / "readings.csv"
        code = main(["meter", "read", "--type", "um25c", "--port", emulator.path,
                     "--seconds", "3", "--csv", str(out)])  # fmt: skip
    assert code == 0
    rows = read_csv(out)
    assert list(rows[0])[:4] == ["t_host", "volts", "amps", "watts"]
    emitted = read_csv(tmp_path / "signal.csv")
    watts = [float(row["watts"]) for row in rows]
    assert 4 <= len(rows) <= 8  # about two a second, not the four polls a second
    assert all(a != b for a, b in itertools.pairwise(watts)), "a repeat was kept"
    emitted_w = {round(float(row["power_w"]), 3) for row in emitted}
    assert {round(w, 3) for w in watts} <= emitted_w
    assert all(float(row["volts"]) == pytest.approx(5.1) for row in rows)
    t_host = [float(row["t_host"]) for row in rows]
    assert t_host == sorted(t_host) and t_host[-1] > time.time() - 5
    assert "0 rejected records, 0 gaps" in capsys.readouterr().out


def test_emulate_prints_its_path_and_read_follows_it(tmp_path):
    link = tmp_path / "ttyACM0"
    emulate = subprocess.Popen(
        [sys.executable, "-m", "harness", "meter", "emulate", "--type", "line",
         "--watts", "3.5", "--rate-hz", "200", "--link", str(link)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        path = emulate.stdout.readline().strip()
        assert path == str(link)
        out = tmp_path / "line.csv"
        code = main(["meter", "read", "--type", "line", "--port", path,
                     "--seconds", "1.5", "--csv", str(out)])  # fmt: skip
        assert code == 0
    finally:
        emulate.send_signal(signal.SIGINT)
        _, stderr = emulate.communicate(timeout=10)
    assert emulate.returncode == 0, stderr
    assert "stopped; faults injected: none" in stderr
    rows = read_csv(out)
    assert len(rows) > 150
    assert np.allclose([float(row["watts"]) for row in rows], 3.5, rtol=1e-5)
    t_meter = np.array([float(row["t_meter"]) for row in rows])
    assert np.allclose(np.diff(t_meter), 0.005)
    assert not link.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["meter", "read", "--type", "um25c"], "meter.port: missing"),
        (["meter", "read", "--type", "line", "--port", "/x", "--columns", "t_us,bus_kV"],
         "meter.columns: 't_us,bus_kV'"),
        (["meter", "read", "--type", "um25c", "--port", "/x", "--seconds", "-1"],
         "--seconds: -1.0 must be positive"),
        (["meter", "emulate", "--type", "um34c", "--faults", "melt=1"], "unknown fault 'melt'"),
        (["meter", "emulate", "--type", "um25c", "--follow-pid", "999999999"],
         "--follow-pid: 999999999: no process"),
        (["meter", "emulate", "--type", "line", "--trace", "/nonexistent.csv"],
         "/nonexistent.csv: cannot read trace"),
    ],
)  # fmt: skip
def test_bad_usage_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_port_that_never_answers_is_an_error(tmp_path, capsys):
    code = main(["meter", "read", "--type", "um24c", "--port", str(tmp_path / "absent"),
                 "--seconds", "0.6"])  # fmt: skip
    assert code == 1
    assert "no samples from the um24c meter at" in capsys.readouterr().err
