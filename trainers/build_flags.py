"""Compiler flags for the fused C++ kernels on the machine that builds them.

The kernels are built where they run, so they are tuned for that CPU with `-march=native`
(x86: AVX2/F16C/AVX-512; aarch64: the core's NEON extensions, fp16 and dot products) — but
only where the compiler accepts it: GCC on aarch64 learns the core from /proc/cpuinfo and
refuses `-march=native` when it cannot (under qemu-user, an old GCC, a core it does not
know). The flag is tried once on an empty translation unit; on refusal `-mcpu=native` is
tried (aarch64 GCC's own spelling), then the compiler's default for the architecture
(aarch64's baseline already has NEON, which is all the kernels' ARM paths need).

`-ffp-contract=off` is never optional: a fused multiply-add would change roundings, and
the kernels are held bit-for-bit equal to the PyTorch reference path.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess

# -std=c++20 (std::bit_cast, std::endian): after torch's own -std flag, so it wins where
# torch's builder asks for C++17 (torch 2.10, the newest aarch64 CPU build on the index).
# -fopenmp: without it the kernels' `at::parallel_for` is a plain loop (ATen's header runs
# the range serially unless _OPENMP is defined), so every "parallel" pass ran on one thread.
# LDFLAGS link OpenMP's runtime: libgomp.so.1, the soname torch has already loaded, so the
# process keeps one OpenMP runtime and one thread pool.
BASE_CFLAGS = ("-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)
# Tried in order; the first the compiler accepts is used.
NATIVE_CANDIDATES = {"aarch64": ("-march=native", "-mcpu=native")}
DEFAULT_NATIVE_CANDIDATES = ("-march=native",)


def compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension will call ($CXX, else c++), if present."""
    name = os.environ.get("CXX", "c++")
    return shutil.which(name)


def accepts(cxx: str, flag: str) -> bool:
    """True when `cxx` compiles an empty C++ file with `flag` (no warning turned error)."""
    try:
        result = subprocess.run(
            [cxx, flag, "-x", "c++", "-fsyntax-only", "-"],
            input=b"", capture_output=True, timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@functools.cache
def native_flag(cxx: str | None = None, machine: str | None = None) -> str | None:
    """The CPU-tuning flag this compiler accepts here, or None (the architecture's default)."""
    cxx = cxx or compiler()
    if cxx is None:
        return None
    machine = machine or platform.machine()
    for flag in NATIVE_CANDIDATES.get(machine, DEFAULT_NATIVE_CANDIDATES):
        if accepts(cxx, flag):
            return flag
    return None


def cflags() -> list[str]:
    """Everything passed to the compiler for the kernels on this machine."""
    flag = native_flag()
    return [*BASE_CFLAGS, *([flag] if flag else [])]
