"""The inventory: defaults, overrides, secrets from the environment, Ansible, errors with lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessUsageError
from harness.exit_codes import ExitStatus
from harness.inventory import load_inventory

NATIVE = """\
version: 1
defaults:
  user: pi
  port: 22
  key_file: keys/id_ed25519
  python: /usr/bin/python3
  known_hosts: lab_known_hosts
  keepalive_s: 5
devices:
  - name: pi5-a
    host: 192.168.1.20
    tags: [pi5, shelf1]
    key_passphrase: ${BNN_TEST_PASSPHRASE}
    meter: {type: um34c, port: "${BNN_TEST_METER_PORT}"}
  - name: pi3-b
    host: pi3b.local
    port: 2222
    user: lab
    python: /home/lab/venv/bin/python
    workdir: /srv/bnn
    trust_on_first_use: true
"""


def write(tmp_path: Path, text: str, name: str = "inventory.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_apply_and_devices_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BNN_TEST_PASSPHRASE", "hunter2")
    monkeypatch.setenv("BNN_TEST_METER_PORT", "/dev/rfcomm0")
    inventory = load_inventory(write(tmp_path, NATIVE))
    a, b = inventory.devices
    assert (a.name, a.host, a.port, a.user, a.python) == (
        "pi5-a", "192.168.1.20", 22, "pi", "/usr/bin/python3")
    assert a.key_file == tmp_path / "keys" / "id_ed25519"  # relative to the inventory file
    assert a.known_hosts_path == tmp_path / "lab_known_hosts"
    assert a.tags == ("pi5", "shelf1") and a.keepalive_s == 5.0
    assert a.key_passphrase == "hunter2" and a.meter == {"type": "um34c", "port": "/dev/rfcomm0"}
    assert (b.port, b.user, b.python, b.workdir, b.trust_on_first_use) == (
        2222, "lab", "/home/lab/venv/bin/python", "/srv/bnn", True)
    assert a.trust_on_first_use is False and a.workdir == "bnn-harness"
    assert [d.name for d in inventory.select(["pi5"])] == ["pi5-a"]
    assert [d.name for d in inventory.select(["pi3-b"])] == ["pi3-b"]


def test_redacted_keeps_references_never_secret_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BNN_TEST_PASSPHRASE", "hunter2")
    monkeypatch.setenv("BNN_TEST_METER_PORT", "/dev/rfcomm0")
    text = NATIVE + "    password: plain-secret\n"
    inventory = load_inventory(write(tmp_path, text))
    redacted = json.dumps(inventory.redacted())
    assert "hunter2" not in redacted and "plain-secret" not in redacted
    assert "${BNN_TEST_PASSPHRASE}" in redacted and "${BNN_TEST_METER_PORT}" in redacted
    assert "<redacted>" in redacted
    # The file itself is never rewritten with the resolved values.
    assert "hunter2" not in (tmp_path / "inventory.yaml").read_text()


def test_missing_environment_variable_names_file_line_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("BNN_TEST_PASSPHRASE", raising=False)
    monkeypatch.setenv("BNN_TEST_METER_PORT", "/dev/rfcomm0")
    path = write(tmp_path, NATIVE)
    with pytest.raises(HarnessUsageError) as error:
        load_inventory(path)
    assert str(error.value) == (
        f"{path}:13: devices[0].key_passphrase: environment variable BNN_TEST_PASSPHRASE is not set"
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("    port: 99999", ":5: devices[0].port: expected a port number 1-65535, got 99999"),
        ("    port: abc", ":5: devices[0].port: expected a port number 1-65535, got 'abc'"),
        ("    colour: red", ":5: devices[0].colour: unknown field"),
        ("    transport: telnet", ":5: devices[0].transport: expected one of local, ssh"),
        ("    trust_on_first_use: yes please", ":5: devices[0].trust_on_first_use: expected true"),
        ("    tags: [ok, 'bad tag']", ":5: devices[0].tags: expected a list of tags"),
    ],
)
def test_bad_field_names_file_line_field_and_value(tmp_path: Path, line: str, expected: str):
    path = write(tmp_path, f"devices:\n  - name: a\n    host: h\n  # comment\n{line}\n")
    with pytest.raises(HarnessUsageError) as error:
        load_inventory(path)
    assert str(error.value).startswith(f"{path}{expected}")


def test_defaults_error_points_at_the_defaults_line(tmp_path: Path):
    path = write(tmp_path, "defaults:\n  port: 0\ndevices:\n  - name: a\n    host: h\n")
    with pytest.raises(HarnessUsageError, match=r":2: defaults.port: expected a port number"):
        load_inventory(path)


def test_structural_errors(tmp_path: Path):
    cases = {
        "devices:\n  - name: a\n    host: h\n  - name: a\n    host: g\n":
            r":4: name: duplicate device name 'a' \(first on line 2\)",
        "devices:\n  - host: h\n": r":2: devices\[0\].name: missing",
        "devices:\n  - name: a\n": r":2: devices\[0\].host: missing \(required for transport ssh\)",
        "devices: 3\n": r":1: devices: expected a list",
        "devices:\n  - name: a\n    host: h\n    host: g\n": r":4: invalid YAML: duplicate key",
        "devices: [\n": r":2: invalid YAML",
        "- a\n- b\n": r":1: \(top level\): expected a mapping",
        "version: 2\ndevices: []\n": r":1: version: unsupported version 2",
    }
    for index, (text, pattern) in enumerate(cases.items()):
        path = write(tmp_path, text, f"bad{index}.yaml")
        with pytest.raises(HarnessUsageError, match=pattern):
            load_inventory(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "pi; rm -rf ~"),
        ("name", "pi $(reboot)"),
        ("name", "it's"),
        ("workdir", "/tmp/bnn harness"),
        ("workdir", "/tmp/x;touch /tmp/pwned"),
        ("workdir", "$(touch /tmp/pwned)"),
        ("workdir", "/tmp/`id`"),
        ("workdir", "/tmp/\"quoted\""),
        ("workdir", "/srv/../etc"),
        ("python", "python3 -c 'import os'"),
        ("host", "-oProxyCommand=touch /tmp/pwned"),
        ("user", "pi;id"),
    ],
)
def test_shell_characters_are_rejected_at_load(tmp_path: Path, field: str, value: str):
    device = {"name": "a", "host": "h", field: value}
    path = write(tmp_path, json.dumps({"devices": [device]}))  # JSON is YAML
    with pytest.raises(HarnessUsageError, match=rf"devices\[0\]\.{field}: expected"):
        load_inventory(path)


ANSIBLE = """\
all:
  vars:
    ansible_user: pi
    ansible_python_interpreter: /usr/bin/python3
    harness_workdir: /srv/bnn
  hosts:
    pi-a:
      ansible_host: 10.0.0.5
      ansible_port: 2202
      ansible_ssh_private_key_file: ~/.ssh/lab_key
  children:
    pi5:
      hosts:
        pi-a:
        pi-b:
          ansible_host: 10.0.0.6
          ansible_user: lab
          harness_meter: {type: modeled}
    pi3:
      vars:
        ansible_python_interpreter: /opt/py/bin/python3
      hosts:
        pi-c: {ansible_host: pi-c.local, ansible_connection: ssh}
