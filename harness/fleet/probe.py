"""What a device has: its Python and the agent's dependencies, memory, disk, temperature,
and whether the engine's fused C++ kernels can be built there.

One remote command (stdlib Python on the device) answers everything as JSON,
so `harness devices check` costs one round trip per device. Packages are
found and versioned from their metadata without importing them (importing
torch takes seconds on a Pi).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from harness.fleet.connection import DeviceConnection
from harness.fleet.deploy import remote_python_env
from harness.fleet.errors import DeviceNotReady

# Python modules the agent needs on the device -> the pip requirement that provides each.
REQUIRED_MODULES = {"torch": "torch", "psutil": "psutil", "numpy": "numpy"}

_PROBE_SCRIPT = r"""
import importlib.metadata, importlib.util, json, os, platform, shutil, subprocess, sys
found = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
for name in sys.argv[2:]:
    if importlib.util.find_spec(name) is None:
        found["modules"][name] = None
        continue
    try:
        found["modules"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found["modules"][name] = "?"
spec = importlib.util.find_spec("device_agent")
found["device_agent_path"] = spec.origin if spec else None
try:
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    found["mem_available_bytes"] = int(info["MemAvailable"].split()[0]) * 1024
except (OSError, KeyError, ValueError):
    found["mem_available_bytes"] = None
path = sys.argv[1]
while not os.path.isdir(path):
    path = os.path.dirname(path) or "/"
found["disk_free_bytes"] = shutil.disk_usage(path).free
try:
    with open("/sys/class/thermal/thermal_zone0/temp") as handle:
        found["cpu_temp_c"] = int(handle.read().strip()) / 1000.0
except (OSError, ValueError):
    found["cpu_temp_c"] = None
# The engine builds its fused low-memory kernels with a C++ compiler and ninja (pip or OS);
# without them it runs its slower reference path.
found["cxx"] = shutil.which("c++") or shutil.which("g++")
found["ninja"] = bool(shutil.which("ninja") or importlib.util.find_spec("ninja"))
try:  # the deployed engine's kernel cache (stdlib only): are this source's kernels built?
    from trainers import kernel_cache
    found["kernels_built"] = kernel_cache.current_build().built
except Exception:
    found["kernels_built"] = None
# What an install must know: the architecture, PEP 668, the headers the kernels build
# against, and whether torch is a CUDA build (and a GPU there to use it).
import sysconfig
found["machine"] = platform.machine()
found["in_venv"] = sys.prefix != sys.base_prefix
found["externally_managed"] = not found["in_venv"] and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
found["python_dev"] = os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h"))
found["gpu"] = any(os.path.exists(p) for p in ("/dev/nvidia0", "/proc/driver/nvidia",
                                               "/dev/kfd"))
found["torch_cuda"] = None
found["cuda_packages_bytes"] = None
if found["modules"].get("torch"):
    import re
    torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
    try:  # torch/version.py: `cuda: Optional[str] = '13.0'` in a CUDA build, None in a CPU one
        with open(os.path.join(torch_dir, "version.py")) as handle:
            match = re.search(r"^(cuda|hip)\b[^=]*=\s*'([^']+)'", handle.read(), re.MULTILINE)
        if match:
            found["torch_cuda"] = f"{match.group(1).replace('hip', 'rocm')} {match.group(2)}"
    except OSError:
        pass
    total = 0
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("nvidia-", "cuda-", "triton")):
            for item in dist.files or ():
                try:
                    total += os.path.getsize(item.locate())
                except OSError:
                    pass
    found["cuda_packages_bytes"] = total
found["throttled"] = None
if shutil.which("vcgencmd"):
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        found["throttled"] = out.split("=", 1)[-1]
    except (OSError, subprocess.SubprocessError):
        pass
