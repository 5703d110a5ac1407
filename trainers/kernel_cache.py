"""Where the engine's compiled kernels live, and the rules for building them.

The kernels (`trainers/csrc/*.cpp`) are built once per machine and source: the cache entry is
named by a hash of the sources' bytes, the compiler flags, the torch version, the Python
version and the machine (`build_key`), never by the path the code was deployed to, so a
second deploy or another copy of the same sources loads the library already built.

A build is the costliest thing the engine does to a small device (one g++ process on these
sources peaks near 1.1 GB resident, 1.7 GB before they stopped including <torch/extension.h>;
see csrc/torch_lite.h), so:

- one compiler job at a time (`BUILD_JOBS`), and one build per machine at a time (a lock file
  in the cache; a second process waits, then loads what the first built);
- refused with `KernelBuildRefused` when the memory available (`MemAvailable`) is below
  `min_available_bytes()` (`BNN_KERNEL_BUILD_MIN_MIB`, default `DEFAULT_MIN_AVAILABLE_MIB`);
- it is setup, not training: `harness devices setup` and `python -m trainers kernels build`
  build ahead of time, and the device agent builds (if it must) before a job's clock starts.

Stdlib only (no torch import): the host's device probe uses it to say whether a device's
kernels are built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainers import build_flags

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCE_NAMES = ("lowmem_kernels.cpp", "bop_kernels.cpp", "standard_kernels.cpp", "bit_kernels.cpp",
                "torch_lite.h")
# Compiler processes at once (ninja's -j): each takes most of a small device's memory.
BUILD_JOBS = 1
# Free memory a build needs: one g++ on these sources peaks at about 1.1 GB resident (GNU
# time's maximum RSS of `python -m trainers kernels build`, x86-64, torch 2.13 headers, -O3)
# and at 1259 MiB on the lab's emulated arm64 device (aarch64 g++ 12, torch 2.10 headers; the
# children's ru_maxrss of the same build, qemu-user's own memory included, so an upper
# bound for a Pi); the margin keeps the rest of the device (agent, sampler, OS) out of swap
# and away from the OOM killer. A 2 GB Raspberry Pi passes; a 1 GB one runs the reference path.
DEFAULT_MIN_AVAILABLE_MIB = 1408
LIBRARY_PREFIX = "bnn_kernels_"
_LOCK_NAME = ".build.lock"
_DONE_NAME = "built.json"


class KernelBuildRefused(RuntimeError):
    """A build that must not start (too little memory); the message says what to do."""


def sources() -> list[Path]:
    return [SOURCE_DIR / name for name in SOURCE_NAMES]


def compiler_flags(machine: str | None = None) -> list[str]:
    """The flags as the cache key counts them: the base flags and the CPU-tuning flags tried
    on this architecture (`trainers.build_flags`; which one the compiler takes is settled by
    the build and recorded in its `built.json`), so the key needs no compiler to compute: a
    device whose kernels are built loads them without one."""
    machine = machine or platform.machine()
    candidates = build_flags.NATIVE_CANDIDATES.get(machine, build_flags.DEFAULT_NATIVE_CANDIDATES)
    return [*build_flags.BASE_CFLAGS, *candidates]


def torch_version() -> str | None:
    """The installed torch's version, from its metadata (no import: torch takes seconds)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_key(source_paths: list[Path], cflags: list[str], torch: str | None) -> str:
    """Hash of everything the library depends on: source bytes (not paths), flags, torch,
    Python (the extension ABI) and the machine."""
    digest = hashlib.sha256()
    for path in source_paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    meta = {"cflags": cflags, "torch": torch, "python": sys.implementation.cache_tag,
            "machine": platform.machine()}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def cache_root() -> Path:
    """`BNN_KERNEL_CACHE`, else $XDG_CACHE_HOME (or ~/.cache)/bnn-harness/kernels."""
    if os.environ.get("BNN_KERNEL_CACHE"):
        return Path(os.environ["BNN_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnn-harness" / "kernels"


@dataclass(frozen=True)
class KernelBuild:
    """The cache entry of one build: `<root>/<name>/<name>.so` plus a marker when complete."""

    key: str
    directory: Path

    @property
    def name(self) -> str:  # also the extension module's name (TORCH_EXTENSION_NAME)
        return LIBRARY_PREFIX + self.key

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def built(self) -> bool:
        """True once a build finished here (the marker is written after the library)."""
        return (self.directory / _DONE_NAME).is_file() and self.library.is_file()

    def record(self) -> dict:
        """What the build wrote about itself (flags used, seconds, when); {} if not built."""
        try:
            return json.loads((self.directory / _DONE_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def mark_built(self, seconds: float, flags: list[str]) -> None:
        record = {"key": self.key, "seconds": round(seconds, 1), "flags": flags,
                  "torch": torch_version(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.directory / f".{_DONE_NAME}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.directory / _DONE_NAME)


def current_build(root: Path | None = None) -> KernelBuild:
    """The cache entry for these sources, flags and torch on this machine."""
    key = build_key(sources(), compiler_flags(), torch_version())
    root = cache_root() if root is None else root
    return KernelBuild(key, root / (LIBRARY_PREFIX + key))


def available_memory_bytes() -> int | None:
    """`MemAvailable` of /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def min_available_bytes() -> int:
    raw = os.environ.get("BNN_KERNEL_BUILD_MIN_MIB", str(DEFAULT_MIN_AVAILABLE_MIB))
    try:
        mib = int(raw)
    except ValueError:
        raise KernelBuildRefused(
            f"BNN_KERNEL_BUILD_MIN_MIB must be a whole number of MiB, got {raw!r}") from None
    return mib * 1024 * 1024


def check_memory(available: int | None = None, needed: int | None = None) -> None:
    """Refuse a build when less memory is available than it needs."""
    available = available_memory_bytes() if available is None else available
    needed = min_available_bytes() if needed is None else needed
    if available is not None and available < needed:
        raise KernelBuildRefused(
            f"not building the fused kernels: {available / 2**20:.0f} MiB of memory available, "
            f"a build needs {needed / 2**20:.0f} MiB (one compiler on torch's headers); free "
            f"memory and run `python -m trainers kernels build`, or set "
            f"BNN_KERNEL_BUILD_MIN_MIB to lower the threshold at your own risk"
        )


@contextlib.contextmanager
def build_lock(root: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the machine's build lock (one build at a time); `waiting` hears if we queue."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / _LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting("another process is building the kernels on this machine; waiting")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe(build: KernelBuild | None = None) -> dict:
    """What `devices check` and `trainers kernels status` print: key, directory, built."""
    build = current_build() if build is None else build
    return {"key": build.key, "directory": str(build.directory), "built": build.built,
            "torch": torch_version(), "flags": build.record().get("flags", compiler_flags())}
