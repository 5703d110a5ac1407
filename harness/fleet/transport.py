"""`SshTransport`: the `harness.transport.Transport` protocol over one SSH connection.

A job runs on the device under a small launcher (stdlib only, sent with
`python -c`) that starts the agent in a new session, hence its own process
group, and watches its stdin: the line `stop <grace_s>`, end of input (the
host went away and sshd closed the session) or silence longer than the
dead-man time (the host sends a heartbeat line every `keepalive_s`; a cut
link) sends SIGTERM to the whole group and SIGKILL after the grace period.
So stopping the harness, even killing it or cutting its link, leaves no agent
running on the device.

Commands are built from argument lists and quoted word by word; the job spec
travels as a file (over SFTP, or over the exec channel as stdin data where the
device has no sftp subsystem), so job options are data, never shell text.
"""

from __future__ import annotations

import collections
import posixpath
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko

from contract.events import parse_clock_reply
from contract.jobspec import JOB_ID_PATTERN, JobSpec
from contract.layout import device_job_dir, device_spec_path
from harness.errors import DeviceLost, DeviceUnreachable, HarnessUsageError
from harness.fleet.connection import DeviceConnection, shell_command
from harness.fleet.deploy import (
    DeployReport,
    code_files,
    dataset_files,
    remote_python_env,
    sync_files,
)
from harness.fleet.errors import HostKeyRejected
from harness.fleet.probe import DeviceProbe, probe_device, require_agent_dependencies
from harness.inventory import REMOTE_PATH_RE, Device

# The launcher's last stderr line carries the agent's exit code (negative: killed by that
# signal), which an SSH exit status cannot. Its first argument is the dead-man time: with no
# line from the host for that long (a cut link sshd may not notice for many minutes, while
# the agent's output keeps its session busy) it stops the job as if told to.
EXIT_MARKER = "bnn-launcher-exit "
LAUNCHER = f"MARKER = {EXIT_MARKER!r}\n" + r"""
import os, select, signal, subprocess, sys, threading, time
deadman_s = float(sys.argv[1])
child = subprocess.Popen(sys.argv[2:], start_new_session=True, stdin=subprocess.DEVNULL)
def signal_group(signum):
    try:
        os.killpg(child.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
def stop(grace_s):
    signal_group(signal.SIGTERM)
    signal_group(signal.SIGCONT)  # a frozen (SIGSTOPped) agent handles its SIGTERM now
    try:
        child.wait(grace_s)
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGKILL)
def watch():
    fd, pending, heard = sys.stdin.fileno(), b"", time.monotonic()
    while True:
        if select.select([fd], [], [], 1.0)[0]:
            data = os.read(fd, 4096)
            if not data:
                return stop(5.0)
            heard, pending = time.monotonic(), pending + data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"stop"):
                    words = line.split()
                    return stop(float(words[1]) if len(words) > 1 else 5.0)
        elif deadman_s > 0 and time.monotonic() - heard > deadman_s:
            return stop(5.0)
threading.Thread(target=watch, daemon=True).start()
code = child.wait()
signal_group(signal.SIGKILL)
sys.stderr.write("%s%d\n" % (MARKER, code))
sys.exit(0 if code == 0 else 1)
"""
STDERR_TAIL_LINES = 50
# Silence from the host for this many keepalive periods stops the job on the device; the
# host gives the connection up after 4 (TCP_USER_TIMEOUT in harness.fleet.connection).
DEADMAN_KEEPALIVES = 5
# How long close() waits for the device's clock process to exit after end of input.
CLOCK_EXIT_WAIT_S = 5.0


def deadman_s(device: Device) -> float:
    """How long the launcher waits without a heartbeat before it stops the job (0: never)."""
    return DEADMAN_KEEPALIVES * device.keepalive_s


class SshRemoteJob:
    """One agent process on a device, seen through its SSH channel."""

    def __init__(self, channel: paramiko.Channel, device: Device) -> None:
        self._channel = channel
        self._device = device
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._agent_exit: int | None = None
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, name=f"stderr-{device.name}", daemon=True
        )
        self._stderr_thread.start()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat, name=f"heartbeat-{device.name}", daemon=True
        )
        if device.keepalive_s:
            self._heartbeat_thread.start()

    def _heartbeat(self) -> None:
        """A line to the launcher every keepalive period, so it knows the host is there."""
        while not self._channel.status_event.wait(self._device.keepalive_s):
            try:
                self._channel.sendall(b"alive\n")
            except (OSError, EOFError, paramiko.SSHException):
                return

    def _drain_stderr(self) -> None:
        with self._channel.makefile_stderr("rb") as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith(EXIT_MARKER):
                    self._agent_exit = int(line[len(EXIT_MARKER):])
                else:
                    self._stderr.append(line)

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def lines(self) -> Iterator[str]:
        """Stdout lines as they arrive; `DeviceLost` if the connection ends before the job."""
        with self._channel.makefile("rb") as stream:
            for raw in stream:
                yield raw.decode("utf-8", "replace").rstrip("\r\n")
        self._channel.status_event.wait(5.0)
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        transport = self._channel.get_transport()
        lost = not self._channel.exit_status_ready() or (
            self._channel.exit_status == -1 and (transport is None or not transport.is_active())
        )
        if lost:
            raise DeviceLost(f"device {self._device.name}: connection lost while the job ran")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the job's process group on the device, SIGKILL after `grace_s`."""
        if self._channel.exit_status_ready():
            return
        try:
            self._channel.sendall(f"stop {grace_s}\n".encode())
        except (OSError, EOFError, paramiko.SSHException):
            return  # the session is gone; the launcher saw end of input and stops the job
        self._channel.status_event.wait(grace_s + 5.0)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The agent's exit code (negative: killed by that signal); None if still running."""
        if not self._channel.status_event.wait(timeout_s):
            return None
        self._raise_if_lost()
        self._stderr_thread.join(5.0)
        if self._agent_exit is None:  # the launcher itself failed (bad python path, ...)
            return self._channel.exit_status or 1
        return self._agent_exit


