"""Facts about the device for the `hello` event, gathered without importing torch."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

AGENT_VERSION = "0.1.0"
PI_MODEL_PATH = Path("/proc/device-tree/model")


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


def emulation(machine: str | None = None, cpuinfo: str | None = None) -> str | None:
    """How this process is emulated, or None when it runs on its own CPU.

    Under qemu-user a foreign program sees the host's /proc/cpuinfo: an aarch64 Python
    reading x86 `vendor_id` lines is being emulated (as on the lab's arm64 devices), and its
    speed is not the target's."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    if machine in X86_MACHINES or "vendor_id" not in cpuinfo:
        return None
    host = next((line.partition(":")[2].strip() for line in cpuinfo.splitlines()
                 if line.startswith("model name")), "an x86 host")
    return f"qemu-user on {host}"


def pi_model() -> str | None:
    """'Raspberry Pi 5 Model B Rev 1.0' and the like, or None off a Pi."""
    try:
        return PI_MODEL_PATH.read_bytes().rstrip(b"\x00\n").decode("utf-8", "replace") or None
    except OSError:
        return None


def device_facts() -> dict:
    return {
        "agent_version": AGENT_VERSION,
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "torch_version": _package_version("torch"),
        "psutil_version": _package_version("psutil"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "total_memory_bytes": total_memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "emulation": emulation(),
        "hostname": platform.node(),
        "pi_model": pi_model(),
        "pid": os.getpid(),
    }
