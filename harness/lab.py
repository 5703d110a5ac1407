"""A lab of pretend devices on this machine: each a real OpenSSH `sshd`.

`Lab(root).up(n)` starts n devices, each with its own host key, port, work
directory and sshd configuration under `root/devices/<name>/`, one user key
for all of them, and writes `root/inventory.yaml` and `root/known_hosts` so
that `harness devices check --devices root/inventory.yaml` and `harness run`
work against them. Devices listen on 127.0.0.1, or, with `netns=True` (root
only), each sits in its own network namespace behind a veth pair, so a test
can cut its link or add `tc netem` delay. The state survives the process
(`root/lab.json`), so `harness lab down` can stop a lab started earlier.

With `arch="arm64"` each device is an emulated aarch64 Debian bookworm machine: the cached
root of `harness.arm64_root` (built once per machine) under a per-device overlay (its
writes land in `devices/<name>/upper/`, the cache stays clean), chrooted in a private mount
namespace, running the root's own aarch64 sshd through qemu-user. The device's Python,
torch, g++ and everything the agent runs are aarch64 programs; its speed is emulated.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from harness.arm64_root import PYTHON as ARM64_PYTHON
from harness.arm64_root import Arm64Root, ensure_binfmt
from harness.errors import HarnessError, HarnessUsageError

SSHD = Path(os.environ.get("BNN_SSHD", "/usr/sbin/sshd"))
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
STATE_FILE = "lab.json"
NETNS_PREFIX = "bnnlab"
NATIVE_ARCH = "native"
ARCHES = (NATIVE_ARCH, "arm64")
ARM64_FILES = "/etc/bnn-lab"  # an arm64 device's sshd files, inside its root
ARM64_WORKDIR = "/root/bnn-work"
ARM64_SSHD_START_S = 90.0  # an emulated sshd takes seconds to start on a busy host
# Mount the device's overlay (lower: the cached root), /proc, /dev and /sys in a private
# mount namespace, then run the root's own sshd there; it daemonises and keeps the namespace.
# With a thermal zone (`thermal`: a directory, else empty), it is bound over the root's
# /sys/class/thermal after sysfs is mounted.
_ARM64_START = (
    'lower=$1 upper=$2 work=$3 merged=$4 thermal=$5; shift 5; '
    'mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged" && '
    'mount -t proc proc "$merged/proc" && mount --rbind /dev "$merged/dev" && '
    'mount -t sysfs sysfs "$merged/sys" && '
    '{ [ -z "$thermal" ] || mount --bind "$thermal" "$merged/sys/class/thermal"; } && '
    'exec chroot "$merged" "$@"'
)
# A native device with a thermal zone: its sshd in a private mount namespace where the
# device's `thermal/` directory stands in for /sys/class/thermal (harness.thermal).
_NATIVE_THERMAL_START = 'mount --bind "$1" /sys/class/thermal && shift && exec "$@"'



@dataclass
class LabDevice:
    """One pretend device: where its sshd listens and where its files are."""

    name: str
    host: str
    port: int
    directory: str
    workdir: str
    netns: str | None = None
    host_veth: str | None = None
    arch: str = NATIVE_ARCH
    lower_root: str | None = None  # arm64: the cached root under this device's overlay
    thermal: bool = False  # its own /sys/class/thermal (`thermal_dir`, written by harness.thermal)

    @property
    def thermal_dir(self) -> Path:
        """The directory the device sees as /sys/class/thermal (when `thermal`)."""
        return Path(self.directory) / "thermal"

    def host_path(self, device_path: str) -> Path:
        """Where a path of the device is on this machine (arm64: in its overlay's upper
        layer, which holds everything the device wrote; native: the same path)."""
        if self.lower_root is None:
            return Path(device_path)
        return Path(self.directory) / "upper" / device_path.lstrip("/")

    @property
    def _files(self) -> Path:
        """The device's sshd files, as this machine sees them."""
        return self.host_path(ARM64_FILES) if self.lower_root else Path(self.directory)

    @property
    def pid_file(self) -> Path:
        return self._files / "sshd.pid"

    @property
    def config_file(self) -> Path:
        return self._files / "sshd_config"

    @property
    def host_key_file(self) -> Path:
        return self._files / "ssh_host_ed25519_key"

    def device_file(self, host_file: Path) -> str:
        """The path the device's own sshd uses for one of its files."""
        if self.lower_root is None:
            return str(host_file)
        return f"{ARM64_FILES}/{host_file.name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True,
    )


