"""`harness devices check` (is every device usable?) and `harness devices setup` (deploy)."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from contract.checksum import file_sha256
from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus
from harness.fleet.check import DeviceCheck, check_devices
from harness.inventory import Device, load_inventory

MIB = 1024 * 1024


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f} MiB"


def _flag(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def _kernels(state: str | None) -> str:
    """The fused kernels' column: built, not built (but buildable), or no compiler."""
    return {None: "-", "built": "built", "buildable": "not built"}.get(state, "NO compiler")


def _check_table(checks: list[DeviceCheck]) -> Table:
    table = Table(title="devices")
    for column in ("device", "address", "reach", "auth", "host key", "python", "torch",
                   "psutil", "deployed", "kernels", "mem free", "disk free", "temp", "throttled",
                   "meter", "clock offset", "rtt", "usable"):
        table.add_column(column)
    for c in checks:
        table.add_row(
            c.name, c.address, _flag(c.reachable), _flag(c.authenticated), c.host_key,
            c.python or "-", c.torch or "-", c.psutil or "-", _flag(c.deployed),
            _kernels(c.fused_kernels),
            _size(c.mem_available_bytes), _size(c.disk_free_bytes),
            "-" if c.cpu_temp_c is None else f"{c.cpu_temp_c:.1f} °C",
            c.throttled or "-", c.meter,
            "-" if c.clock_offset_s is None else f"{c.clock_offset_s * 1000:+.2f} ms",
            "-" if c.clock_rtt_s is None else f"{c.clock_rtt_s * 1000:.2f} ms",
            "yes" if c.usable else "[red]NO[/red]",
        )
    return table


def _select(args: argparse.Namespace) -> tuple[list[Device], str]:
    inventory = load_inventory(args.devices)
    return inventory.select(args.only), str(args.devices)


def _check(args: argparse.Namespace) -> int:
    devices, hint = _select(args)
    err = Console(stderr=True)
    err.print(f"checking {len(devices)} device(s) ...")
    checks = check_devices(devices, hint)
    for check in checks:
        if check.problem:
            err.print(f"[red]{check.name}[/red]: {check.problem}", highlight=False)
        for warning in check.warnings:
            err.print(f"[yellow]{check.name}[/yellow]: {warning}", highlight=False)
    if args.format == "json":
        print(json.dumps({"devices": [c.to_dict() for c in checks]}))
    else:
        console = Console(width=200)
        console.print(_check_table(checks))
        for c in checks:  # usable, but lowmem will be slower there (or build in its first job)
            if c.fused_kernels == "buildable" and c.deployed:
                console.print(f"{c.name}: fused kernels not built; `harness devices setup` "
                              "builds them (else the first lowmem job does, before its clock)")
            elif c.fused_kernels and c.fused_kernels not in ("built", "buildable"):
                console.print(f"{c.name}: lowmem blocks will run the {c.fused_kernels}; install "
                              "g++, ninja and python3-dev on the device for the fused kernels")
    return ExitStatus.OK if all(c.usable for c in checks) else ExitStatus.PARTIAL


@dataclass
class SetupResult:
    name: str
    copied: int = 0
    skipped: int = 0
    installed: str | None = None
    kernels: str | None = None  # "built" (now or before), or why not
    problem: str | None = None


# A Pi builds the kernels in a few minutes (one compiler job); this bounds a stuck build.
KERNEL_BUILD_TIMEOUT_S = 3600


