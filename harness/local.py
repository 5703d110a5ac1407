"""`LocalTransport`: the local machine as a device, with agents as subprocesses.

The same event stream and the same conventions as SSH devices (see
`harness.transport`): a work directory with `data/` and `jobs/<id>/`, agents in
their own session (process group), a long-lived `python -m device_agent clock`
for the offset estimate. The code needs no deployment: the agent runs from the
installed packages (PYTHONPATH points at them).
"""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contract.checksum import file_sha256
from contract.events import MAX_EVENT_LINE_BYTES, parse_clock_reply
from contract.fields import SpecError
from contract.jobspec import JobSpec
from contract.layout import DATA_DIR, device_job_dir, device_spec_path
from harness.errors import DeviceLost, DeviceUnreachable

CLOCK_TIMEOUT_S = 5.0
# Where the device packages are installed on this machine (found without importing them).
CODE_ROOT = Path(importlib.util.find_spec("device_agent").origin).resolve().parents[1]


class LocalJob:
    """An agent subprocess in its own session; `lines()` streams its stdout."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def lines(self) -> Iterator[str]:
        stream = self.process.stdout
        assert stream is not None
        while True:
            chunk = stream.readline(MAX_EVENT_LINE_BYTES + 1)
            if not chunk:
                return
            if not chunk.endswith(b"\n") and len(chunk) > MAX_EVENT_LINE_BYTES:
                while True:  # drop the rest of an over-long line; the head is flagged
                    rest = stream.readline(MAX_EVENT_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
            yield chunk.decode("utf-8", "replace").rstrip("\r\n")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (and SIGCONT, so a frozen agent can act on it), SIGKILL after `grace_s`."""
        for signals, wait_s in (((signal.SIGTERM, signal.SIGCONT), grace_s),
                                ((signal.SIGKILL,), 5.0)):
            try:
                for sig in signals:
                    os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            if self.wait(wait_s) is not None:
                return

    def wait(self, timeout_s: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None


class LocalTransport:
    """The local machine. `root` (if given) replaces the device's work directory."""

    def __init__(self, device: Any, root: Path | None = None) -> None:
        self.device = device
        self.name = device.name
        workdir = Path(device.workdir or "bnn-harness").expanduser()
        self.workdir = (
            root
            if root is not None
            else (workdir if workdir.is_absolute() else Path.home() / workdir)
        )
        self.python = device.python if device.python not in (None, "python3") else sys.executable
        self._clock: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(CODE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def open(self) -> None:
        if self._clock is not None:
            return
        try:
            (self.workdir / DATA_DIR).mkdir(parents=True, exist_ok=True)
            self._clock = subprocess.Popen(
                [self.python, "-m", "device_agent", "clock"],
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.clock_sample()
        except (OSError, DeviceLost) as exc:
            self.close()
            raise DeviceUnreachable(f"device {self.name!r}: cannot start the agent: {exc}") from exc

    def close(self) -> None:
        clock, self._clock = self._clock, None
        if clock is None:
            return
        try:
            clock.stdin.close()
            clock.wait(2.0)
        except (OSError, subprocess.TimeoutExpired):
            clock.kill()
            clock.wait(2.0)
        finally:
            clock.stdout.close()

    def __enter__(self) -> LocalTransport:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_deployed(self, datasets: dict[Path, str]) -> None:
        """Copy each data set (path -> its sha256) into `data/` unless a file with the same
        checksum is there."""
        for source, sha256 in datasets.items():
            target = self.workdir / DATA_DIR / source.name
            if target.is_file() and file_sha256(target) == sha256:
                continue
            try:
                shutil.copyfile(source, target.with_suffix(target.suffix + ".part"))
                os.replace(target.with_suffix(target.suffix + ".part"), target)
            except OSError as exc:
                raise DeviceUnreachable(
                    f"device {self.name!r}: cannot copy {source}: {exc}"
                ) from exc

    def clock_sample(self) -> tuple[float, float, float]:
        clock = self._clock
        if clock is None:
            raise DeviceLost(f"device {self.name!r}: transport not open")
        sent = time.time()
        try:
            clock.stdin.write(b"t\n")
            clock.stdin.flush()
            ready, _, _ = select.select([clock.stdout], [], [], CLOCK_TIMEOUT_S)
            line = clock.stdout.readline() if ready else b""
        except OSError as exc:
            raise DeviceLost(f"device {self.name!r}: clock agent failed: {exc}") from exc
        received = time.time()
        if not line:
            raise DeviceLost(f"device {self.name!r}: no clock answer in {CLOCK_TIMEOUT_S} s")
        try:
            return sent, parse_clock_reply(line), received
        except SpecError as exc:
            raise DeviceLost(f"device {self.name!r}: bad clock answer: {exc}") from exc

    def start_job(self, spec: JobSpec) -> LocalJob:
        job_dir = device_job_dir(spec.job_id)
        (self.workdir / job_dir).mkdir(parents=True, exist_ok=True)
        spec_path = device_spec_path(spec.job_id)
        (self.workdir / spec_path).write_text(spec.on_device().to_json())
        try:
            with (self.workdir / job_dir / "stderr.log").open("ab") as stderr:
                process = subprocess.Popen(
                    [self.python, "-m", "device_agent", "run", spec_path, "--out", job_dir],
                    cwd=self.workdir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    start_new_session=True,
                )
        except OSError as exc:
            raise DeviceLost(f"device {self.name!r}: cannot start the agent: {exc}") from exc
        return LocalJob(process)
