"""One SSH connection to a device: Fabric `Connection` plus retries, keepalives and host keys.

Fabric 3 has no connect retries and no keepalives. `DeviceConnection.open`
retries refused or timed-out connects with exponential backoff (never a host
key or authentication refusal), and the socket gets TCP keepalives plus
`TCP_USER_TIMEOUT`, while paramiko sends an SSH keepalive every
`keepalive_s`: a dead link then fails the connection within seconds instead
of hanging on TCP retransmissions.

The SSH client config is Fabric's (`harness.inventory.fabric_config`): a
device with a ProxyJump is reached through a chain of Fabric gateway
connections, each hop's host key checked against the same known_hosts.
"""

from __future__ import annotations

import logging
import random
import shlex
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko
from fabric import Connection

from harness.errors import DeviceLost, DeviceUnreachable
from harness.fleet.errors import AuthenticationFailed, HostKeyRejected
from harness.fleet.hostkeys import (
    HostKeyStatus,
    host_key_name,
    install_host_key_checking,
    mismatch_error,
)
from harness.inventory import Device, fabric_config

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class CommandResult:
    """What one remote command returned."""

    exit_code: int
    stdout: str
    stderr: str


def shell_command(argv: list[str], cwd: str | None = None) -> str:
    """A remote command line from an argument list: every word is quoted, so data stays data."""
    command = shlex.join(argv)
    return f"cd {shlex.quote(cwd)} && {command}" if cwd else command


def _tuned_socket(device: Device) -> socket.socket:
    """A connected TCP socket whose dead peer is noticed within a few keepalive periods."""
    sock = socket.create_connection(
        (device.host, device.port), timeout=device.connect_timeout_s or None
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    period = max(1, int(device.keepalive_s or 15))
    for option, value in (
        ("TCP_KEEPIDLE", period),
        ("TCP_KEEPINTVL", period),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 4 * period * 1000),
    ):
        if hasattr(socket, option):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


