"""The `Transport` protocol every device type implements, and the factory that picks one.

A transport starts agents and streams their stdout; it knows nothing of plans
or stores. Conventions every transport keeps, so job specs are the same on
every device:

- the agent runs with the device's work directory as its current directory;
- the work directory's layout is `contract.layout`'s: `ensure_deployed(datasets)` puts
  each prepared data set file at `data/<file name>` (skipping files already there with
  the same checksum);
- the runner gives `start_job(spec)` a `JobSpec` whose `dataset.path` is the host's
  path of the prepared file; the transport sends `spec.on_device()`, which names
  `data/<file name>`;
- `start_job(spec)` writes the spec to a file on the device, runs
  `python -m device_agent run <spec file> --out <job directory>` in a
  process group of its own (so `stop()` reaches the whole tree) and returns at
  once.

Faults: `DeviceUnreachable` before a job starts (the runner skips the device),
`DeviceLost` while one runs (the runner retries the job, up to the plan's limit).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from contract.jobspec import JobSpec
from harness.errors import HarnessUsageError


@runtime_checkable
class RemoteJob(Protocol):
    """One running agent."""

    def lines(self) -> Iterator[str]:
        """The agent's stdout lines (without the newline) as they arrive, until it closes."""
        ...

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the agent's process group; SIGKILL it if still there after `grace_s`."""
        ...

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The agent's exit code (negative: killed by that signal); None on timeout."""
        ...


@runtime_checkable
class Transport(Protocol):
    """How the host reaches one device. `open`/`close` are idempotent; a context manager."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Transport: ...

    def __exit__(self, *exc: object) -> None: ...

    def ensure_deployed(self, datasets: dict[Path, str]) -> None:
        """Code and data on the device, by checksum; `DeviceUnreachable` if it cannot be."""
        ...

    def clock_sample(self) -> tuple[float, float, float]:
        """(host wall time sent, device wall time, host wall time received)."""
        ...

    def start_job(self, spec: JobSpec) -> RemoteJob: ...


def make_transport(device: Any, local_root: Path | None = None) -> Transport:
    """The transport for an inventory device: local subprocesses or SSH (imported lazily).

    `local_root` replaces a local device's work directory (a run keeps it inside the run
    directory, results beside the store)."""
    if device.transport == "local":
        from harness.local import LocalTransport

        return LocalTransport(device, root=local_root)
    if device.transport == "ssh":
        from harness.fleet.transport import SshTransport

        return SshTransport(device)
    raise HarnessUsageError(
        f"device {device.name!r}: field 'transport': unknown {device.transport!r}; "
        "choose one of: local, ssh"
    )
