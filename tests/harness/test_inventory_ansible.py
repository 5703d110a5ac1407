"""Existing Ansible inventories, read by Ansible's own code (ansible-core), and ~/.ssh/config.

INI and YAML inventories with group_vars/ and host_vars/, parent groups as tags, Ansible's
variable precedence (checked against `ansible-inventory --list`), templates, clear errors;
then against the sshd test fleet: a port set only in host_vars is the one used, `--only` a
parent group, and hosts named by ~/.ssh/config aliases (HostName, Port, User, IdentityFile,
ProxyJump) reached through Fabric's SSH config support.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
from fleet import harness, lab_factory, requires_sshd  # noqa: F401

from harness.errors import HarnessUsageError
from harness.fleet.connection import DeviceConnection
from harness.fleet.errors import HostKeyRejected
from harness.inventory import load_inventory

if importlib.util.find_spec("ansible") is None:  # found, not imported (see below)
    pytest.skip("ansible-core is not installed (pip install ansible-core)",
                allow_module_level=True)
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"
USER = pwd.getpwuid(os.geteuid()).pw_name

INI = """\
[pi5]
pi-a ansible_host=10.0.0.5 ansible_port=2201
pi-b ansible_host=10.0.0.6

[pi4]
pi-c ansible_host="{{ inventory_hostname }}.lab"

[pis:children]
pi5
pi4

