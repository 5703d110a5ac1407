"""The kernels' compiler flags: -march=native only where the compiler accepts it."""

from __future__ import annotations

import stat
from pathlib import Path

from trainers import build_flags


def fake_compiler(tmp_path: Path, refuses: tuple[str, ...]) -> str:
    """A 'compiler' that fails (as GCC does) on the given flags and accepts the rest."""
    script = tmp_path / "c++"
    cases = "\n".join(f'  {flag}) echo "error: unknown value for {flag}" >&2; exit 1;;'
                      for flag in refuses)
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in\n{cases}\n'
                      '  esac; done\ncat >/dev/null\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_native_flag_where_accepted(tmp_path):
    cxx = fake_compiler(tmp_path, refuses=())
    assert build_flags.native_flag(cxx, "x86_64") == "-march=native"
    assert build_flags.native_flag(cxx, "aarch64") == "-march=native"


def test_aarch64_falls_back_to_mcpu_then_to_the_default(tmp_path):
    cxx = fake_compiler(tmp_path, refuses=("-march=native",))
    assert build_flags.native_flag(cxx, "aarch64") == "-mcpu=native"
    assert build_flags.native_flag(cxx, "x86_64") is None
    refusing = tmp_path / "all"
    refusing.mkdir()
    cxx = fake_compiler(refusing, refuses=("-march=native", "-mcpu=native"))
    assert build_flags.native_flag(cxx, "aarch64") is None


def test_cflags_keep_exact_float_arithmetic():
    flags = build_flags.cflags()
    assert "-ffp-contract=off" in flags and "-O3" in flags
    assert sum(f.endswith("=native") for f in flags) <= 1
