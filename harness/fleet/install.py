"""Installing the agent's Python packages on a device: torch's CPU build, in a venv where the
system Python is "externally managed" (PEP 668), after checking free disk and memory.

A plain `pip install torch` takes the package index's default build. On aarch64 that is a
CPU build up to torch 2.10; from 2.11 on it is a CUDA build (2.13.0: a 0.43 GB wheel, 0.9 GB
installed, plus ~2.9 GB of nvidia packages) that does not even import without those packages,
and a Pi has no GPU for it. So on aarch64 the plan pins `torch<2.11` (2.10's CPU build:
a 0.15 GB wheel, ~0.8 GB installed with its dependencies), unless `--torch-index` names a
CPU wheel index to take a newer CPU build from. On x86-64 the default index only has CUDA
builds, so a device without a GPU needs `--torch-index`.

Raspberry Pi OS Bookworm's Python refuses `pip install` outside a venv (PEP 668); then a
venv is made in the device's work directory (`<workdir>/venv`, with the system's packages
visible) and the inventory's `python:` must point at it, which the result says.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.fleet.connection import DeviceConnection
from harness.fleet.errors import DeviceNotReady
from harness.fleet.probe import DeviceProbe

GIB = 1 << 30
MIB = 1 << 20
AARCH64_CPU_TORCH = "torch>=2.1,<2.11"  # 2.10.x: the newest aarch64 CPU build on the index
# Free disk an install needs: what it leaves installed (measured in the lab's arm64 root:
# torch 2.10.0 + dependencies, 0.82 GB; x86-64's CUDA build ~4.5 GB) plus pip's download and
# unpacking copies.
DISK_NEEDED_BYTES = {"aarch64": 2 * GIB, "x86_64": 8 * GIB}
DISK_NEEDED_OTHER = 8 * GIB
# pip holds a wheel's index and one member at a time; a torch install peaks well below this.
MEMORY_NEEDED_BYTES = 400 * MIB
VENV_DIR = "venv"
PIP_TIMEOUT_S = 3600

_REMOVE_CUDA = r"""
import importlib.metadata, subprocess, sys
names = sorted({(d.metadata["Name"] or "") for d in importlib.metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith(("nvidia-", "cuda-", "triton"))})
if names:
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *names], check=True)
print(" ".join(names))
"""


@dataclass
class InstallPlan:
    """What `devices setup --install` runs on one device, in order."""

    python: str  # the interpreter the packages go into
    venv: str | None = None  # made first (PEP 668), with the system's site packages
    steps: list[tuple[str, list[str]]] = field(default_factory=list)  # (what, argv)
    disk_needed_bytes: int = 0

    @property
    def summary(self) -> str:
        return "; ".join(what for what, _ in self.steps)


def plan_install(probe: DeviceProbe, workdir: str, torch_index: str | None = None,
                 replace_cuda_torch: bool = False) -> InstallPlan:
    """The install for what this device lacks (and, if asked, its CUDA torch replaced)."""
    plan = InstallPlan(python=probe.executable)
    if probe.externally_managed:
        plan.venv = posixpath.join(workdir, VENV_DIR)
        plan.python = posixpath.join(plan.venv, "bin", "python")
        plan.steps.append((f"venv {plan.venv} (the system Python is externally managed)",
                           [probe.executable, "-m", "venv", "--system-site-packages",
                            plan.venv]))
    pip = [plan.python, "-m", "pip", "install", "--progress-bar", "off"]
    cuda_to_replace = bool(replace_cuda_torch and probe.torch_cuda and not probe.gpu)
    need_torch = probe.modules.get("torch") is None or cuda_to_replace or bool(plan.venv)
    machine = probe.machine or "?"
    if cuda_to_replace:
        plan.steps.append(("remove torch's CUDA packages", [plan.python, "-c", _REMOVE_CUDA]))
    if need_torch:
        reinstall = ["--force-reinstall", "--no-deps"] if cuda_to_replace else []
        if torch_index:
            plan.steps.append((f"torch (CPU build from {torch_index})",
                               [*pip, *reinstall, "--index-url", torch_index, "torch"]))
        elif machine == "aarch64":
            plan.steps.append((f"{AARCH64_CPU_TORCH} (aarch64 CPU build)",
                               [*pip, *reinstall, AARCH64_CPU_TORCH]))
        elif probe.gpu:
            plan.steps.append(("torch (CUDA build: this device has a GPU)", [*pip, "torch"]))
        else:
            raise DeviceNotReady(
                f"on {machine} the package index's torch is a CUDA build (~4.5 GB with its "
                f"nvidia packages) and this device has no GPU: give --torch-index with "
                f"PyTorch's CPU wheel index (PyTorch's install page lists it)")
        if cuda_to_replace:  # torch's own pure-Python dependencies stay as they were
            plan.steps.append(("torch's dependencies", [*pip, "filelock", "typing-extensions",
                                                        "sympy", "networkx", "jinja2",
                                                        "fsspec"]))
    others = [name for name in ("psutil", "numpy")
              if probe.modules.get(name) is None or plan.venv]
    if not probe.ninja:
        others.append("ninja")  # the fused kernels' build tool (or the OS's ninja-build)
    if others:
        plan.steps.append((" ".join(others), [*pip, *others]))
    if need_torch:
        plan.disk_needed_bytes = DISK_NEEDED_BYTES.get(machine, DISK_NEEDED_OTHER)
    elif plan.steps:
        plan.disk_needed_bytes = 200 * MIB
    return plan


def preflight(probe: DeviceProbe, plan: InstallPlan, device_name: str) -> None:
    """Refuse, saying what is short, before a pip run that could fill the SD card or be
    killed for memory halfway."""
    disk = probe.disk_free_bytes
    if disk is not None and disk < plan.disk_needed_bytes:
        raise DeviceNotReady(
            f"device {device_name}: {disk / GIB:.1f} GiB free in the work directory, the "
            f"install ({plan.summary}) needs about {plan.disk_needed_bytes / GIB:.1f} GiB; "
            f"free some space first")
    memory = probe.mem_available_bytes
    if plan.steps and memory is not None and memory < MEMORY_NEEDED_BYTES:
        raise DeviceNotReady(
            f"device {device_name}: {memory / MIB:.0f} MiB of memory available, pip needs "
            f"about {MEMORY_NEEDED_BYTES / MIB:.0f} MiB; stop other programs (or add swap)")


def run_install(connection: DeviceConnection, plan: InstallPlan, device_name: str,
                say: Callable[[str], None]) -> None:
    """Run the plan's steps on the device, stopping at the first that fails."""
    for what, argv in plan.steps:
        say(f"{device_name}: installing {what}")
        outcome = connection.run(argv, timeout_s=PIP_TIMEOUT_S)
        if outcome.exit_code != 0:
            hint = ""
            if "externally-managed" in outcome.stderr:
                hint = " (PEP 668: set `python:` to a venv's interpreter)"
            elif argv[1:3] == ["-m", "venv"]:
                hint = " (install python3-venv: `sudo apt-get install python3-venv`)"
            raise DeviceNotReady(
                f"device {device_name}: `{shlex.join(argv)}` failed: "
                f"{outcome.stderr.strip()[-300:]}{hint}")
