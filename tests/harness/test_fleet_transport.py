"""SshTransport against real sshd: deployment by checksum, requirement checks, clock, a job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fleet import (  # noqa: F401
    digits_file,
    harness,
    idle_spec,
    lab_factory,
    metered_lab,
    requires_sshd,
    training_spec,
)

from contract.checksum import file_sha256
from harness.cli import main
from harness.clock import estimate_offset
from harness.fleet.errors import DeviceNotReady
from harness.fleet.probe import parse_probe, probe_argv
from harness.fleet.transport import SshTransport
from harness.inventory import load_inventory

pytestmark = requires_sshd


def test_deploy_skips_by_checksum_and_job_runs_from_workdir(
    lab_factory, digits_file: Path  # noqa: F811
):
    lab = lab_factory(1)
    device = load_inventory(lab.inventory_path).device("dev1")
    workdir = Path(device.workdir)
    with SshTransport(device) as transport:
        first = transport.ensure_deployed({digits_file: file_sha256(digits_file)})
        assert "data/digits.npz" in first.copied and "code/device_agent/cli.py" in first.copied
        assert not first.skipped
        assert (workdir / "data" / "digits.npz").read_bytes() == digits_file.read_bytes()
        assert not list(workdir.rglob("*.partial"))
        # Only device code goes over: no harness, no analysis.
        code = {p.name for p in (workdir / "code").iterdir()}
        assert code == {"contract", "datafiles", "device_agent", "trainers"}
        # The device's agent is the deployed copy, not the host's.
        assert transport.probe.device_agent_path == str(
            workdir / "code" / "device_agent" / "__init__.py")
        again = transport.ensure_deployed({digits_file: file_sha256(digits_file)})
        assert again.copied == [] and len(again.skipped) == len(first.copied)
        (workdir / "code" / "device_agent" / "cli.py").write_text("# damaged\n")
        repaired = transport.ensure_deployed({digits_file: file_sha256(digits_file)})
        assert repaired.copied == ["code/device_agent/cli.py"]

        estimate = estimate_offset(transport, 6)
        assert abs(estimate.offset_s) < 0.05 and 0 < estimate.rtt_s < 0.5  # same machine

        job = transport.start_job(idle_spec("rest", 0.5))
        events = [json.loads(line) for line in job.lines()]
        assert job.wait(30) == 0, job.stderr_tail
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "hello" and kinds[1] == "job_start" and kinds[-1] == "job_end"
    assert (workdir / "jobs" / "rest" / "job.json").is_file()


def test_spec_points_at_the_devices_copy_of_the_data(digits_file: Path):  # noqa: F811
    spec = training_spec("tiny", digits_file)
    assert spec.on_device().dataset.path == "data/digits.npz"
    assert spec.dataset.path == str(digits_file)  # the host's spec is left alone


def test_missing_packages_say_exactly_what_to_install(
    lab_factory, tmp_path: Path, capsys: pytest.CaptureFixture  # noqa: F811
):
    lab = lab_factory(1)
    venv = tmp_path / "bare-venv"  # a Python without torch, psutil or numpy
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    text = lab.inventory_path.read_text().replace(f"python: {sys.executable}", f"python: {python}")
    inventory = tmp_path / "bare.yaml"
    inventory.write_text(text)
    device = load_inventory(inventory).device("dev1")
    assert device.python == str(python)
    with (
        SshTransport(device, inventory_hint=str(inventory)) as transport,
        pytest.raises(DeviceNotReady) as error,
    ):
        transport.ensure_deployed({})
    assert str(error.value) == (
        f"device dev1: {python} lacks torch, psutil, numpy; on the device run "
        f"`{python} -m pip install torch psutil numpy`, or run "
        f"`harness devices setup --devices {inventory} --install`"
    )
    assert main(["devices", "check", "--devices", str(inventory), "--format", "json"]) == 3
    row = json.loads(capsys.readouterr().out.splitlines()[-1])["devices"][0]
    assert row["torch"] is None and not row["usable"]
    assert f"{python} -m pip install torch psutil numpy" in row["problem"]
    assert main(["devices", "setup", "--devices", str(inventory)]) == 3
    assert "pip install torch psutil numpy" in capsys.readouterr().err


def test_devices_check_reports_every_column(metered_lab, capsys: pytest.CaptureFixture):  # noqa: F811
    lab = metered_lab(2)
    inventory = str(lab.inventory_path)
    assert main(["devices", "setup", "--devices", inventory, "--only", "dev1"]) == 0
    capsys.readouterr()
    assert main(["devices", "check", "--devices", inventory, "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.splitlines()[-1])["devices"]}
    for row in rows.values():
        assert row["reachable"] and row["authenticated"] and row["host_key"] == "known"
        assert row["python"] and row["torch"] and row["psutil"]
        assert row["mem_available_bytes"] > 0 and row["disk_free_bytes"] > 0
        assert row["usable"] and row["meter"].startswith("um34c ")  # its pty exists
    assert rows["dev1"]["deployed"] and rows["dev1"]["clock_rtt_s"] > 0
    if shutil.which("c++") or shutil.which("g++"):  # setup built (or found) the kernels
        assert rows["dev1"]["fused_kernels"] == "built"
    assert not rows["dev2"]["deployed"] and rows["dev2"]["clock_rtt_s"] is None
    result = harness("devices", "check", "--devices", inventory)  # as a user runs it
    assert result.returncode == 0, result.stderr
    for header in ("host key", "torch", "mem free", "throttled", "clock offset", "usable"):
        assert header in result.stdout


def test_probe_reads_throttling_where_vcgencmd_exists(tmp_path: Path):
    """The probe is plain Python on the device; a Pi's `vcgencmd` answer is parsed."""
    fake = tmp_path / "bin" / "vcgencmd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho throttled=0x50005\n")
    fake.chmod(0o755)
    result = subprocess.run(
        probe_argv(sys.executable, str(tmp_path / "not-yet" / "work")),
        capture_output=True, text=True, check=True,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
    )
    probe = parse_probe(result.stdout)
    assert probe.throttled == "0x50005"
    assert probe.disk_free_bytes > 0  # measured on the nearest existing parent directory
    assert probe.missing == []


def test_probe_says_whether_the_fused_kernels_can_be_built(tmp_path: Path):
    """A device without a C++ compiler (and no kernels built) is told it will run the
    engine's reference path; one whose kernels are built needs no compiler."""
    from trainers import kernel_cache, native

    empty = tmp_path / "bin"
    empty.mkdir()
    code = str(Path(__file__).resolve().parents[2])  # the engine the probe finds deployed
    runs = {}
    for label, path, cache in (("bare", str(empty), tmp_path / "no-cache"),
                               ("system", os.environ.get("PATH", ""), tmp_path / "no-cache"),
                               ("built", str(empty), kernel_cache.cache_root())):
        env = {"PATH": path, "PYTHONPATH": code, "BNN_KERNEL_CACHE": str(cache)}
        result = subprocess.run(probe_argv(sys.executable, str(tmp_path)), capture_output=True,
                                text=True, check=True, env=env)
        runs[label] = parse_probe(result.stdout)
    assert runs["bare"].cxx is None and runs["bare"].kernels_built is False
    assert runs["bare"].fused_kernels.startswith("reference path (missing: C++ compiler")
    if runs["system"].cxx and runs["system"].ninja:
        assert runs["system"].fused_kernels == "buildable"
    if native.load() is not None:  # built in this machine's cache: no compiler needed
        assert runs["built"].kernels_built and runs["built"].fused_kernels == "built"
