"""`harness meter read` (check one meter on its own) and `harness meter emulate` (a pty meter)."""

from __future__ import annotations

import argparse
import csv
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus
from harness.meters import METER_TYPES, meter_from_config
from harness.meters.base import MeterError, PowerSample
from harness.meters.emulator import (
    ConstantSignal,
    FaultPlan,
    LineEmulator,
    LoadSignal,
    PtyEmulator,
    Signal,
    TraceSignal,
    UmEmulator,
)
from harness.meters.modeled import POWER_PROFILES
from harness.meters.recorder import Recorder
from harness.meters.um import UM_MODELS

EMULATED_TYPES = (*UM_MODELS, "line")
CSV_COLUMNS = ("t_host", "volts", "amps", "watts", "t_meter", "modeled")


class CsvSink:
    """Takes the recorder's samples: one CSV row each, and the latest for the live view."""

    def __init__(self, handle: TextIO | None) -> None:
        self._writer = csv.writer(handle) if handle else None
        self._handle = handle
        if self._writer:
            self._writer.writerow(CSV_COLUMNS)
        self.lock = threading.Lock()
        self.latest: PowerSample | None = None
        self.samples = 0
        self.gaps: list[str] = []

    def add_power_samples(self, device: str, meter: str, samples: Sequence[PowerSample]) -> None:
        with self.lock:
            if self._writer:
                self._writer.writerows(
                    (s.t_host_s, s.volts, s.amps, s.power_w, s.t_meter_s, int(s.modeled))
                    for s in samples
                )
                self._handle.flush()
            self.samples += len(samples)
            if samples:
                self.latest = samples[-1]

    def add_meter_gap(
        self, device: str, meter: str, t_start_s: float, t_end_s: float, reason: str
    ) -> None:
        with self.lock:
            self.gaps.append(f"{t_end_s - t_start_s:.2f} s without samples: {reason}")

    def set_meter_stats(self, *args: object, **kwargs: object) -> None:
        """Statistics are shown from the recorder directly."""


def _view(sink: CsvSink, recorder: Recorder, kind: str, port: str) -> Table:
    table = Table(title=f"{kind} at {port}", show_header=True)
    for column in ("watts", "volts", "amps", "samples", "rate Hz", "rejected", "gaps"):
        table.add_column(column, justify="right")
    with sink.lock:
        latest, samples, gaps = sink.latest, sink.samples, len(sink.gaps)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table.add_row(
        fmt(latest.power_w if latest else None),
        fmt(latest.volts if latest else None),
        fmt(latest.amps if latest else None),
        str(samples),
        f"{recorder.stats.achieved_hz:.2f}",
        str(recorder.rejected_records),
        str(gaps),
    )
    return table


