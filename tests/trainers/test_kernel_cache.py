"""The compiled kernels' cache: keyed by what the library depends on, not by where the code
lies; one build at a time; refused, with a clear message, when memory is short."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trainers import kernel_cache
from trainers.kernel_cache import KernelBuildRefused, build_key, check_memory

REPO_ROOT = Path(__file__).resolve().parents[2]


def copy_sources(to: Path) -> list[Path]:
    to.mkdir(parents=True)
    return [Path(shutil.copy(source, to)) for source in kernel_cache.sources()]


def test_key_follows_source_bytes_flags_and_torch_not_paths(tmp_path: Path):
    first = copy_sources(tmp_path / "deploy-1")
    second = copy_sources(tmp_path / "elsewhere" / "deploy-2")
    flags = kernel_cache.compiler_flags()
    key = build_key(first, flags, "2.13.0+cpu")
    assert build_key(second, flags, "2.13.0+cpu") == key  # same sources at another path
    assert build_key(first, [*flags, "-DEXTRA"], "2.13.0+cpu") != key
    assert kernel_cache.compiler_flags("aarch64") != kernel_cache.compiler_flags("x86_64")
    assert build_key(first, flags, "2.14.0+cpu") != key
    second[0].write_bytes(second[0].read_bytes() + b"\n// one more line\n")
    assert build_key(second, flags, "2.13.0+cpu") != key
    assert build_key(kernel_cache.sources(), flags, "2.13.0+cpu") == key


def test_cache_entry_is_named_by_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BNN_KERNEL_CACHE", str(tmp_path / "cache"))
    entry = kernel_cache.current_build()
    assert entry.directory == tmp_path / "cache" / f"bnn_kernels_{entry.key}"
    assert entry.library.name == f"bnn_kernels_{entry.key}.so"
    assert not entry.built
    entry.directory.mkdir(parents=True)
    entry.library.write_bytes(b"")  # a library without the completion marker: not built
    assert not entry.built
    entry.mark_built(1.0, ["-O3"])
    assert entry.built and kernel_cache.describe()["built"]


def test_low_memory_refuses_the_build_with_the_reason():
    with pytest.raises(KernelBuildRefused) as error:
        check_memory(available=700 * 2**20, needed=1280 * 2**20)
    message = str(error.value)
    assert "700 MiB of memory available" in message and "needs 1280 MiB" in message
    assert "BNN_KERNEL_BUILD_MIN_MIB" in message
    check_memory(available=2000 * 2**20, needed=1280 * 2**20)  # enough: no exception


def test_build_command_refuses_without_starting_a_compiler(tmp_path: Path):
    """`python -m trainers kernels build` on a machine with too little memory: exit 1, one
    clear line, nothing built (the threshold is set above any machine's memory)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BNN_KERNEL_CACHE": str(tmp_path),
           "BNN_KERNEL_BUILD_MIN_MIB": str(1 << 30)}
    result = subprocess.run([sys.executable, "-m", "trainers", "kernels", "build", "--format",
                             "json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    info = json.loads(result.stdout.splitlines()[-1])
    assert not info["built"] and "not building the fused kernels" in info["error"]
    assert "not building the fused kernels" in result.stderr
    entry_dir = Path(info["directory"])
    assert not any(entry_dir.glob("*.o")) and not any(entry_dir.glob("*.so"))


def test_engine_falls_back_when_the_build_is_refused(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BNN_KERNEL_CACHE": str(tmp_path),
           "BNN_KERNEL_BUILD_MIN_MIB": str(1 << 30)}
    code = "from trainers import native; print(native.status())"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reference (fused kernels unavailable: KernelBuildRefused")


def test_one_build_at_a_time(tmp_path: Path):
    """A second builder waits on the machine's lock, and is told that it waits."""
    heard: list[str] = []
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with kernel_cache.build_lock(tmp_path):
            order.append("first in")
            inside.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        with kernel_cache.build_lock(tmp_path, heard.append):
            order.append("second in")

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive() and heard and "waiting" in heard[0]
    release.set()
    a.join(10)
    b.join(10)
    assert order == ["first in", "first out", "second in"]


@pytest.mark.compiler
def test_a_copy_of_the_code_elsewhere_loads_the_build_without_compiling(tmp_path: Path):
    """The same sources deployed to another path find the build made for the first copy."""
    from trainers import native

    if native.load() is None:
        pytest.skip(f"fused kernels cannot be built here: {native.status()}")
    copy = tmp_path / "second-deploy"
    shutil.copytree(REPO_ROOT / "trainers", copy / "trainers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from trainers import native; import trainers; "
            "print(native.status(), native.build_seconds, trainers.__file__)")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status, seconds, where = result.stdout.rsplit(" ", 2)
    assert status == "fused C++" and float(seconds) == 0.0
    assert where.startswith(str(copy))