json.dump(found, sys.stdout)
"""


@dataclass(frozen=True)
class DeviceProbe:
    """A device's answers; None where the device has no such thing."""

    python: str
    executable: str
    modules: dict[str, str | None]
    device_agent_path: str | None
    mem_available_bytes: int | None
    disk_free_bytes: int | None
    cpu_temp_c: float | None
    throttled: str | None  # `vcgencmd get_throttled` value, e.g. "0x50000"
    cxx: str | None = None  # the C++ compiler the engine's fused kernels would build with
    ninja: bool = False
    kernels_built: bool | None = None  # None: the engine is not deployed there
    machine: str | None = None  # platform.machine(): aarch64 on a Pi
    in_venv: bool | None = None
    externally_managed: bool | None = None  # PEP 668: the system Python refuses pip
    python_dev: bool | None = None  # Python.h present (python3-dev): the kernels need it
    gpu: bool | None = None
    torch_cuda: str | None = None  # e.g. "cu130" when torch is a CUDA build
    cuda_packages_bytes: int | None = None  # nvidia-*/cuda-*/triton distributions, on disk

    @property
    def fused_kernels(self) -> str:
        """Whether the deployed engine's fused kernels are built ("built"), can be built
        ("buildable"), or what is missing for them."""
        if self.kernels_built:
            return "built"
        missing = [name for name, have in (("C++ compiler", self.cxx), ("ninja", self.ninja),
                                           ("python3-dev", self.python_dev is not False))
                   if not have]
        return "buildable" if not missing else f"reference path (missing: {', '.join(missing)})"

    @property
    def warnings(self) -> list[str]:
        """What works but costs: a CUDA torch without a GPU, no python3-dev."""
        found = []
        if self.torch_cuda and not self.gpu:
            size = (f" and {self.cuda_packages_bytes / 2**30:.1f} GiB of CUDA packages"
                    if self.cuda_packages_bytes else "")
            found.append(f"torch {self.modules.get('torch')} is a CUDA build ({self.torch_cuda})"
                         f"{size} on a device without a GPU: reinstall the CPU build "
                         f"(`harness devices setup --install --replace-cuda-torch`)")
        if self.python_dev is False:
            found.append("python3-dev is missing (no Python.h): the fused kernels cannot be "
                         "built, lowmem runs the slower reference path; "
                         "`sudo apt-get install python3-dev`")
        return found

    @property
    def missing(self) -> list[str]:
        """pip requirements for the modules the agent needs and the device lacks."""
        return [pip for module, pip in REQUIRED_MODULES.items() if self.modules.get(module) is None]


def probe_argv(python: str, workdir: str) -> list[str]:
    """The probe's command line; it prints one JSON object (`DeviceProbe`'s fields)."""
    return [python, "-c", _PROBE_SCRIPT, workdir, *REQUIRED_MODULES]


def parse_probe(stdout: str) -> DeviceProbe:
    return DeviceProbe(**json.loads(stdout))


def probe_device(connection: DeviceConnection, python: str, workdir: str) -> DeviceProbe:
    """Run the probe with the device's Python (deployed code on PYTHONPATH)."""
    result = connection.run(
        [*remote_python_env(workdir), *probe_argv(python, workdir)], timeout_s=120
    )
    if result.exit_code != 0:
        raise DeviceNotReady(
            f"device {connection.device.name}: {python} did not run "
            f"({(result.stderr or result.stdout).strip()[-200:]}); set `python:` in the "
            f"inventory to the device's Python 3 interpreter"
        )
    return parse_probe(result.stdout)


def install_command(python: str, missing: list[str]) -> str:
    return f"{python} -m pip install {' '.join(missing)}"


def require_agent_dependencies(probe: DeviceProbe, device_name: str, inventory: str) -> None:
    """Raise `DeviceNotReady` saying exactly what to install when a dependency is missing."""
    if probe.missing:
        raise DeviceNotReady(
            f"device {device_name}: {probe.executable} lacks {', '.join(probe.missing)}; "
            f"on the device run `{install_command(probe.executable, probe.missing)}`, or run "
            f"`harness devices setup --devices {inventory} --install`"
        )