def _build_kernels(transport, device: Device, say) -> str:
    """Build the deployed engine's fused kernels on the device unless they are built: once
    per device and source (the device's cache is keyed by the sources' hash)."""
    from harness.fleet.deploy import remote_python_env

    probe = transport.probe
    state = probe.fused_kernels if probe is not None else None
    if state != "buildable":
        return state or "-"
    say(f"{device.name}: building the fused kernels (one compiler job; a few minutes on a Pi)")
    outcome = transport.connection.run(
        [*remote_python_env(transport.workdir), device.python, "-m", "trainers", "kernels",
         "build", "--format", "json"], timeout_s=KERNEL_BUILD_TIMEOUT_S)
    try:
        info = json.loads(outcome.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {"error": (outcome.stderr or outcome.stdout).strip()[-300:]}
    if outcome.exit_code != 0 or "error" in info:
        raise HarnessError(f"device {device.name}: kernel build: {info.get('error')}")
    say(f"{device.name}: fused kernels built in {info.get('build_seconds', 0):.0f} s")
    return "built"


def _setup_one(device: Device, datasets: dict[Path, str], install: bool, hint: str,
               kernels: bool = True, say=print, torch_index: str | None = None,
               replace_cuda_torch: bool = False) -> SetupResult:
    from harness.fleet.errors import DeviceNotReady
    from harness.fleet.install import plan_install, preflight, run_install
    from harness.fleet.transport import SshTransport

    result = SetupResult(device.name)
    if device.transport != "ssh":
        result.problem = "not an ssh device (the local transport runs the code in place)"
        return result
    transport = SshTransport(device, inventory_hint=hint)
    try:
        try:
            transport.ensure_deployed(datasets)
            cuda = transport.probe is not None and transport.probe.torch_cuda
            if install and replace_cuda_torch and cuda and not transport.probe.gpu:
                raise DeviceNotReady(f"device {device.name}: torch is a CUDA build")
        except DeviceNotReady:
            probe = transport.probe  # set when only packages are missing
            if not install or probe is None or not (probe.missing or replace_cuda_torch):
                raise
            plan = plan_install(probe, transport.workdir, torch_index, replace_cuda_torch)
            preflight(probe, plan, device.name)
            run_install(transport.connection, plan, device.name, say)
            result.installed = plan.summary or None
            if plan.venv:
                result.problem = (f"installed into the venv {plan.venv} (the system Python is "
                                  f"externally managed); set `python: {plan.python}` for "
                                  f"{device.name} in {hint} and run setup again")
                return result
            transport.ensure_deployed(datasets)
        if transport.last_deploy is not None:
            result.copied = len(transport.last_deploy.copied)
            result.skipped = len(transport.last_deploy.skipped)
        if kernels:
            result.kernels = _build_kernels(transport, device, say)
    except HarnessError as exc:
        result.problem = str(exc)
    finally:
        transport.close()
    return result


def _setup(args: argparse.Namespace) -> int:
    devices, hint = _select(args)
    datasets = {Path(p): "" for p in args.data or []}
    for path in datasets:
        if not path.is_file():
            raise HarnessUsageError(f"--data: {path} is not a file (prepare it with harness data)")
        datasets[path] = file_sha256(path)  # once, for every device
    err = Console(stderr=True)

    def say(message: str) -> None:
        err.print(message, highlight=False)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(devices)))) as pool:
        results = list(pool.map(
            lambda d: _setup_one(d, datasets, args.install, hint, not args.no_kernels, say,
                                 args.torch_index, args.replace_cuda_torch),
            devices))
    for result in results:
        if result.problem:
            err.print(f"[red]{result.name}[/red]: {result.problem}", highlight=False)
    if args.format == "json":
        print(json.dumps({"devices": [asdict(r) for r in results]}))
    else:
        table = Table(title="setup")
        for column in ("device", "copied", "already there", "installed", "kernels", "ready"):
            table.add_column(column)
        for r in results:
            table.add_row(r.name, str(r.copied), str(r.skipped), r.installed or "-",
                          r.kernels or "-",
                          "yes" if r.problem is None else "[red]NO[/red]")
        Console(width=200).print(table)
    return ExitStatus.OK if all(r.problem is None for r in results) else ExitStatus.PARTIAL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("devices", help="check and set up the devices of an inventory")
    commands = parser.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--devices", required=True, type=Path, metavar="INV",
                        help="inventory file (native or Ansible-style YAML)")
    common.add_argument("--only", action="append", metavar="NAME_OR_TAG",
                        help="only these devices (repeatable)")
    common.add_argument("--format", choices=("table", "json"), default="table")
    check = commands.add_parser(
        "check", parents=[common],
        help="reachability, host key, Python/torch, memory, disk, temperature, clock offset",
    )
    check.set_defaults(handler=_check)
    setup = commands.add_parser(
        "setup", parents=[common],
        help="deploy the device code (and data sets), check the Python packages, build the "
        "fused kernels",
    )
    setup.add_argument("--install", action="store_true",
                       help="pip-install missing Python packages on the devices: torch's CPU "
                       "build (aarch64: torch<2.11 from the default index), in a venv where "
                       "the system Python is externally managed; free disk and memory first")
    setup.add_argument("--torch-index", metavar="URL",
                       help="with --install: take torch from this (CPU) wheel index")
    setup.add_argument("--replace-cuda-torch", action="store_true",
                       help="with --install: replace a CUDA build of torch on a device without "
                       "a GPU by the CPU build and remove its nvidia packages")
    setup.add_argument("--data", action="append", metavar="FILE",
                       help="a prepared data set file to push too (repeatable)")
    setup.add_argument("--no-kernels", action="store_true",
                       help="do not build the engine's fused C++ kernels (by default each "
                       "device builds them once per source; its first lowmem job would)")
    setup.set_defaults(handler=_setup)

