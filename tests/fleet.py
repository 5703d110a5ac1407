"""Fixtures and helpers for tests against the test fleet: real sshd devices from `harness.lab`.

Import the fixtures into a test module with
`from fleet import lab_factory, digits_file  # noqa: F401`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.checksum import file_sha256
from contract.jobspec import JobSpec
from harness.lab import SSHD, Lab

REPO_ROOT = Path(__file__).resolve().parents[1]

requires_sshd = pytest.mark.skipif(not SSHD.exists(), reason=f"{SSHD} not installed")
# (conftest marks tests that use it, or `lab_factory`, `sshd`, for `-m "not sshd"`)


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """`make(n, netns=False, thermal=False)` starts a lab of n sshd devices; all are
    stopped at teardown."""
    labs: list[Lab] = []

    def make(count: int, netns: bool = False, name: str = "lab", thermal: bool = False) -> Lab:
        lab = Lab(tmp_path / name)
        lab.up(count, netns=netns, thermal=thermal)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.down()


@pytest.fixture
def metered_lab(lab_factory: Callable[..., Lab]) -> Iterator[Callable[[int], Lab]]:
    """`make(n)`: a lab whose devices each have an emulated UM34C on a pty, drawing power
    that follows the CPU load of that device's sshd tree (its sessions and agents)."""
    from harness.meters.emulator import LoadSignal, UmEmulator
    from harness.meters.modeled import POWER_PROFILES

    emulators = []

    def make(count: int) -> Lab:
        lab = lab_factory(count)
        meters = {}
        for device in lab.devices:
            pid = lab.sshd_pid(device.name)
            link = Path(device.directory) / "meter.tty"
            emulator = UmEmulator("um34c", LoadSignal(POWER_PROFILES["pi4"], pid=pid), link=link)
            emulators.append(emulator.start())
            meters[device.name] = {"type": "um34c", "port": str(link)}
        lab.attach_meters(meters)
        return lab

    yield make
    for emulator in emulators:
        emulator.stop()


requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="a lab device's thermal zone needs root (a private mount namespace)"
)


@pytest.fixture
def thermal_lab(lab_factory: Callable[..., Lab]) -> Iterator[Callable[..., Lab]]:
    """`make(n, model)`: a lab whose devices each have a thermal zone at
    /sys/class/thermal/thermal_zone0, its temperature following the CPU load of that
    device's sshd tree through `model` (`harness.thermal`)."""
    from harness.thermal import ThermalZoneEmulator

    emulators = []

    def make(count: int, model: Any) -> Lab:
        lab = lab_factory(count, thermal=True)
        for device in lab.devices:
            emulator = ThermalZoneEmulator(device.thermal_dir, device.pid_file, model)
            emulators.append(emulator.start())
        return lab

    yield make
    for emulator in emulators:
        emulator.stop()


@pytest.fixture(scope="session")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared digits data set (the canonical file the harness pushes to devices)."""
    from datafiles.canonical import write_canonical
    from datafiles.digits import load_digits

    path = tmp_path_factory.mktemp("data") / "digits.npz"
    write_canonical(load_digits(), path)
    return path


def idle_spec(job_id: str, duration_s: float) -> JobSpec:
    """A job that loads no torch: the agent rests `duration_s` with its samplers running."""
    return JobSpec.from_dict({
        "schema_version": 1,
        "job_id": job_id,
        "method": {"name": "idle", "duration_s": duration_s},
        "model": None,
        "dataset": None,
        "epochs": None,
        "telemetry": {"memory_hz": 5, "power_hz": 1, "step_every": 1},
    })


def training_spec(job_id: str, dataset: Path, max_steps: int = 2) -> JobSpec:
    return JobSpec.from_dict({
        "schema_version": 1,
        "job_id": job_id,
        "method": {"name": "standard", "optimizer": "adam"},
        "model": "mlp",
        "dataset": {"name": "digits", "path": str(dataset), "sha256": file_sha256(dataset)},
        "batch_size": 32,
        "epochs": 1,
        "max_steps": max_steps,
        "seed": 0,
        "telemetry": {"memory_hz": 2, "power_hz": 1, "step_every": 1},
    })


def processes_under(directory: str | Path) -> list[int]:
    """Pids of processes (not sshd) whose command line mentions `directory`: a device's agents."""
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if needle in cmdline and not comm.startswith("sshd"):
            found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def harness(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the `harness` command line in a child process (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=kwargs.pop("timeout", 300),
        **kwargs,
    )


def write_plan(path: Path, *, idle_s: float, jobs: str, max_attempts: int = 2) -> Path:
    """A plan file: an idle baseline per device plus the matrix given as YAML text."""
    path.write_text(
        f"idle_baseline_s: {idle_s}\ncooldown_s: 0\nmax_attempts: {max_attempts}\n"
        "telemetry: {memory_hz: 2, power_hz: 1, step_every: 1}\n"
        "datasets:\n  digits: {}\nmatrix:\n" + jobs
    )
    return path
