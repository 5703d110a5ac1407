"""Throughput of the meter recorder: N line-based meters at R lines/s each, on real ptys.

The emulated boards run in a separate, lower-priority process (so their CPU is not
billed to, nor taken from, the host side); the host side runs one recorder per meter into
a real run store. Afterwards every meter's board-clock sequence in the store is checked
for holes: a lost line is a missing step of exactly 1/R seconds, and the last line each
board sent must be in the store.

    python benchmarks/meter_throughput.py [--meters 32] [--rate-hz 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from harness.meters import start_recorder
from harness.meters.emulator import ConstantSignal, LineEmulator
from harness.store import RunStore


def run_boards(count: int, rate_hz: float, directory: str, conn) -> None:
    """Child process: `count` emulated boards; reports what each sent when told to stop.

    It runs at a lower priority: real boards do not share the host's CPU, so the boards'
    emulation should not take it from the recorders being measured.
    """
    os.nice(10)
    boards = [
        LineEmulator(ConstantSignal(2.0 + 0.1 * i), rate_hz=rate_hz, link=Path(directory) / f"m{i}")
        for i in range(count)
    ]
    for board in boards:
        board.start()
    conn.send([board.path for board in boards])
    conn.recv()  # "stop sending"
    for board in boards:
        board.stall(3600)
    time.sleep(1.0)  # longer than a board's transmit buffer (0.5 s): all writes are done
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(
        {
            "last_t_us": [board.last_t_us for board in boards],
            "lines_sent": [board.lines_sent for board in boards],
            "overrun_bytes": [board.overrun_bytes for board in boards],
            "cpu_s": cpu.ru_utime + cpu.ru_stime,
        }
    )
    conn.recv()  # "exit"
    for board in boards:
        board.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=32)
    parser.add_argument("--rate-hz", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    period_us = round(1e6 / args.rate_hz)

    with tempfile.TemporaryDirectory(prefix="meter-bench-") as directory:
        ours, theirs = mp.Pipe()
        boards = mp.Process(
            target=run_boards, args=(args.meters, args.rate_hz, directory, theirs), daemon=True
        )
        boards.start()
        paths = ours.recv()
        store = RunStore.create(Path(directory) / "run").start()
        config = {"type": "line", "rate_hz": args.rate_hz}
        load_before = os.getloadavg()
        cpu0, wall0 = time.process_time(), time.monotonic()
        recorders = [
            start_recorder({**config, "port": path, "name": f"m{i}"}, store, "bench")
            for i, path in enumerate(paths)
        ]
        time.sleep(args.seconds)
        ours.send("stop")
        sent = ours.recv()
        time.sleep(1.0)  # let the recorders drain what is still in flight
        for recorder in recorders:
            recorder.stop()
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        load_after = os.getloadavg()
        store.flush(timeout_s=120)
        rows = store.query(
            "SELECT meter, COUNT(*) AS n, MIN(t_meter_s) AS first, MAX(t_meter_s) AS last "
            "FROM power_samples GROUP BY meter"
        )
        steps = store.query(
            "SELECT meter, COUNT(*) AS bad FROM (SELECT meter, t_meter_s - LAG(t_meter_s) "
            "OVER (PARTITION BY meter ORDER BY t_meter_s) AS step FROM power_samples) "
            "WHERE ABS(step * 1e6 - ?) > 0.5 GROUP BY meter",
            (period_us,),
        )
        gaps = store.query("SELECT COUNT(*) AS n FROM meter_gaps")[0]["n"]
        stats = store.query("SELECT SUM(rejected_records) AS r FROM meter_stats")[0]["r"]
        store.close()
        ours.send("exit")
        boards.join(timeout=10)

    by_meter = {row["meter"]: row for row in rows}
    bad_steps = {row["meter"]: row["bad"] for row in steps}
    lost = 0
    tail_missing = 0
    recorded = 0
    for i in range(args.meters):
        row = by_meter.get(f"m{i}")
        if row is None:
            print(f"m{i}: no samples at all", file=sys.stderr)
            return 1
        recorded += row["n"]
        expected = round((row["last"] - row["first"]) * 1e6 / period_us) + 1
        lost += expected - row["n"]
        if round(row["last"] * 1e6) != sent["last_t_us"][i]:
            tail_missing += (sent["last_t_us"][i] - round(row["last"] * 1e6)) // period_us
    recorded_s = args.seconds
    print(
        f"meters: {args.meters} x {args.rate_hz:g} lines/s for {recorded_s:g} s (line format, ptys)"
    )
    print(f"lines recorded: {recorded} ({recorded / recorded_s:.0f}/s overall)")
    print(
        f"lines lost between first and last recorded: {lost}; "
        f"irregular steps: {sum(bad_steps.values())}; lines sent but not stored: {tail_missing}"
    )
    print(
        f"rejected records: {stats}; gaps: {gaps}; "
        f"emulator overrun bytes: {sum(sent['overrun_bytes'])}"
    )
    print(
        f"host CPU (recorders + run store): {cpu_s:.1f} s in {wall_s:.1f} s wall "
        f"= {cpu_s / wall_s:.2f} cores, {1e6 * cpu_s / max(recorded, 1):.1f} us per line"
    )
    print(f"emulated boards CPU (separate process): {sent['cpu_s']:.1f} s")
    print(
        f"machine load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f}"
        f" on {os.cpu_count()} cores"
    )
    ok = lost == 0 and tail_missing == 0 and not bad_steps and gaps == 0
    print("zero lost lines: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