def run_read(args: argparse.Namespace) -> int:
    config: dict[str, object] = {"type": args.type}
    for key in ("port", "baud", "poll_hz", "columns", "profile", "pid"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    meter = meter_from_config(config)
    if meter is None:
        raise HarnessUsageError(f"--type: {args.type!r} is read by the device agent, not here")
    if args.seconds is not None and args.seconds <= 0:
        raise HarnessUsageError(f"--seconds: {args.seconds!r} must be positive")
    console = Console()
    handle = None
    if args.csv is not None:
        try:
            handle = open(args.csv, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise HarnessUsageError(f"--csv: {args.csv}: {exc.strerror}") from exc
    sink = CsvSink(handle)
    recorder = Recorder(meter, sink, "local")
    deadline = time.monotonic() + args.seconds if args.seconds else None
    recorder.start()
    try:
        with Live(
            _view(sink, recorder, args.type, args.port or "this host"),
            console=console,
            refresh_per_second=4,
        ) as live:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.25)
                live.update(_view(sink, recorder, args.type, args.port or "this host"))
    finally:
        stats = recorder.stop()
        if handle is not None:
            handle.close()
    if not console.is_terminal:
        console.line()  # the last live frame ends without a newline off a terminal
    for gap in sink.gaps:
        console.print(f"gap: {gap}")
    console.print(
        f"{stats.samples} samples, {stats.achieved_hz:.2f} Hz, "
        f"{recorder.rejected_records} rejected records, {stats.gaps} gaps"
    )
    if stats.samples == 0:
        detail = f": {stats.errors[-1]}" if stats.errors else ""
        where = f" at {args.port}" if args.port else ""
        raise HarnessError(f"no samples from the {args.type} meter{where}{detail}")
    return ExitStatus.OK


def _signal(args: argparse.Namespace) -> Signal:
    profile = POWER_PROFILES[args.profile]
    if args.trace is not None:
        return TraceSignal.from_csv(args.trace)
    if args.follow_pid is not None:
        try:
            return LoadSignal(profile, pid=args.follow_pid)
        except MeterError as exc:
            raise HarnessUsageError(f"--follow-pid: {args.follow_pid}: {exc}") from None
    if args.watts is not None:
        if args.watts < 0:
            raise HarnessUsageError(f"--watts: {args.watts!r} must not be negative")
        return ConstantSignal(args.watts)
    return ConstantSignal(profile.idle_w)


def run_emulate(args: argparse.Namespace) -> int:
    faults = FaultPlan.parse(args.faults or "")
    signal = _signal(args)
    options = {"faults": faults, "link": args.link, "log_path": args.log}
    emulator: PtyEmulator
    if args.type == "line":
        emulator = LineEmulator(signal, rate_hz=args.rate_hz, **options)
    else:
        emulator = UmEmulator(args.type, signal, refresh_hz=args.refresh_hz, **options)
    try:
        emulator.start()
    except OSError as exc:
        raise HarnessUsageError(f"--link: {args.link}: {exc.strerror}") from exc
    print(emulator.path, flush=True)
    print(
        f"emulating a {args.type} at {emulator.path} -> {emulator.endpoint.slave_name}; "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    try:
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
    injected = ", ".join(f"{k} {v}" for k, v in sorted(emulator.injected.items())) or "none"
    print(f"stopped; faults injected: {injected}", file=sys.stderr)
    return ExitStatus.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("meter", help="read a power meter on its own, or emulate one")
    actions = parser.add_subparsers(dest="meter_command", required=True, metavar="ACTION")

    read = actions.add_parser("read", help="live readings of one meter (optionally to CSV)")
    read.add_argument("--type", required=True, choices=METER_TYPES)
    read.add_argument("--port", help="serial port (um24c/um25c/um34c/line)")
    read.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    read.add_argument("--csv", type=Path, help="write t_host,volts,amps,watts,... rows here")
    read.add_argument("--baud", type=int)
    read.add_argument("--poll-hz", dest="poll_hz", type=float, help="UM poll rate")
    read.add_argument("--columns", help="line meters: e.g. t_us,bus_mV,current_uA")
    read.add_argument("--profile", choices=POWER_PROFILES, help="modeled: device profile")
    read.add_argument("--pid", type=int, help="modeled: follow this process tree")
    read.set_defaults(handler=run_read)

    emulate = actions.add_parser("emulate", help="emulate a meter on a pty; prints its path")
    emulate.add_argument("--type", required=True, choices=EMULATED_TYPES)
    source = emulate.add_mutually_exclusive_group()
    source.add_argument("--watts", type=float, help="constant power")
    source.add_argument("--trace", type=Path, help="CSV with t_s,power_w, replayed in a loop")
    source.add_argument(
        "--follow-pid",
        dest="follow_pid",
        type=int,
        help="CPU load of this process tree through --profile",
    )
    emulate.add_argument("--profile", choices=POWER_PROFILES, default="pi4")
    emulate.add_argument(
        "--faults", help="e.g. torn=0.05,corrupt=0.02,checksum=0.02,stall=30:2,unplug=20:3,seed=1"
    )
    emulate.add_argument("--link", type=Path, help="stable path of the pty (a symlink)")
    emulate.add_argument("--log", type=Path, help="log the emitted signal (t_host_s,power_w)")
    emulate.add_argument(
        "--refresh-hz", dest="refresh_hz", type=float, default=2.0, help="UM display refresh rate"
    )
    emulate.add_argument(
        "--rate-hz", dest="rate_hz", type=float, default=1000.0, help="line meter: lines per second"
    )
    emulate.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    emulate.set_defaults(handler=run_emulate)