class SshTransport:
    """Deploy to, run on and read the clock of one device over SSH."""

    def __init__(self, device: Device, inventory_hint: str = "INV") -> None:
        self.device = device
        self.connection = DeviceConnection(device)
        self.inventory_hint = inventory_hint
        self.workdir: str | None = None
        self.probe: DeviceProbe | None = None
        self.last_deploy: DeployReport | None = None
        self._clock_channel: paramiko.Channel | None = None
        self._clock_stream: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Connect (with retries) and resolve the work directory; idempotent."""
        self.connection.open()
        if self.workdir is None:
            self.workdir = self._resolve_workdir()

    def _resolve_workdir(self) -> str:
        workdir = self.device.workdir
        if workdir.startswith("~/"):
            workdir = workdir[2:]
        if not posixpath.isabs(workdir):
            home = self.connection.home()
            workdir = posixpath.join(home, workdir)
        workdir = posixpath.normpath(workdir)
        if not REMOTE_PATH_RE.match(workdir):
            raise HarnessUsageError(
                f"device {self.device.name}: work directory {workdir!r} has characters other "
                f"than letters, digits, '_', '.', '/', '+', '-'"
            )
        return workdir

    def close(self) -> None:
        """Close the clock session and the connection; safe to call twice."""
        channel, self._clock_channel = self._clock_channel, None
        if channel is not None:
            # End of input ends the device's clock process; waiting for its exit status means
            # nothing of ours is left running on the device once close() returns.
            try:
                channel.shutdown_write()
                channel.status_event.wait(CLOCK_EXIT_WAIT_S)
            except (OSError, EOFError, paramiko.SSHException):
                pass
            channel.close()
        self._clock_stream = None
        self.connection.close()

    def __enter__(self) -> SshTransport:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reconnect(self) -> None:
        """Connect again after a loss; a refusal now is a lost device, not a skipped one."""
        try:
            self.open()
        except HostKeyRejected:
            raise
        except DeviceUnreachable as exc:
            raise DeviceLost(str(exc)) from exc

    # ------------------------------------------------------------ deployment

    def ensure_deployed(self, datasets: dict[Path, str]) -> DeployReport:
        """Copy code and data sets (path -> sha256) that differ, then check the device's
        Python."""
        self.open()
        assert self.workdir is not None
        files = code_files() + dataset_files(datasets)
        self.last_deploy = sync_files(self.connection, self.device.python, self.workdir, files)
        self.probe = probe_device(self.connection, self.device.python, self.workdir)
        require_agent_dependencies(self.probe, self.device.name, self.inventory_hint)
        return self.last_deploy

    # ------------------------------------------------------------ clock

    def clock_sample(self) -> tuple[float, float, float]:
        """(host send wall time, device wall time, host receive wall time) of one exchange."""
        with self._lock:
            if self._clock_channel is None or self._clock_channel.closed:
                self._start_clock()
            assert self._clock_channel is not None
            try:
                sent = time.time()
                self._clock_channel.sendall(b"\n")
                line = self._clock_stream.readline()
                received = time.time()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._clock_channel = None
                raise DeviceLost(
                    f"device {self.device.name}: clock exchange failed: {exc}"
                ) from exc
            if not line:
                self._clock_channel = None
                raise DeviceLost(f"device {self.device.name}: clock session ended")
            return sent, parse_clock_reply(line), received

    def _start_clock(self) -> None:
        self._reconnect()
        assert self.workdir is not None
        try:
            channel = self.connection.transport.open_session(timeout=30)
            channel.settimeout(30)
            channel.exec_command(shell_command(
                [*remote_python_env(self.workdir), self.device.python, "-m", "device_agent",
                 "clock"],
                cwd=self.workdir,
            ))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(f"device {self.device.name}: cannot start the clock: {exc}") from exc
        self._clock_channel = channel
        self._clock_stream = channel.makefile("rb")

    # ------------------------------------------------------------ jobs

    def start_job(self, spec: JobSpec) -> SshRemoteJob:
        """Send the spec as a file and start the agent under the launcher."""
        job_id = spec.job_id
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
            raise HarnessUsageError(
                f"job_id: expected letters, digits, '.', '_', '-' (max 128), got {job_id!r}"
            )
        self._reconnect()
        assert self.workdir is not None
        out_dir = posixpath.join(self.workdir, device_job_dir(job_id))
        job_file = posixpath.join(self.workdir, device_spec_path(job_id))
        try:
            self.connection.run(["mkdir", "-p", out_dir])
            self.connection.write_file(job_file, spec.on_device().to_json().encode())
            channel = self.connection.transport.open_session(timeout=30)
            channel.exec_command(shell_command(
                [*remote_python_env(self.workdir), self.device.python, "-c", LAUNCHER,
                 str(deadman_s(self.device)), self.device.python, "-m", "device_agent", "run",
                 job_file, "--out", out_dir],
                cwd=self.workdir,
            ))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(
                f"device {self.device.name}: cannot start job {job_id}: {exc}"
            ) from exc
        return SshRemoteJob(channel, self.device)