[pis:vars]
ansible_user=pi
ansible_port=2200
"""


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def ansible_list(inventory: Path) -> dict:
    """What Ansible's own CLI says the hosts' variables are."""
    result = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(inventory), "--list"],
                            capture_output=True, text=True, check=True, timeout=120)
    return json.loads(result.stdout)["_meta"]["hostvars"]


def test_ini_with_group_vars_host_vars_and_parent_groups(tmp_path: Path):
    write_tree(tmp_path, {
        "hosts.ini": INI,
        "group_vars/all.yml": "ansible_python_interpreter: /usr/bin/python3\n"
                              "harness_workdir: /srv/bnn\n",
        "group_vars/pis.yml": "ansible_user: lab\n",  # a group_vars file beats inline vars
        "group_vars/pi4.yml": "ansible_port: 2222\nharness_meter: {type: um34c, port: /dev/x}\n",
        "host_vars/pi-b.yml": "ansible_port: 2999\nharness_tags: [shelf1]\n",
    })
    inventory = load_inventory(tmp_path / "hosts.ini")
    devices = {d.name: d for d in inventory.devices}
    a, b, c = devices["pi-a"], devices["pi-b"], devices["pi-c"]
    # Ansible's precedence: inline host var > child group > parent group; host_vars over all.
    assert (a.host, a.port, a.user) == ("10.0.0.5", 2201, "lab")
    assert (b.host, b.port) == ("10.0.0.6", 2999)
    assert (c.host, c.port, c.meter) == ("pi-c.lab", 2222, {"type": "um34c", "port": "/dev/x"})
    assert {d.python for d in devices.values()} == {"/usr/bin/python3"}
    assert {d.workdir for d in devices.values()} == {"/srv/bnn"}
    # Groups and their parents become tags; harness_tags adds to them.
    assert set(a.tags) == {"pi5", "pis"} and set(b.tags) == {"pi5", "pis", "shelf1"}
    assert set(c.tags) == {"pi4", "pis"}
    assert [d.name for d in inventory.select(["pis"])] == ["pi-a", "pi-b", "pi-c"]
    assert [d.name for d in inventory.select(["pi4"])] == ["pi-c"]
    assert [d.name for d in inventory.select(["shelf1"])] == ["pi-b"]
    # Ansible ran in a child process: its patches of interpreter globals (sys.intern) never
    # reach this one, where torch may be imported later.
    assert "ansible" not in sys.modules
    # The same values Ansible's own command line resolves.
    expected = ansible_list(tmp_path / "hosts.ini")
    for name, device in devices.items():
        assert device.port == expected[name]["ansible_port"]
        assert device.user == expected[name]["ansible_user"]


def test_yaml_inventory_directory_with_children(tmp_path: Path):
    inventory_dir = tmp_path / "inventory"
    write_tree(inventory_dir, {
        "10-lab.yml": "all:\n  children:\n    pis:\n      children:\n        pi5:\n"
                      "          hosts:\n            pi-a: {ansible_host: 10.0.0.5}\n",
        "20-more.ini": "[pi3]\npi-z ansible_host=10.0.0.9\n[pis:children]\npi3\n",
        "group_vars/pis.yml": "ansible_port: 2022\n",
    })
    devices = {d.name: d for d in load_inventory(inventory_dir).devices}
    assert set(devices) == {"pi-a", "pi-z"}
    assert devices["pi-a"].port == devices["pi-z"].port == 2022
    assert set(devices["pi-z"].tags) == {"pi3", "pis"}


def test_errors_name_the_file_the_line_and_ansibles_reason(tmp_path: Path):
    write_tree(tmp_path, {"bad.ini": "[pis:children\npi5\n"})
    with pytest.raises(HarnessUsageError) as error:
        load_inventory(tmp_path / "bad.ini")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.ini'}: not a harness inventory")
    assert "ini plugin" in message and "\n" not in message
    write_tree(tmp_path, {
        "hosts.ini": "[pi4]\npi-c ansible_host=10.0.0.7\n",
        "group_vars/pi4.yml": "# the port\nansible_port: ssh\n",
    })
    with pytest.raises(HarnessUsageError) as error:
        load_inventory(tmp_path / "hosts.ini")
    assert str(error.value) == (
        f"{tmp_path / 'group_vars' / 'pi4.yml'}:2: host pi-c: ansible_port: "
        "expected a port number 1-65535, got 'ssh'"
    )
    write_tree(tmp_path, {"winrm.ini": "[w]\nbox ansible_connection=winrm\n"})
    with pytest.raises(HarnessUsageError, match=r"winrm.ini:2: host box: ansible_connection: "
                                                r"the harness reaches devices over ssh"):
        load_inventory(tmp_path / "winrm.ini")
    # Our bounds stand in front of Ansible's reader (group_vars files too).
    write_tree(tmp_path, {"group_vars/pi4.yml": "x: " + "a" * (1 << 20) + "\n"})
    with pytest.raises(HarnessUsageError, match=r"pi4.yml: larger than 1024 KiB"):
        load_inventory(tmp_path / "hosts.ini")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg"))
    write_tree(tmp_path, {"group_vars/pi4.yml": bomb, "host_vars/pi-c": bomb})
    with pytest.raises(HarnessUsageError, match=r"once aliases \(\*name\) are expanded"):
        load_inventory(tmp_path / "hosts.ini")  # refused before Ansible expands it
    (tmp_path / "group_vars" / "pi4.yml").unlink()
    with pytest.raises(HarnessUsageError, match=r"pi-c:\d+: more than 100000 values"):
        load_inventory(tmp_path / "hosts.ini")  # a host_vars file without a suffix too
    (tmp_path / "plain").write_text(bomb)
    with pytest.raises(HarnessUsageError, match=r"once aliases"):
        load_inventory(tmp_path / "plain")  # an inventory file without a suffix


def test_ssh_common_args_give_proxy_jump_and_ssh_config(tmp_path: Path):
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host bastion\n  HostName 10.0.0.1\n")
    write_tree(tmp_path, {
        "hosts.ini": "[pis]\npi-a ansible_host=10.0.0.5\n[pis:vars]\n"
                     f"ansible_ssh_common_args='-F {ssh_config} -o ProxyJump=pi@bastion:2200'\n",
    })
    (device,) = load_inventory(tmp_path / "hosts.ini").devices
    assert (device.proxy_jump, device.ssh_config) == ("pi@bastion:2200", ssh_config)


# ---------------------------------------------------------------- against the sshd fleet


def lab_ini(lab, directory: Path) -> Path:
    """The lab as an Ansible INI inventory; each device's port only in its host_vars file."""
    dev1, dev2 = lab.devices
    write_tree(directory, {
        "hosts.ini": "[pi5]\ndev1\n\n[pi4]\ndev2 ansible_port=1\n\n"
                     "[pis:children]\npi5\npi4\n\n[pis:vars]\nansible_host=127.0.0.1\n",
        "group_vars/all.yml": (
            f"ansible_user: {USER}\n"
            f"ansible_ssh_private_key_file: {lab.user_key}\n"
            f"ansible_python_interpreter: {sys.executable}\n"
            f"harness_known_hosts: {lab.known_hosts_path}\n"
            "harness_connect_retries: 0\n"
        ),
        "group_vars/pis.yml": "ansible_port: 1\n",  # wrong on purpose: host_vars must win
        "host_vars/dev1.yml": f"ansible_port: {dev1.port}\nharness_workdir: {dev1.workdir}\n",
        "host_vars/dev2.yml": f"ansible_port: {dev2.port}\nharness_workdir: {dev2.workdir}\n",
    })
    return directory / "hosts.ini"


