"""The compiled C++ kernels: the fused low-memory block (`trainers/csrc/lowmem_kernels.cpp`)
and Bop's update in a low-bit momentum format (`trainers/csrc/bop_kernels.cpp`).

Built on first use with `torch.utils.cpp_extension.load` (needs a C++ compiler and ninja;
the build is cached under `TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions,
and rebuilt only when the source changes). Where no compiler is present (a bare device
image) the engine falls back to the reference paths (`trainers.lowmem`, Bop's PyTorch
update), with one warning saying why; `BNN_FUSED=0` selects them on purpose. `status()` says
which runs, for `trainers measure` and the benchmarks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

from trainers import build_flags

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("lowmem_kernels.cpp", "bop_kernels.cpp")]

_module: ModuleType | None = None
_error: str | None = None
_wanted = os.environ.get("BNN_FUSED", "1") != "0"


def set_fused(enabled: bool) -> None:
    """Use the fused kernels where they apply (True) or the reference path (False)."""
    global _wanted
    _wanted = enabled


def load() -> ModuleType | None:
    """The compiled module, building it on the first call; None if it cannot be built."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        from torch.utils.cpp_extension import load as load_extension

        _module = load_extension(name="bnn_lowmem_kernels", sources=[str(p) for p in SOURCES],
                                 extra_cflags=build_flags.cflags(), verbose=False)
    except Exception as exc:  # compiler, ninja or headers missing: fall back, say why
        _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
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
    return f"{module.simd_features()} ({build_flags.native_flag() or 'no -march/-mcpu'})"
