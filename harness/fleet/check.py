"""Checking devices before a run: can we reach, trust and use each one?

`check_devices` looks at every device at once (one thread each, every remote
call with a timeout) and returns one `DeviceCheck` per device; a failure is a
field of the record, never an exception that hides the other devices.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paramiko

from contract.layout import CODE_DIR
from harness.clock import estimate_offset
from harness.errors import DeviceUnreachable, HarnessError, HarnessUsageError
from harness.fleet.errors import AuthenticationFailed, HostKeyRejected
from harness.fleet.probe import (
    DeviceProbe,
    install_command,
    parse_probe,
    probe_argv,
    probe_device,
)
from harness.fleet.transport import SshTransport
from harness.inventory import Device

CLOCK_SAMPLES = 8


@dataclass
class DeviceCheck:
    """Everything `harness devices check` reports about one device."""

    name: str
    address: str
    reachable: bool | None = None
    authenticated: bool | None = None
    host_key: str = "unchecked"
    python: str | None = None
    torch: str | None = None
    psutil: str | None = None
    deployed: bool | None = None
    mem_available_bytes: int | None = None
    disk_free_bytes: int | None = None
    cpu_temp_c: float | None = None
    throttled: str | None = None
    fused_kernels: str | None = None  # see DeviceProbe.fused_kernels
    machine: str | None = None
    warnings: list[str] = field(default_factory=list)  # usable, but costly (DeviceProbe)
    meter: str = "none"
    clock_offset_s: float | None = None
    clock_rtt_s: float | None = None
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "usable": self.usable}


def _meter_status(device: Device) -> tuple[str, str | None]:
    """A short description of the device's meter and a problem, if any."""
    if not device.meter:
        return "none", None
    try:
        from harness.meters import meter_from_config

        meter_from_config(device.meter, device.name)
    except HarnessUsageError as exc:
        return "invalid", str(exc)
    except ImportError:
        pass  # the meters package is optional for this check
    kind = str(device.meter.get("type", "?"))
    port = device.meter.get("port")
    what = _measures(kind, getattr(device, "transport", "local"))
    if isinstance(port, str):
        if not os.path.exists(port):
            return f"{kind} {port} missing", f"meter port {port} does not exist on the host"
        return f"{kind} {port}: {what}", None
    return f"{kind}: {what}", None


def _measures(kind: str, transport: str) -> str:
    """Which source measures what, in a few words (`devices check`'s meter column)."""
    if kind == "modeled":
        where = "this host's" if transport == "local" else "the device's own"
        reader = "the host" if transport == "local" else "the device agent"
        return f"modeled by {reader} from {where} CPU utilisation and frequency (an estimate)"
    if kind == "pmic":
        return "measured on the device (PMIC rails, not the board's input)"
    if kind == "rapl":
        return "measured by this host's CPU energy counters (the host, not a device)"
    return "measured at the device's supply, read by the host"


def _apply_probe(check: DeviceCheck, probe: DeviceProbe, workdir: str) -> None:
    check.python = probe.python
    check.torch = probe.modules.get("torch")
    check.psutil = probe.modules.get("psutil")
    check.mem_available_bytes = probe.mem_available_bytes
    check.disk_free_bytes = probe.disk_free_bytes
    check.cpu_temp_c = probe.cpu_temp_c
    check.throttled = probe.throttled
    check.fused_kernels = probe.fused_kernels
    check.machine = probe.machine
    check.warnings = probe.warnings
    check.deployed = bool(probe.device_agent_path) and probe.device_agent_path.startswith(
        posixpath.join(workdir, CODE_DIR) + "/"
    )
    if probe.missing and check.problem is None:
        check.problem = (
            f"{probe.executable} lacks {', '.join(probe.missing)}: "
            f"run `{install_command(probe.executable, probe.missing)}` on the device "
            f"or `harness devices setup --install`"
        )


def check_ssh_device(device: Device, inventory: str) -> DeviceCheck:
    check = DeviceCheck(device.name, f"{device.user or ''}@{device.host}:{device.port}")
    check.meter, check.problem = _meter_status(device)
    transport = SshTransport(device, inventory_hint=inventory)
    try:
        try:
            transport.open()
        except HostKeyRejected as exc:
            check.reachable, check.host_key = True, transport.connection.host_key.state
            check.problem = str(exc)
            return check
        except AuthenticationFailed as exc:
            check.reachable, check.authenticated = True, False
            check.host_key = transport.connection.host_key.state
            check.problem = str(exc)
            return check
        except DeviceUnreachable as exc:
            check.reachable, check.problem = False, str(exc)
            return check
        check.reachable = check.authenticated = True
        check.host_key = transport.connection.host_key.state
        assert transport.workdir is not None
        probe = probe_device(transport.connection, device.python, transport.workdir)
        _apply_probe(check, probe, transport.workdir)
        if check.deployed:
            estimate = estimate_offset(transport, CLOCK_SAMPLES)
            check.clock_offset_s, check.clock_rtt_s = estimate.offset_s, estimate.rtt_s
    except HarnessError as exc:
        check.problem = check.problem or str(exc)
    except (paramiko.SSHException, EOFError, OSError) as exc:  # a field, never a traceback
        check.problem = check.problem or f"SSH failed: {type(exc).__name__}: {exc}"
    finally:
        transport.close()
    return check


def check_local_device(device: Device) -> DeviceCheck:
    """The local machine: no network, the same probe run as a subprocess."""
    check = DeviceCheck(device.name, "local", reachable=True, authenticated=True,
                        host_key="n/a", clock_offset_s=0.0, clock_rtt_s=0.0)
    check.meter, check.problem = _meter_status(device)
    workdir = str(Path(device.workdir).expanduser().resolve())
    try:
        result = subprocess.run(
            probe_argv(device.python, workdir),
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        check.problem = f"{device.python} did not run: {exc}"
        return check
    if result.returncode != 0:
        check.problem = f"{device.python} did not run: {result.stderr.strip()[-200:]}"
        return check
    _apply_probe(check, parse_probe(result.stdout), workdir)
    check.deployed = None  # the local transport runs the code in place
    return check


def check_devices(devices: list[Device], inventory: str, timeout_s: float = 300.0
                  ) -> list[DeviceCheck]:
    """Check all devices concurrently; results in inventory order."""
    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(devices))) as pool:
        futures = [
            pool.submit(check_local_device, d) if d.transport == "local"
            else pool.submit(check_ssh_device, d, inventory)
            for d in devices
        ]
        results = []
        for device, future in zip(devices, futures):
            try:
                results.append(future.result(timeout=timeout_s))
            except FutureTimeout:
                results.append(DeviceCheck(device.name, device.host or "local",
                                           problem=f"no answer within {timeout_s:.0f} s"))
        return results
