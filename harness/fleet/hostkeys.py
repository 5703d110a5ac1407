"""Host-key verification: known keys only, trust on first use only when the inventory says so.

Fabric 3 installs paramiko's `AutoAddPolicy` (silent trust on first use);
`install_host_key_checking` replaces it with a policy that refuses unknown
keys with a message saying how to add them, or, with `trust_on_first_use`,
records them in the known_hosts file and says so.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from harness.fleet.errors import HostKeyRejected
from harness.inventory import Device

log = logging.getLogger(__name__)
# Several devices may share one known_hosts file; appends are serialised.
_KNOWN_HOSTS_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """The `SHA256:...` fingerprint OpenSSH prints for a key."""
    return key.fingerprint


def host_key_name(device: Device) -> str:
    """How known_hosts names the device: `host` on port 22, `[host]:port` otherwise."""
    return device.host if device.port == 22 else f"[{device.host}]:{device.port}"


def keyscan_hint(device: Device) -> str:
    port = "" if device.port == 22 else f"-p {device.port} "
    return f"ssh-keyscan {port}{device.host} >> {device.known_hosts_path}"


@dataclass
class HostKeyStatus:
    """What host-key checking concluded for one connection."""

    state: str = "unchecked"  # known | trusted-on-first-use | unknown | mismatch | unchecked
    fingerprint: str | None = None


class _VerifyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only when known_hosts has no key for the host."""

    def __init__(self, device: Device, status: HostKeyStatus) -> None:
        self.device = device
        self.status = status

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey):
        self.status.fingerprint = fingerprint(key)
        path = self.device.known_hosts_path
        if not self.device.trust_on_first_use:
            self.status.state = "unknown"
            raise HostKeyRejected(
                f"device {self.device.name}: host key of {hostname} ({key.get_name()} "
                f"{self.status.fingerprint}) is not in {path}; check the fingerprint on the "
                f"device and add it with `{keyscan_hint(self.device)}`, or set "
                f"trust_on_first_use: true for this device in the inventory"
            )
        with _KNOWN_HOSTS_LOCK:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        self.status.state = "trusted-on-first-use"
        log.warning(
            "device %s: trusted host key of %s on first use (%s %s), recorded in %s",
            self.device.name, hostname, key.get_name(), self.status.fingerprint, path,
        )


def install_host_key_checking(client: paramiko.SSHClient, device: Device) -> HostKeyStatus:
    """Load the device's known_hosts into `client` and refuse unknown keys (unless TOFU)."""
    status = HostKeyStatus()
    client._system_host_keys.clear()  # only the file the inventory chose counts
    client.get_host_keys().clear()
    path: Path = device.known_hosts_path
    if path.exists():
        client.get_host_keys().load(str(path))
    client.set_missing_host_key_policy(_VerifyPolicy(device, status))
    return status


def mismatch_error(device: Device, exc: paramiko.BadHostKeyException) -> HostKeyRejected:
    """The refusal for a changed host key, with the command that removes the old one."""
    name = host_key_name(device)
    return HostKeyRejected(
        f"device {device.name}: HOST KEY MISMATCH for {name}: {device.known_hosts_path} has "
        f"{exc.expected_key.get_name()} {fingerprint(exc.expected_key)}, the device offered "
        f"{exc.key.get_name()} {fingerprint(exc.key)}; refusing to connect. If the device was "
        f"re-imaged, remove the old key with `ssh-keygen -R '{name}' -f "
        f"{device.known_hosts_path}` and add the new one after checking it "
        f"(`{keyscan_hint(device)}`)"
    )
