"""Host keys against real sshd: a mismatch or an unknown key is refused and nothing runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fleet import harness, idle_spec, lab_factory, requires_sshd  # noqa: F401

from harness.fleet.errors import HostKeyRejected
from harness.fleet.transport import SshTransport
from harness.inventory import load_inventory
from harness.lab import SSH_KEYGEN

pytestmark = requires_sshd


def replace_host_key(lab, name: str) -> None:
    """Re-key a device (as if it were re-imaged) and restart its sshd."""
    device = lab.device(name)
    lab.kill_sshd(name)
    device.host_key_file.unlink()
    device.host_key_file.with_suffix(".pub").unlink()
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(device.host_key_file)],
                   check=True)
    lab.start(name)


def test_mismatch_is_refused_with_fix_and_nothing_runs(lab_factory):  # noqa: F811
    lab = lab_factory(2)
    replace_host_key(lab, "dev2")
    device = load_inventory(lab.inventory_path).device("dev2")
    transport = SshTransport(device)
    with pytest.raises(HostKeyRejected) as error:
        transport.start_job(idle_spec("must-not-run", 30))
    message = str(error.value)
    assert "HOST KEY MISMATCH" in message and "refusing to connect" in message
    assert f"ssh-keygen -R '[127.0.0.1]:{device.port}' -f {lab.known_hosts_path}" in message
    assert transport.connection.host_key.state == "mismatch"
    assert list(Path(device.workdir).iterdir()) == []  # no spec, no job directory
    # The check command shows the same and exits 3 (the other device is fine).
    result = harness("devices", "check", "--devices", str(lab.inventory_path), "--format", "json")
    assert result.returncode == 3, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout.splitlines()[-1])["devices"]}
    assert rows["dev1"]["usable"] and rows["dev1"]["host_key"] == "known"
    assert not rows["dev2"]["usable"] and rows["dev2"]["host_key"] == "mismatch"
    assert "ssh-keygen -R" in rows["dev2"]["problem"]
    assert list(Path(device.workdir).iterdir()) == []
    # Following the advice (remove the old key, add the new one) makes it usable again.
    subprocess.run([SSH_KEYGEN, "-R", f"[127.0.0.1]:{device.port}", "-f",
                    str(lab.known_hosts_path)], check=True, capture_output=True)
    scan = subprocess.run(["ssh-keyscan", "-p", str(device.port), "127.0.0.1"],
                          capture_output=True, text=True, check=True)
    with lab.known_hosts_path.open("a") as handle:
        handle.write(scan.stdout)
    with SshTransport(load_inventory(lab.inventory_path).device("dev2")) as fixed:
        assert fixed.connection.host_key.state == "known"


def test_unknown_key_refused_unless_trust_on_first_use(
    lab_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
):
    lab = lab_factory(1)
    lines = lab.known_hosts_path.read_text()
    lab.known_hosts_path.write_text("")  # the host has never seen this device
    device = load_inventory(lab.inventory_path).device("dev1")
    with pytest.raises(HostKeyRejected) as error:
        SshTransport(device).open()
    assert "is not in" in str(error.value) and "ssh-keyscan -p" in str(error.value)
    assert "trust_on_first_use: true" in str(error.value)
    assert lab.known_hosts_path.read_text() == ""  # nothing recorded silently

    text = lab.inventory_path.read_text().replace(
        "  keepalive_s: 2\n", "  keepalive_s: 2\n  trust_on_first_use: true\n")
    tofu_inventory = tmp_path / "tofu.yaml"
    tofu_inventory.write_text(text)
    device = load_inventory(tofu_inventory).device("dev1")
    with SshTransport(device) as transport:
        assert transport.connection.host_key.state == "trusted-on-first-use"
    warning = [r.getMessage() for r in caplog.records if "trusted host key" in r.getMessage()]
    assert warning and transport.connection.host_key.fingerprint in warning[0]  # never silent
    recorded = lab.known_hosts_path.read_text()
    assert recorded.split()[1:3] == lines.split()[1:3]  # the same key the device really has
    with SshTransport(device) as transport:  # from now on it is simply known
        assert transport.connection.host_key.state == "known"
