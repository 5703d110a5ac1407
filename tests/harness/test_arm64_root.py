"""The arm64 root's build plan, checked without building (tests/harness/test_arm64_device.py runs
the emulated device itself)."""

from __future__ import annotations

import pytest

from harness.arm64_root import APT_PACKAGES, PIP_PACKAGES, Arm64Root, apt_mirror, chroot_argv
from harness.errors import HarnessUsageError
from harness.lab import Lab

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_skips_security_disabled_and_source_entries(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n")
    assert apt_mirror(tmp_path) is None
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://sec.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://one.example/debian"


def test_the_cache_key_follows_what_is_installed(tmp_path):
    root = Arm64Root(tmp_path)
    assert root.directory == tmp_path.resolve() / f"arm64-bookworm-{root.key}"
    assert root.key == Arm64Root(tmp_path / "elsewhere").key and not root.ready()
    assert {"python3-dev", "g++", "openssh-server", "python3-venv"} <= set(APT_PACKAGES)
    assert PIP_PACKAGES[0] == "torch==2.10.0"  # the newest aarch64 CPU build on the index


def test_chroot_steps_run_in_a_private_mount_namespace(tmp_path):
    argv = chroot_argv(tmp_path, ["/usr/bin/python3", "-V"], env={"A": "1"})
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[-2:] == ["/usr/bin/python3", "-V"] and "A=1" in argv and "env" in argv


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(HarnessUsageError, match="--arch: 'riscv64'"):
        Lab(tmp_path).up(1, arch="riscv64")