"""


def test_ansible_inventory(tmp_path: Path):
    inventory = load_inventory(write(tmp_path, ANSIBLE, "hosts.yml"))
    devices = {d.name: d for d in inventory.devices}
    assert set(devices) == {"pi-a", "pi-b", "pi-c"}
    a, b, c = devices["pi-a"], devices["pi-b"], devices["pi-c"]
    assert (a.host, a.port, a.user, a.python, a.workdir) == (
        "10.0.0.5", 2202, "pi", "/usr/bin/python3", "/srv/bnn")
    assert a.key_file == Path("~/.ssh/lab_key").expanduser()
    assert a.tags == ("pi5",) and b.tags == ("pi5",) and c.tags == ("pi3",)
    assert (b.host, b.user, b.meter) == ("10.0.0.6", "lab", {"type": "modeled"})
    assert (c.host, c.python) == ("pi-c.local", "/opt/py/bin/python3")


def test_ansible_errors_name_the_line(tmp_path: Path):
    text = "all:\n  hosts:\n    pi-a:\n      ansible_host: 10.0.0.5\n      ansible_port: ssh\n"
    path = write(tmp_path, text, "hosts.yml")
    pattern = r"hosts.yml:5: host pi-a: ansible_port: expected a port"
    with pytest.raises(HarnessUsageError, match=pattern):
        load_inventory(path)


def test_cli_bad_inventory_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = write(tmp_path, "devices:\n  - name: a\n    host: h\n    port: -1\n")
    assert main(["devices", "check", "--devices", str(path)]) == ExitStatus.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:4: devices[0].port: expected a port number 1-65535, got -1"]
