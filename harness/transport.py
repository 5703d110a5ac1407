"""The `Transport` protocol every device type implements, and the factory that picks one.

A transport starts agents and streams their stdout; it knows nothing of plans
or stores. Conventions every transport keeps, so job specs are the same on
every device:

- the agent runs with the device's work directory as its current directory;
- `ensure_deployed(datasets)` puts each prepared data set file at
  `data/<file name>` under that directory (skipping files already there with
  the same checksum);
- the runner gives `start_job(spec)` a spec whose `dataset.path` is the host's
  path of the prepared file; the transport rewrites it to `data/<file name>`;
- `start_job(spec)` writes the spec to a file on the device, runs
  `python -m device_agent run <spec file> --out <job directory>` in a
  process group of its own (so `stop()` reaches the whole tree) and returns at
  once.

Faults: `DeviceUnreachable` before a job starts (the runner skips the device),
`DeviceLost` while one runs (the runner retries the job, up to the plan's limit).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from harness.errors import HarnessUsageError

DATA_DIR = "data"
JOBS_DIR = "jobs"


def device_data_path(dataset_file: Path) -> str:
    """Where a prepared data set file lives on every device, relative to the work directory."""
    return f"{DATA_DIR}/{dataset_file.name}"


def device_side_spec(job_spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with the data set's (and a script's) path pointing where deployment put it."""
    spec = json.loads(json.dumps(job_spec))
    for key in ("dataset", "script"):
        part = spec.get(key)
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            part["path"] = device_data_path(Path(part["path"]))
    return spec


def device_job_dir(job_id: str) -> str:
    return f"{JOBS_DIR}/{job_id}"


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

    def ensure_deployed(self, datasets: list[Path]) -> None:
        """Code and data on the device, by checksum; `DeviceUnreachable` if it cannot be."""
        ...

    def clock_sample(self) -> tuple[float, float, float]:
        """(host wall time sent, device wall time, host wall time received)."""
        ...

    def start_job(self, job_spec: dict[str, Any]) -> RemoteJob: ...


def make_transport(device: Any) -> Transport:
    """The transport for an inventory device: local subprocesses or SSH (imported lazily)."""
    if device.transport == "local":
        from harness.local import LocalTransport

        return LocalTransport(device)
    if device.transport == "ssh":
        from harness.fleet.transport import SshTransport

        return SshTransport(device)
    raise HarnessUsageError(
        f"device {device.name!r}: field 'transport': unknown {device.transport!r}; "
        "choose one of: local, ssh"
    )