@requires_sshd
def test_ini_inventory_against_the_fleet(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(2)
    inventory = lab_ini(lab, tmp_path / "ansible")
    result = harness("devices", "check", "--devices", str(inventory), "--only", "pis",
                     "--format", "json", timeout=240)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout.splitlines()[-1])["devices"]}
    assert set(rows) == {"dev1", "dev2"}
    for name, row in rows.items():
        port = lab.device(name).port
        assert row["usable"] and row["host_key"] == "known", row
        assert row["address"].endswith(f"@127.0.0.1:{port}")
    result = harness("devices", "check", "--devices", str(inventory), "--only", "pi4",
                     "--format", "json", timeout=240)
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in json.loads(result.stdout.splitlines()[-1])["devices"]] == ["dev2"]
    result = harness("devices", "check", "--devices", str(inventory), "--only", "nope")
    assert result.returncode == 2 and "no device or tag named 'nope'" in result.stderr


def ssh_config_for(lab, path: Path) -> Path:
    dev1, dev2 = lab.devices
    path.write_text(
        f"Host lab-jump\n  HostName 127.0.0.1\n  Port {dev1.port}\n  User {USER}\n"
        f"  IdentityFile {lab.user_key}\n"
        f"Host lab-target\n  HostName 127.0.0.1\n  Port {dev2.port}\n  User {USER}\n"
        f"  IdentityFile {lab.user_key}\n  ProxyJump lab-jump\n"
        f"Host lab-direct\n  HostName 127.0.0.1\n  Port {dev1.port}\n  User {USER}\n"
        f"  IdentityFile {lab.user_key}\n  UserKnownHostsFile {lab.known_hosts_path}\n"
    )
    return path


@requires_sshd
def test_ssh_config_aliases_and_proxy_jump_through_fabric(
    lab_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
):
    lab = lab_factory(2)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    ssh_config_for(lab, home / ".ssh" / "config")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[pis]\nlab-direct\nlab-target\n[pis:vars]\n"
        f"ansible_python_interpreter={sys.executable}\nharness_connect_retries=0\n"
        f"harness_known_hosts={lab.known_hosts_path}\n"
    )
    # Nothing in the inventory says where the devices are: ~/.ssh/config does (HOME=home).
    result = harness("devices", "check", "--devices", str(inventory), "--format", "json",
                     env={**os.environ, "HOME": str(home)}, timeout=240)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout.splitlines()[-1])["devices"]}
    assert rows["lab-direct"]["address"] == f"{USER}@127.0.0.1:{lab.devices[0].port}"
    assert rows["lab-target"]["address"] == f"{USER}@127.0.0.1:{lab.devices[1].port}"
    assert all(r["usable"] for r in rows.values()), rows

    # In process: the target's SSH transport runs inside a channel of the jump host's.
    monkeypatch.setenv("HOME", str(home))
    devices = {d.name: d for d in load_inventory(inventory).devices}
    target = devices["lab-target"]
    assert (target.ssh_alias, target.proxy_jump, target.key_file) == (
        "lab-target", "lab-jump", lab.user_key)
    assert devices["lab-direct"].known_hosts == lab.known_hosts_path  # UserKnownHostsFile
    with DeviceConnection(target) as connection:
        transport = connection.fabric.transport
        assert isinstance(transport.sock, paramiko.Channel)  # tunnelled, not a TCP socket
        assert connection.fabric.gateway.transport.getpeername()[1] == lab.devices[0].port
        assert connection.run(["echo", "through the jump"]).stdout.strip() == "through the jump"


@requires_sshd
def test_jump_host_key_is_verified_too(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(2)
    config = ssh_config_for(lab, tmp_path / "ssh_config")
    known = [line for line in lab.known_hosts_path.read_text().splitlines()
             if f":{lab.devices[0].port} " not in line]  # forget the jump host's key
    (tmp_path / "known_hosts").write_text("\n".join(known) + "\n")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        f"devices:\n  - name: target\n    host: lab-target\n    ssh_config: {config}\n"
        f"    known_hosts: {tmp_path / 'known_hosts'}\n    connect_retries: 0\n"
    )
    (device,) = load_inventory(inventory).devices
    with pytest.raises(HostKeyRejected, match=r"target \(jump host lab-jump\): host key of "
                                              rf"\[127.0.0.1\]:{lab.devices[0].port}"):
        DeviceConnection(device).open()
