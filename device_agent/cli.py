"""`python -m device_agent {run,clock,facts}`: the device side of the harness.

`run JOB.json [--out DIR]` validates the job, prints `hello`, runs it and
streams events; the exit code is an `AgentExit`. `clock` answers each line on
stdin with the device's wall time until EOF (the host's offset estimate).
`facts` prints the hello facts as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from contract.events import AgentExit, Error, Hello, clock_reply
from contract.fields import SpecError
from contract.jobspec import JobSpec
from device_agent.events import EventWriter
from device_agent.facts import device_facts


def _run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = EventWriter(sys.stdout, out_dir / "events.jsonl")
    try:
        writer.emit(Hello(**device_facts()))
        try:
            spec = JobSpec.from_json(Path(args.job).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            writer.emit(Error(type=type(exc).__name__, message=f"{args.job}: {exc}", oom=False))
            print(f"error: {args.job}: {exc}", file=sys.stderr)
            return AgentExit.BAD_SPEC
        except SpecError as exc:
            writer.emit(Error(type="SpecError", field=exc.field, message=str(exc), oom=False))
            print(f"error: {args.job}: {exc}", file=sys.stderr)
            return AgentExit.BAD_SPEC
        (out_dir / "spec.json").write_text(spec.to_json())
        from device_agent.job import run_job

        return run_job(spec, writer, out_dir)
    finally:
        writer.close()


def _clock(_args: argparse.Namespace) -> int:
    for _line in sys.stdin:
        sys.stdout.write(clock_reply(time.time(), time.monotonic_ns()) + "\n")
        sys.stdout.flush()
    return AgentExit.OK


def _facts(_args: argparse.Namespace) -> int:
    print(json.dumps(device_facts()))
    return AgentExit.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device_agent", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run one job and stream its events")
    run.add_argument("job", help="the job spec (JSON)")
    run.add_argument("--out", default=".", help="directory for events.jsonl and result.json")
    run.set_defaults(handler=_run)
    commands.add_parser("clock", help="answer clock requests on stdin").set_defaults(handler=_clock)
    commands.add_parser("facts", help="print the device facts").set_defaults(handler=_facts)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))
