"""The process's memory from /proc/self/status: the one reader, for the engine's `measure`
and the device agent's sampler (standard library; psutil where /proc is missing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATUS_PATH = Path("/proc/self/status")
CLEAR_REFS_PATH = Path("/proc/self/clear_refs")

@dataclass(frozen=True)
class MemoryReading:
    rss_bytes: int | None
    hwm_bytes: int | None
    vm_bytes: int | None


def read_memory() -> MemoryReading:
    """VmRSS, VmHWM and VmSize of this process from /proc (psutil's RSS elsewhere)."""
    values: dict[str, int] = {}
    try:
        with STATUS_PATH.open("rb") as status:
            for line in status:
                if line.startswith((b"VmRSS:", b"VmHWM:", b"VmSize:")):
                    key, amount, _unit = line.split()
                    values[key[:-1].decode()] = int(amount) * 1024
    except OSError:
        import psutil

        info = psutil.Process().memory_info()
        return MemoryReading(info.rss, None, info.vms)
    return MemoryReading(values.get("VmRSS"), values.get("VmHWM"), values.get("VmSize"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the job's own."""
    try:
        CLEAR_REFS_PATH.write_text("5")
    except OSError:
        return False
    return True
