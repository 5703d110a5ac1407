"""The compiled C++ kernels: the fused low-memory block (`trainers/csrc/lowmem_kernels.cpp`)
and Bop's update in a low-bit momentum format (`trainers/csrc/bop_kernels.cpp`).

Built once per machine and source with `torch.utils.cpp_extension` (needs a C++ compiler and
ninja) into the cache of `trainers.kernel_cache`, keyed by a hash of the sources, flags and
torch version; a library already built is imported directly (no compiler, no ninja). Builds
run one compiler at a time under a machine-wide lock and are refused when memory is short
(`kernel_cache.KernelBuildRefused`). Where the kernels cannot be had (no compiler, refused)
the engine falls back to the reference paths (`trainers.lowmem`, Bop's PyTorch update), with
one warning saying why; `BNN_FUSED=0` selects them on purpose. `status()` says which runs,
for `trainers measure` and the benchmarks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Callable
from types import ModuleType

from trainers import build_flags, kernel_cache

_module: ModuleType | None = None
_error: str | None = None
_wanted = os.environ.get("BNN_FUSED", "1") != "0"
# Seconds this process spent building the kernels (0.0 when it loaded a cached build).
build_seconds = 0.0


def set_fused(enabled: bool) -> None:
    """Use the fused kernels where they apply (True) or the reference path (False)."""
    global _wanted
    _wanted = enabled


def _import_library(build: kernel_cache.KernelBuild) -> ModuleType:
    import torch  # noqa: F401  (the library links against libtorch: load it first)

    spec = importlib.util.spec_from_file_location(build.name, build.library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {build.library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(progress: Callable[[str], None] | None = None) -> kernel_cache.KernelBuild:
    """Build the kernels into the cache unless they are there; returns the cache entry.
    Raises `KernelBuildRefused` when memory is short, other exceptions when the build fails."""
    global build_seconds
    entry = kernel_cache.current_build()
    if entry.built:
        return entry
    with kernel_cache.build_lock(entry.directory.parent, progress):
        if entry.built:  # another process built it while we waited
            return entry
        from torch.utils.cpp_extension import load as load_extension

        kernel_cache.check_memory()  # with torch loaded: what is left is the compiler's
        if progress is not None:
            progress(f"building the fused kernels into {entry.directory} (one compiler job; "
                     f"about a minute)")
        start = time.perf_counter()
        entry.directory.mkdir(parents=True, exist_ok=True)
        flags = build_flags.cflags()
        copies = []
        for source in kernel_cache.sources():  # stable paths: the build never sees ours
            copy = entry.directory / source.name
            shutil.copyfile(source, copy)
            if copy.suffix == ".cpp":
                copies.append(str(copy))

        jobs = os.environ.get("MAX_JOBS")
        os.environ["MAX_JOBS"] = str(kernel_cache.BUILD_JOBS)  # ninja -j for torch's builder
        try:
            load_extension(name=entry.name, sources=copies, build_directory=str(entry.directory),
                           extra_cflags=flags, extra_ldflags=list(build_flags.LDFLAGS),
                           verbose=False)
        finally:
            if jobs is None:
                os.environ.pop("MAX_JOBS", None)
            else:
                os.environ["MAX_JOBS"] = jobs
        seconds = time.perf_counter() - start
        entry.mark_built(seconds, flags)
        build_seconds += seconds
        if progress is not None:
            progress(f"built in {seconds:.0f} s")
    return entry


def load() -> ModuleType | None:
    """The compiled module, building it on the first call if it is not cached; None if it
    cannot be had (the reason in `status()`)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        _module = _import_library(build())
    except Exception as exc:  # compiler, ninja or headers missing, refused: fall back, say why
        text = str(exc).strip()
        _error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        warnings.warn(f"fused low-memory kernels unavailable, using the reference path "
                      f"({_error})", RuntimeWarning, stacklevel=2)
    return _module


def kernels() -> ModuleType | None:
    """The fused kernels if wanted and buildable, else None (use the reference path)."""
    return load() if _wanted else None


def status() -> str:
    """One phrase for reports: which implementation of the low-memory block runs."""
    if not _wanted:
        return "reference (BNN_FUSED=0)"
    if load() is None:
        return f"reference (fused kernels unavailable: {_error})"
    return "fused C++"



def simd_features() -> str | None:
    """The instruction-set extensions the loaded kernels were compiled for (e.g. 'neon',
    'avx512f avx2 f16c') and the CPU-tuning flag used, or None on the reference path."""
    module = kernels()
    if module is None:
        return None
    flags = kernel_cache.current_build().record().get("flags", [])
    tuning = [f for f in flags if f.startswith(("-march=", "-mcpu="))]
    return f"{module.simd_features()} ({' '.join(tuning) or 'no -march/-mcpu'})"
