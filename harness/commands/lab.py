"""`harness lab up/down`: pretend devices (real sshd processes) to try the harness without Pis."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from harness.arm64_root import Arm64Root, default_cache_dir
from harness.exit_codes import ExitStatus
from harness.lab import ARCHES, NATIVE_ARCH, Lab

DEFAULT_LAB_DIR = Path("bnn-lab")


def _up(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    console = Console(stderr=True)
    started = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[{time.monotonic() - started:6.0f} s] {message}", highlight=False)

    builder = None
    if args.arch != NATIVE_ARCH:
        builder = Arm64Root(args.cache, mirror=args.mirror, progress=progress)
        if not builder.ready():
            progress(f"no arm64 root cached at {builder.directory} yet: building it now")
    inventory = lab.up(args.devices, netns=args.netns, arch=args.arch, root_builder=builder)
    for device in lab.devices:
        where = f" in netns {device.netns}" if device.netns else ""
        kind = " (aarch64 Debian bookworm, emulated by qemu-user)" if device.lower_root else ""
        console.print(f"{device.name}: sshd{kind} on {device.host}:{device.port}{where}, "
                      f"work directory {device.workdir}", highlight=False)
    console.print(f"inventory: {inventory}\nnext: harness devices check --devices {inventory}"
                  f"\n      harness run --devices {inventory}\nstop: harness lab down "
                  f"--dir {lab.root}", highlight=False)
    print(inventory)
    return ExitStatus.OK


def _down(args: argparse.Namespace) -> int:
    lab = Lab(args.dir)
    count = len(lab.devices)
    lab.down()
    Console(stderr=True).print(f"stopped {count} device(s) of {lab.root}", highlight=False)
    return ExitStatus.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lab", help="start or stop local pretend devices (sshd) for trying the harness"
    )
    commands = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = commands.add_parser("up", help="start N devices and write DIR/inventory.yaml")
    up.add_argument("--devices", type=int, default=3, metavar="N", help="how many (default 3)")
    up.add_argument("--dir", type=Path, default=DEFAULT_LAB_DIR,
                    help=f"lab directory (default ./{DEFAULT_LAB_DIR})")
    up.add_argument("--netns", action="store_true",
                    help="put each device in its own network namespace (root only)")
    up.add_argument("--arch", choices=ARCHES, default=NATIVE_ARCH,
                    help="native: this machine's own Python; arm64: emulated aarch64 Debian "
                         "bookworm devices (root only; the root is built once and cached)")
    up.add_argument("--cache", type=Path, default=default_cache_dir(),
                    help="where the arm64 root is cached (default %(default)s)")
    up.add_argument("--mirror", metavar="URL",
                    help="Debian mirror for building the arm64 root (default: the one this "
                         "host's apt uses)")
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop the devices of a lab")
    down.add_argument("--dir", type=Path, default=DEFAULT_LAB_DIR)
    down.set_defaults(handler=_down)