class DeviceConnection:
    """An SSH connection to one device; settings resolved now, connected on `open()`."""

    def __init__(self, device: Device) -> None:
        if device.transport != "ssh" or not device.host:
            raise ValueError(f"device {device.name} is not an ssh device")
        self.device = device
        self.host_key = HostKeyStatus()
        self._connection: Connection | None = None
        self.has_sftp: bool | None = None  # None: not asked yet; False: files go over exec

    def __hash__(self) -> int:
        return hash((self.device.host, self.device.port, self.device.user))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeviceConnection) and (
            (self.device.host, self.device.port, self.device.user)
            == (other.device.host, other.device.port, other.device.user)
        )

    @property
    def is_open(self) -> bool:
        return self._connection is not None and self._connection.is_connected

    @property
    def fabric(self) -> Connection:
        """The open Fabric connection (opening it if needed)."""
        self.open()
        assert self._connection is not None
        return self._connection

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.fabric.transport
        if transport is None or not transport.is_active():
            raise DeviceLost(f"device {self.device.name}: connection lost")
        return transport

    def open(self) -> None:
        """Connect, retrying refused or timed-out connects with backoff; idempotent."""
        if self.is_open:
            return
        self.close()
        device = self.device
        attempts = device.connect_retries + 1
        last_error: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                delay = min(MAX_BACKOFF_S, device.retry_backoff_s * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.8, 1.2))
            try:
                self._connection = self._connect_once()
                return
            except (HostKeyRejected, AuthenticationFailed):
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last_error = exc
                log.info("device %s: connect attempt %d/%d failed: %s",
                         device.name, attempt + 1, attempts, exc)
        raise DeviceUnreachable(
            f"device {device.name}: cannot connect to {device.host}:{device.port} after "
            f"{attempts} attempt(s): {last_error}"
        )

    def _connect_once(self) -> Connection:
        device = self.device
        connect_kwargs: dict[str, object] = {
            "allow_agent": device.key_file is None,
            "look_for_keys": device.key_file is None,
            "banner_timeout": device.connect_timeout_s or None,
            "auth_timeout": device.connect_timeout_s or None,
        }
        if device.key_file is not None:
            if not device.key_file.exists():
                raise AuthenticationFailed(
                    f"device {device.name}: key file {device.key_file} does not exist"
                )
            connect_kwargs["key_filename"] = str(device.key_file)
        if device.key_passphrase:
            connect_kwargs["passphrase"] = device.key_passphrase
        if device.password:
            connect_kwargs["password"] = device.password
        config = fabric_config(device.ssh_config)
        sock = None
        if device.proxy_jump:
            gateway: Connection | bool = self._jump_chain(config)
        else:
            gateway = False  # never a gateway from a `Host *` block the inventory overrode
            sock = _tuned_socket(device)
            connect_kwargs["sock"] = sock
        connection = Connection(
            host=device.host,
            user=device.user,
            port=device.port,
            config=config,
            gateway=gateway,
            connect_kwargs=connect_kwargs,
            connect_timeout=int(device.connect_timeout_s) or None,
        )
        self.host_key = install_host_key_checking(connection.client, device)
        try:
            connection.open()
        except paramiko.BadHostKeyException as exc:
            _close_chain(connection, sock)
            self.host_key.state = "mismatch"
            self.host_key.fingerprint = exc.key.fingerprint
            raise mismatch_error(_device_of(exc, device, connection), exc) from None
        except paramiko.AuthenticationException as exc:
            _close_chain(connection, sock)
            raise AuthenticationFailed(
                f"device {device.name}: authentication as {device.user or '(local user)'} "
                f"failed ({exc}); check user and key_file in the inventory (or the ssh config) "
                f"and the device's ~/.ssh/authorized_keys"
            ) from None
        except BaseException:
            _close_chain(connection, sock)
            raise
        if self.host_key.state == "unchecked":
            self.host_key.state = "known"
            self.host_key.fingerprint = connection.transport.get_remote_server_key().fingerprint
        if device.keepalive_s:
            hop: object = connection
            while isinstance(hop, Connection):
                if hop.transport is not None:
                    hop.transport.set_keepalive(max(1, int(device.keepalive_s)))
                hop = hop.gateway
        return connection

    def _jump_chain(self, config: object) -> Connection:
        """Fabric connections through the ProxyJump hops (first hop first), each hop's
        host key checked like the device's own; returns the last hop, the device's gateway."""
        device = self.device
        previous: Connection | bool = False
        for hop in device.proxy_jump.split(","):
            jump = Connection(
                hop,
                config=config.clone(),
                gateway=previous,
                connect_timeout=int(device.connect_timeout_s) or None,
                connect_kwargs={"banner_timeout": device.connect_timeout_s or None,
                                "auth_timeout": device.connect_timeout_s or None},
            )
            install_host_key_checking(jump.client, _hop_device(device, jump))
            previous = jump
        assert isinstance(previous, Connection)
        return previous

    def close(self) -> None:
        """Close the connection and its jump hosts; safe to call twice."""
        connection, self._connection = self._connection, None
        if connection is not None:
            _close_chain(connection, None)

    def __enter__(self) -> DeviceConnection:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        argv: list[str],
        *,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float = 60.0,
    ) -> CommandResult:
        """Run one command (an argument list, quoted here) and collect its output."""
        name = self.device.name
        try:
            channel = self.transport.open_session(timeout=timeout_s)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(f"device {name}: cannot open a session: {exc}") from exc
        try:
            channel.settimeout(timeout_s)  # a slow device may take its time to read stdin
            channel.exec_command(shell_command(argv, cwd))
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()
            channel.settimeout(1.0)
            stdout, stderr = _read_all(channel, time.monotonic() + timeout_s)
            if not channel.status_event.wait(timeout_s):
                raise DeviceLost(f"device {name}: {argv[0]} did not finish in {timeout_s:.0f} s")
            if not channel.exit_status_ready() or (
                channel.exit_status == -1 and not self.transport.is_active()
            ):
                raise DeviceLost(f"device {name}: connection lost during {argv[0]}")
            return CommandResult(
                channel.exit_status,
                stdout.decode("utf-8", "replace"),
                stderr.decode("utf-8", "replace"),
            )
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(f"device {name}: {argv[0]} failed: {exc}") from exc
        finally:
            channel.close()


    # ------------------------------------------------------------ files

    def sftp(self) -> paramiko.SFTPClient | None:
        """The SFTP client, or None when the device's sshd has no sftp subsystem (minimal
        images, dropbear without sftp-server); then files travel over the exec channel."""
        if self.has_sftp is False:
            return None
        try:
            client = self.fabric.sftp()
        except (paramiko.SSHException, EOFError) as exc:
            if not self.transport.is_active():  # raises DeviceLost: not a missing subsystem
                raise
            log.info("device %s: no sftp subsystem (%s); copying over exec", self.device.name,
                     exc)
            self.has_sftp = False
            return None
        self.has_sftp = True
        return client

    def home(self) -> str:
        """The login directory on the device."""
        sftp = self.sftp()
        if sftp is not None:
            return sftp.normalize(".")
        result = self.run(["pwd"], timeout_s=30)
        if result.exit_code != 0 or not result.stdout.strip().startswith("/"):
            raise DeviceLost(f"device {self.device.name}: pwd failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def write_file(self, remote: str, data: bytes, final: str | None = None) -> None:
        """Write `data` to `remote` (then rename it to `final`, if given), by SFTP or exec."""
        sftp = self.sftp()
        if sftp is not None:
            with sftp.open(remote, "wb") as handle:
                handle.write(data)
            if final is not None:
                sftp.posix_rename(remote, final)
            return
        script = 'cat > "$1"' + (' && mv -f "$1" "$2"' if final is not None else "")
        argv = ["sh", "-c", script, "sh", remote, *([final] if final is not None else [])]
        result = self.run(argv, stdin=data, timeout_s=60.0 + len(data) / 250_000)
        if result.exit_code != 0:
            raise DeviceLost(
                f"device {self.device.name}: cannot write {final or remote} over exec: "
                f"{result.stderr.strip()[-300:]}"
            )

    def put_file(self, local: Path, remote: str, final: str | None = None) -> None:
        """Copy a host file to `remote` (then rename it to `final`)."""
        sftp = self.sftp()
        if sftp is None:
            self.write_file(remote, Path(local).read_bytes(), final)
            return
        sftp.put(str(local), remote)
        if final is not None:
            sftp.posix_rename(remote, final)


def _hop_device(device: Device, jump: Connection) -> Device:
    """A jump host as a device, for host-key checking and its messages."""
    return replace(device, name=f"{device.name} (jump host {jump.original_host})",
                   host=jump.host, port=jump.port, user=jump.user, proxy_jump=None)


def _device_of(exc: paramiko.BadHostKeyException, device: Device, connection: Connection) -> Device:
    """The device or jump host whose key did not match (for the message's commands)."""
    hop: object = connection.gateway
    while isinstance(hop, Connection):
        jump = _hop_device(device, hop)
        if exc.hostname in (jump.host, host_key_name(jump)):
            return jump
        hop = hop.gateway
    return device


def _close_chain(connection: Connection, sock: socket.socket | None) -> None:
    """Close a connection, then its gateways (jump hosts), then the socket given to it."""
    hop: object = connection
    while isinstance(hop, Connection):
        hop.close()
        hop = hop.gateway
    if sock is not None:
        sock.close()


def _read_all(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr to EOF, both as they come, so the remote never blocks."""
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    stdout_open = True
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("remote command timed out")
        while channel.recv_stderr_ready():
            stderr.append(channel.recv_stderr(65536))
        if stdout_open:
            try:
                data = channel.recv(65536)
            except TimeoutError:
                continue
            if data:
                stdout.append(data)
                continue
            stdout_open = False
        if channel.eof_received or channel.closed:
            break
        time.sleep(0.01)
    while channel.recv_stderr_ready():
        stderr.append(channel.recv_stderr(65536))
    return b"".join(stdout), b"".join(stderr)