def _unused_private_octet() -> int:
    """A second octet X such that no interface here has an address in 10.X.0.0/16."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [x for x in range(64, 255) if f" 10.{x}." not in used]
    if not free:
        raise HarnessError("no free 10.X.0.0/16 range for the lab's veth links")
    return random.choice(free)


def netns_available() -> bool:
    """True when this process may create network namespaces (root with iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"{NETNS_PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


def netem_available() -> bool:
    """True when the kernel has the netem queueing discipline (`tc qdisc ... netem`)."""
    if not netns_available() or shutil.which("tc") is None:
        return False
    name = f"{NETNS_PREFIX}-netem-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], capture_output=True)
    try:
        probe = subprocess.run(
            ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root",
             "netem", "delay", "1ms"],
            capture_output=True,
        )
        return probe.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Lab:
    """Pretend devices under one directory; `up`, `down`, and per-device faults."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.devices: list[LabDevice] = []
        state = self.root / STATE_FILE
        if state.exists():
            self.devices = [LabDevice(**d) for d in json.loads(state.read_text())["devices"]]

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory.yaml"

    @property
    def known_hosts_path(self) -> Path:
        return self.root / "known_hosts"

    @property
    def user_key(self) -> Path:
        return self.root / "keys" / "id_ed25519"

    def device(self, name: str) -> LabDevice:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)

    # ------------------------------------------------------------ up / down

    def up(self, count: int, *, netns: bool = False, python: str | None = None,
           arch: str = NATIVE_ARCH, root_builder: Arm64Root | None = None,
           thermal: bool = False) -> Path:
        """Start `count` devices and write the inventory; returns its path.

        `arch="arm64"`: emulated aarch64 devices on the root `root_builder` provides
        (built first if this machine has none: once, with progress). `thermal`: each device
        has its own thermal zone at /sys/class/thermal/thermal_zone0 (root only), whose
        temperature a `harness.thermal.ThermalZoneEmulator` drives from its load."""
        if arch not in ARCHES:
            raise HarnessUsageError(f"--arch: {arch!r} (choices: {', '.join(ARCHES)})")
        if count < 1:
            raise HarnessUsageError(f"--devices: expected at least 1 device, got {count}")
        if not SSHD.exists():
            raise HarnessError(
                f"{SSHD} not found; install OpenSSH's server (apt-get install openssh-server)"
            )
        if self.devices:
            raise HarnessUsageError(
                f"{self.root}: a lab is already up here; run `harness lab down --dir {self.root}`"
            )
        if netns and not netns_available():
            raise HarnessError("network namespaces need root and iproute2; run without --netns")
        if thermal and (os.geteuid() != 0 or not Path("/sys/class/thermal").is_dir()):
            raise HarnessError("a lab device's thermal zone needs root and /sys/class/thermal "
                               "(a bind mount in its own mount namespace)")
        lower_root = None
        if arch == "arm64":
            if os.geteuid() != 0:
                raise HarnessError("arm64 lab devices need root (overlay mounts, chroot)")
            builder = root_builder or Arm64Root()
            lower_root = str(builder.ensure())
            ensure_binfmt()  # after a reboot the registration is gone, the cached root is not
            python = python or ARM64_PYTHON
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        (self.root / "keys").mkdir(parents=True, exist_ok=True)
        if not self.user_key.exists():
            _keygen(self.user_key, "bnn-lab-user")
        public_key = self.user_key.with_suffix(".pub").read_text()
        lab_id = secrets.token_hex(2)  # names this lab's namespaces and veths
        octet = _unused_private_octet() if netns else 0
        try:
            for index in range(1, count + 1):
                device = self._make_device(index, public_key, lab_id, octet, lower_root)
                device.thermal = thermal
                if thermal:
                    device.thermal_dir.mkdir(parents=True, exist_ok=True)
                self.devices.append(device)
                self._save_state()
                self.start(device.name)
            self._write_known_hosts()
            self._write_inventory(python or sys.executable)
            for device in self.devices:
                self._wait_listening(device)
        except BaseException:
            self.down()
            raise
        return self.inventory_path

    def _make_device(self, index: int, public_key: str, lab_id: str, octet: int,
                     lower_root: str | None = None) -> LabDevice:
        """One device's keys and sshd config; in a namespace at 10.<octet>.<index>.2 if octet.

        With `lower_root` (arm64) the device's files live in its overlay's upper layer."""
        name = f"dev{index}"
        directory = self.root / "devices" / name
        workdir = str(directory / "work")
        if lower_root is not None:
            workdir = ARM64_WORKDIR
            for sub in ("upper", "overlay-work", "merged"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
        host, port, namespace, host_veth = "127.0.0.1", _free_port(), None, None
        if octet:
            namespace = f"{NETNS_PREFIX}-{lab_id}-{index}"
            host_veth = f"bl{lab_id}h{index}"[:15]
            device_veth = f"bl{lab_id}d{index}"[:15]
            subnet = f"10.{octet}.{index}"
            host, port = f"{subnet}.2", 22
            for command in (
                ["ip", "netns", "add", namespace],
                ["ip", "link", "add", host_veth, "type", "veth", "peer", "name", device_veth],
                ["ip", "link", "set", device_veth, "netns", namespace],
                ["ip", "addr", "add", f"{subnet}.1/30", "dev", host_veth],
                ["ip", "link", "set", host_veth, "up"],
                ["ip", "-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", device_veth],
                ["ip", "-n", namespace, "link", "set", device_veth, "up"],
                ["ip", "-n", namespace, "link", "set", "lo", "up"],
            ):
                subprocess.run(command, check=True, capture_output=True)
        device = LabDevice(name, host, port, str(directory), workdir, namespace, host_veth,
                           arch="arm64" if lower_root else NATIVE_ARCH, lower_root=lower_root)
        device.host_path(workdir).mkdir(parents=True, exist_ok=True)
        device.pid_file.parent.mkdir(parents=True, exist_ok=True)
        if lower_root is not None:
            device.host_path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        if not device.host_key_file.exists():
            _keygen(device.host_key_file, f"bnn-lab-{name}")
        authorized = device.pid_file.parent / "authorized_keys"
        authorized.write_text(public_key)
        device.config_file.write_text(
            "\n".join([
                f"Port {port}",
                f"ListenAddress {host}",
                f"HostKey {device.device_file(device.host_key_file)}",
                f"PidFile {device.device_file(device.pid_file)}",
                f"AuthorizedKeysFile {device.device_file(authorized)}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "UseDNS no",
                "MaxStartups 64:30:128",
                "MaxSessions 64",
                # A dropped host is noticed within ~6 s; the agent's launcher then stops the job.
                "ClientAliveInterval 2",
                "ClientAliveCountMax 3",
                "Subsystem sftp internal-sftp",
                "",
            ])
        )
        return device

    def start(self, name: str) -> None:
        """Start (or restart) one device's sshd; it daemonises and writes its pid file."""
        device = self.device(name)
        command = [str(SSHD), "-f", str(device.config_file), "-E",
                   str(Path(device.directory) / "sshd.log")]
        if device.lower_root is not None:
            directory = Path(device.directory)
            command = [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", _ARM64_START, "sh",
                device.lower_root, str(directory / "upper"), str(directory / "overlay-work"),
                str(directory / "merged"), str(device.thermal_dir) if device.thermal else "",
                "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG=C.UTF-8",
                "/usr/sbin/sshd", "-f", device.device_file(device.config_file),
                "-E", device.device_file(device.pid_file.with_name("sshd.log")),
            ]
        elif device.thermal:
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       _NATIVE_THERMAL_START, "sh", str(device.thermal_dir), *command]
        if device.netns:
            command = ["ip", "netns", "exec", device.netns, *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"lab device {name}: sshd failed to start: {result.stderr.strip()}")
        self._wait_listening(device)

    def _wait_listening(self, device: LabDevice, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            timeout_s = ARM64_SSHD_START_S if device.lower_root else 10.0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((device.host, device.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"lab device {device.name}: sshd not listening on "
                           f"{device.host}:{device.port} after {timeout_s:.0f} s")

    def sshd_pid(self, name: str) -> int | None:
        try:
            return int(self.device(name).pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_sshd(self, name: str) -> None:
        """Kill a device's sshd and all its sessions at once, like a device losing power."""
        pid = self.sshd_pid(name)
        if pid is None:
            return
        for child in [pid, *_descendants(pid)]:
            if _is_sshd(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        self.device(name).pid_file.unlink(missing_ok=True)

    def set_link(self, name: str, up: bool) -> None:
        """Cut or restore a namespaced device's link (the sshd keeps running)."""
        device = self.device(name)
        if device.host_veth is None:
            raise HarnessUsageError(f"lab device {name}: not in a network namespace")
        subprocess.run(["ip", "link", "set", device.host_veth, "up" if up else "down"],
                       check=True, capture_output=True)

    def netem(self, name: str, spec: list[str] | None) -> None:
        """Add `tc netem` impairment (e.g. ['delay', '100ms', 'loss', '5%']) or remove it."""
        device = self.device(name)
        if device.host_veth is None:
            raise HarnessUsageError(f"lab device {name}: not in a network namespace")
        if spec is None:
            subprocess.run(["tc", "qdisc", "del", "dev", device.host_veth, "root"],
                           capture_output=True)
            return
        subprocess.run(["tc", "qdisc", "replace", "dev", device.host_veth, "root", "netem", *spec],
                       check=True, capture_output=True)

    def down(self) -> None:
        """Stop every sshd, remove namespaces and forget the lab (files stay for inspection)."""
        for device in self.devices:
            self.kill_sshd(device.name)
            if device.netns:
                subprocess.run(["ip", "netns", "del", device.netns], capture_output=True)
            if device.host_veth:
                subprocess.run(["ip", "link", "del", device.host_veth], capture_output=True)
        self.devices = []
        (self.root / STATE_FILE).unlink(missing_ok=True)

    def attach_meters(self, meters: dict[str, dict[str, object]]) -> None:
        """Give devices a `meter` section in the inventory (e.g. an emulated UM34C's pty)."""
        text = self.inventory_path.read_text()
        header, _, body = text.partition("\n")
        inventory = yaml.safe_load(body)
        for entry in inventory["devices"]:
            if entry["name"] in meters:
                entry["meter"] = dict(meters[entry["name"]])
        self.inventory_path.write_text(
            header + "\n" + yaml.safe_dump(inventory, sort_keys=False)
        )

    # ------------------------------------------------------------ files

    def _save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STATE_FILE).write_text(
            json.dumps({"devices": [asdict(d) for d in self.devices]}, indent=2)
        )

    def _write_known_hosts(self) -> None:
        lines = []
        for device in self.devices:
            key_type, key_b64 = device.host_key_file.with_suffix(".pub").read_text().split()[:2]
            name = device.host if device.port == 22 else f"[{device.host}]:{device.port}"
            lines.append(f"{name} {key_type} {key_b64}\n")
        self.known_hosts_path.write_text("".join(lines))

    def _write_inventory(self, python: str) -> None:
        inventory = {
            "version": 1,
            "defaults": {
                "transport": "ssh",
                "user": _current_user(),
                "key_file": str(self.user_key),
                "known_hosts": str(self.known_hosts_path),
                "python": python,
                "connect_timeout_s": 5,
                "connect_retries": 2,
                "retry_backoff_s": 0.5,
                "keepalive_s": 2,
            },
            "devices": [
                {"name": d.name, "host": d.host, "port": d.port, "workdir": d.workdir,
                 "tags": ["lab", "netns" if d.netns else "loopback",
                          *(["arm64", "emulated"] if d.lower_root else [])]}
                for d in self.devices
            ],
        }
        self.inventory_path.write_text(
            "# Written by `harness lab up`; devices are sshd processes on this machine.\n"
            + yaml.safe_dump(inventory, sort_keys=False)
        )


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = _children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(_children(child))
    return found


def _is_sshd(pid: int) -> bool:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return name.startswith("sshd")
