"""`harness lab up/down`: real sshd devices that a user can point the harness at."""

from __future__ import annotations

import os
from pathlib import Path

from fleet import harness, requires_sshd

from harness.inventory import load_inventory
from harness.lab import Lab


def running(pid: int) -> bool:
    """True for a live process (a killed daemon may linger as a zombie of pid 1)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@requires_sshd
def test_lab_up_writes_inventory_and_down_stops_every_sshd(tmp_path: Path):
    lab_dir = tmp_path / "lab"
    up = harness("lab", "up", "--devices", "3", "--dir", str(lab_dir))
    assert up.returncode == 0, up.stderr
    inventory_path = Path(up.stdout.strip().splitlines()[-1])
    assert inventory_path == lab_dir / "inventory.yaml"
    lab = Lab(lab_dir)
    try:
        devices = load_inventory(inventory_path).devices
        assert [d.name for d in devices] == ["dev1", "dev2", "dev3"]
        assert len({d.port for d in devices}) == 3 and {d.host for d in devices} == {"127.0.0.1"}
        host_keys = {(lab_dir / "devices" / d.name / "ssh_host_ed25519_key.pub").read_text()
                     for d in devices}
        assert len(host_keys) == 3  # each device its own host key
        assert len(lab.known_hosts_path.read_text().splitlines()) == 3
        pids = [lab.sshd_pid(d.name) for d in devices]
        assert all(pid and running(pid) for pid in pids)
        again = harness("lab", "up", "--dir", str(lab_dir))
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = harness("lab", "down", "--dir", str(lab_dir))
    assert down.returncode == 0
    assert not any(running(pid) for pid in pids)
    assert Lab(lab_dir).devices == []
    assert os.path.exists(inventory_path)  # files stay for inspection
