"""The emulated arm64 lab device itself: its own aarch64 sshd, Python and torch, reached over
SSH like a Pi. Needs the cached arm64 root (built once by `harness lab up --arch arm64`) and
root; slow (every program on the device is emulated). `.ci/arm64` runs the engine's and the
agent's tests on it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from harness.arm64_root import Arm64Root
from harness.lab import Lab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="arm64 lab devices need root"),
    pytest.mark.skipif(not Arm64Root().ready(),
                       reason=f"no arm64 root cached at {Arm64Root().directory} "
                              "(harness lab up --devices 1 --arch arm64 builds it once)"),
]


def ssh(lab: Lab, command: str) -> str:
    device = lab.devices[0]
    return subprocess.run(
        ["ssh", "-q", "-i", str(lab.user_key), "-o", f"UserKnownHostsFile={lab.known_hosts_path}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(device.port),
         f"root@{device.host}", command],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout.strip()


def test_an_arm64_device_is_aarch64_debian_with_torch_over_ssh(tmp_path):
    lab = Lab(tmp_path / "lab")
    lab.up(1, arch="arm64")
    try:
        device = lab.devices[0]
        assert device.arch == "arm64" and device.workdir == "/root/bnn-work"
        assert ssh(lab, "uname -m") == "aarch64"
        facts = ssh(lab, "/opt/bnn/venv/bin/python -c 'import platform, torch; "
                         "print(platform.python_version(), torch.__version__)'")
        assert facts.startswith("3.11.") and facts.endswith("+cpu")
        ssh(lab, "echo written > /root/bnn-work/probe.txt")
        assert device.host_path("/root/bnn-work/probe.txt").read_text() == "written\n"
        assert not (Arm64Root().root / "root" / "bnn-work" / "probe.txt").exists()  # overlay
        pid = lab.sshd_pid(device.name)
        assert pid is not None
    finally:
        lab.down()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")
