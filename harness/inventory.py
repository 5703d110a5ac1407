"""The device inventory: which devices a run uses and how to reach them.

Native format (`inventory.yaml`)::

    version: 1
    defaults:                      # applied to every device, each may override
      transport: ssh               # ssh | local
      user: pi
      port: 22
      key_file: ~/.ssh/id_ed25519  # absent: ssh-agent and the default keys
      python: python3
      workdir: bnn-harness         # relative to the remote home, or absolute
      known_hosts: known_hosts     # absent: ~/.ssh/known_hosts
      trust_on_first_use: false    # true: record unknown host keys (reported, never silent)
      connect_timeout_s: 10
      connect_retries: 3
      retry_backoff_s: 1.0
      keepalive_s: 15
    devices:
      - name: pi5-a
        host: 192.168.1.20
        tags: [pi5]
        key_passphrase: ${PI_KEY_PASSPHRASE}
        meter: {type: um34c, port: /dev/rfcomm0}

An Ansible inventory (`all: hosts:` with `ansible_host`, `ansible_user`,
`ansible_port`, `ansible_ssh_private_key_file`, `ansible_python_interpreter`)
is accepted too; group names become tags and `harness_<field>` variables set
any other field. `${VAR}` in any string is replaced by the environment
variable at load; `Inventory.redacted()` gives the inventory with the
references (not the values) for the manifest. Paths are relative to the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.errors import HarnessUsageError
from harness.fleet.yaml_lines import YamlList, YamlMap, load_yaml_with_lines

TRANSPORTS = ("local", "ssh")
# Names and tags become file names and SQLite values; keep them plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# A hostname, IPv4 or bracket-less IPv6 address.
HOST_RE = re.compile(r"^[A-Za-z0-9_.:%-]{1,253}$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
# Remote paths go into shell commands (quoted); refuse anything that is not plainly a path.
REMOTE_PATH_RE = re.compile(r"^[A-Za-z0-9_./+~-]{1,255}$")
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_FIELDS = ("password", "key_passphrase")


@dataclass(frozen=True)
class Device:
    """One device of the fleet, with every setting resolved."""

    name: str
    transport: str = "ssh"
    host: str | None = None
    port: int = 22
    user: str | None = None
    key_file: Path | None = None
    python: str = "python3"
    workdir: str = "bnn-harness"
    tags: tuple[str, ...] = ()
    meter: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    connect_timeout_s: float = 10.0
    connect_retries: int = 3
    retry_backoff_s: float = 1.0
    keepalive_s: float = 15.0
    password: str | None = field(default=None, repr=False)
    key_passphrase: str | None = field(default=None, repr=False)

    @property
    def known_hosts_path(self) -> Path:
        """The known_hosts file host keys are checked against."""
        return self.known_hosts or Path("~/.ssh/known_hosts").expanduser()

    def matches(self, selector: str) -> bool:
        """True when `selector` is this device's name or one of its tags."""
        return selector == self.name or selector in self.tags


@dataclass(frozen=True)
class Inventory:
    """The devices of one inventory file, and which settings came from the environment."""

    path: Path
    devices: list[Device]
    # (device name, field) -> the `${VAR}` text it was resolved from.
    env_refs: dict[tuple[str, str], str] = field(default_factory=dict)

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise HarnessUsageError(
            f"{self.path}: no device named {name!r} (devices: "
            f"{', '.join(d.name for d in self.devices)})"
        )

    def select(self, selectors: list[str] | None) -> list[Device]:
        """Devices whose name or a tag is among `selectors` (all when empty)."""
        if not selectors:
            return list(self.devices)
        for selector in selectors:
            if not any(d.matches(selector) for d in self.devices):
                raise HarnessUsageError(
                    f"{self.path}: no device or tag named {selector!r}"
                )
        return [d for d in self.devices if any(d.matches(s) for s in selectors)]

    def redacted(self) -> dict[str, Any]:
        """The inventory as JSON-able data for the manifest; no secret value appears."""
        out = []
        for device in self.devices:
            record: dict[str, Any] = {}
            for f in fields(Device):
                value = getattr(device, f.name)
                ref = self.env_refs.get((device.name, f.name))
                if ref is not None:
                    value = ref
                elif f.name in SECRET_FIELDS and value is not None:
                    value = "<redacted>"
                elif f.name == "meter" and value is not None:
                    value = _redact_meter(device.name, dict(value), self.env_refs)
                elif isinstance(value, Path):
                    value = str(value)
                elif isinstance(value, tuple):
                    value = list(value)
                record[f.name] = value
            out.append(record)
        return {"path": str(self.path), "devices": out}


def _redact_meter(
    device: str, meter: dict[str, Any], env_refs: dict[tuple[str, str], str]
) -> dict[str, Any]:
    for key in meter:
        ref = env_refs.get((device, f"meter.{key}"))
        if ref is not None:
            meter[key] = ref
    return meter


# ---------------------------------------------------------------- loading


@dataclass
class _Source:
    """Where a raw value came from, for error messages."""

    path: Path

    def error(self, line: int, field_path: str, message: str) -> HarnessUsageError:
        return HarnessUsageError(f"{self.path}:{line}: {field_path}: {message}")


def load_inventory(path: str | Path) -> Inventory:
    """Read, resolve and validate an inventory file (native or Ansible-style YAML)."""
    path = Path(path)
    data = load_yaml_with_lines(path)
    source = _Source(path)
    if not isinstance(data, YamlMap):
        raise source.error(1, "(top level)", "expected a mapping with 'devices' or 'all'")
    if "all" in data and "devices" not in data:
        entries = _ansible_entries(data, source)
    else:
        entries = _native_entries(data, source)
    env_refs: dict[tuple[str, str], str] = {}
    devices = [_build_device(entry, source, env_refs) for entry in entries]
    if not devices:
        raise source.error(data.line, "devices", "no devices listed")
    seen: dict[str, int] = {}
    for device, entry in zip(devices, entries):
        if device.name in seen:
            raise source.error(
                entry.name_line, "name", f"duplicate device name {device.name!r} "
                f"(first on line {seen[device.name]})"
            )
        seen[device.name] = entry.name_line
    return Inventory(path=path, devices=devices, env_refs=env_refs)


@dataclass
class _Entry:
    """One device's raw settings: field -> (value, line, field path for messages)."""

    label: str  # how messages name the device's section, e.g. devices[2]
    name_line: int
    values: dict[str, tuple[Any, int, str]]


_NATIVE_TOP = {"version", "defaults", "devices"}
_DEVICE_FIELDS = {f.name for f in fields(Device)}


def _native_entries(data: YamlMap, source: _Source) -> list[_Entry]:
    for key in data:
        if key not in _NATIVE_TOP:
            raise source.error(
                data.line_of(key), str(key),
                f"unknown top-level key (expected one of {', '.join(sorted(_NATIVE_TOP))})",
            )
    version = data.get("version", 1)
    if version != 1:
        raise source.error(data.line_of("version"), "version", f"unsupported version {version!r}")
    defaults = data.get("defaults") or YamlMap()
    if not isinstance(defaults, YamlMap):
        raise source.error(data.line_of("defaults"), "defaults", "expected a mapping")
    for key in defaults:
        if key == "name" or key not in _DEVICE_FIELDS:
            raise source.error(defaults.line_of(key), f"defaults.{key}", "unknown field")
    raw_devices = data.get("devices")
    if isinstance(raw_devices, YamlMap):  # name -> settings
        items = []
        for name, settings in raw_devices.items():
            settings = YamlMap() if settings is None else settings
            if not isinstance(settings, YamlMap):
                raise source.error(
                    raw_devices.line_of(name), f"devices.{name}", "expected a mapping"
                )
            merged = YamlMap()
            merged.line = raw_devices.line_of(name)
            merged["name"] = name
            merged.key_lines["name"] = merged.line
            for key, value in settings.items():
                merged[key] = value
                merged.key_lines[key] = settings.line_of(key)
            items.append((f"devices.{name}", merged))
    elif isinstance(raw_devices, YamlList):
        items = []
        for index, settings in enumerate(raw_devices):
            if not isinstance(settings, YamlMap):
                raise source.error(
                    raw_devices.line_of(index), f"devices[{index}]", "expected a mapping"
                )
            items.append((f"devices[{index}]", settings))
    else:
        raise source.error(
            data.line_of("devices"), "devices", "expected a list of devices (or a mapping by name)"
        )
    entries = []
    for label, settings in items:
        values: dict[str, tuple[Any, int, str]] = {
            key: (value, defaults.line_of(key), f"defaults.{key}")
            for key, value in defaults.items()
        }
        for key, value in settings.items():
            if key not in _DEVICE_FIELDS:
                raise source.error(settings.line_of(key), f"{label}.{key}", "unknown field")
            values[key] = (value, settings.line_of(key), f"{label}.{key}")
        if "name" not in settings:
            raise source.error(settings.line, f"{label}.name", "missing")
        entries.append(_Entry(label, settings.line_of("name"), values))
    return entries


# Ansible variables and the Device field each sets.
_ANSIBLE_VARS = {
    "ansible_host": "host",
    "ansible_ssh_host": "host",
    "ansible_user": "user",
    "ansible_ssh_user": "user",
    "ansible_port": "port",
    "ansible_ssh_port": "port",
    "ansible_ssh_private_key_file": "key_file",
    "ansible_private_key_file": "key_file",
    "ansible_python_interpreter": "python",
    "ansible_password": "password",
    "ansible_ssh_pass": "password",
    "ansible_connection": "transport",
}
_HARNESS_PREFIX = "harness_"


def _ansible_entries(data: YamlMap, source: _Source) -> list[_Entry]:
    """Flatten Ansible groups: vars apply outer to inner, group names become tags."""
    hosts: dict[str, dict[str, tuple[Any, int, str]]] = {}
    host_lines: dict[str, int] = {}
    host_groups: dict[str, list[str]] = {}

    def walk(group: str, body: Any, inherited: dict[str, tuple[Any, int, str]], label: str) -> None:
        if body is None:
            return
        if not isinstance(body, YamlMap):
            raise source.error(getattr(body, "line", 1), label, "expected a mapping")
        scope = dict(inherited)
        group_vars = body.get("vars") or YamlMap()
        if not isinstance(group_vars, YamlMap):
            raise source.error(body.line_of("vars"), f"{label}.vars", "expected a mapping")
        for key, value in group_vars.items():
            scope[key] = (value, group_vars.line_of(key), f"{label}.vars.{key}")
        group_hosts = body.get("hosts") or YamlMap()
        if not isinstance(group_hosts, YamlMap):
            raise source.error(body.line_of("hosts"), f"{label}.hosts", "expected a mapping")
        for host, host_vars in group_hosts.items():
            merged = hosts.setdefault(str(host), {})
            for key, value in scope.items():
                merged.setdefault(key, value)
            host_lines.setdefault(str(host), group_hosts.line_of(host))
            if group != "all":
                host_groups.setdefault(str(host), []).append(group)
            if host_vars is None:
                continue
            if not isinstance(host_vars, YamlMap):
                raise source.error(
                    group_hosts.line_of(host), f"{label}.hosts.{host}", "expected a mapping"
                )
            for key, value in host_vars.items():
                merged[key] = (value, host_vars.line_of(key), f"{label}.hosts.{host}.{key}")
        children = body.get("children") or YamlMap()
        if not isinstance(children, YamlMap):
            raise source.error(body.line_of("children"), f"{label}.children", "expected a mapping")
        for child, child_body in children.items():
            walk(str(child), child_body, scope, f"{label}.children.{child}")

    walk("all", data["all"], {}, "all")
    entries = []
    for host, variables in hosts.items():
        values: dict[str, tuple[Any, int, str]] = {
            "name": (host, host_lines[host], f"hosts.{host}")
        }
        for key, (value, line, label) in variables.items():
            if key in _ANSIBLE_VARS:
                target = _ANSIBLE_VARS[key]
                if target == "transport":
                    value = "local" if value == "local" else "ssh"
                values[target] = (value, line, label)
            elif key.startswith(_HARNESS_PREFIX) and key[len(_HARNESS_PREFIX):] in _DEVICE_FIELDS:
                values[key[len(_HARNESS_PREFIX):]] = (value, line, label)
            # Other Ansible variables (become, etc.) do not concern the harness.
        values.setdefault("host", (host, host_lines[host], f"hosts.{host}"))
        groups = host_groups.get(host, [])
        if groups and "tags" not in values:
            values["tags"] = (groups, host_lines[host], f"hosts.{host}")
        entries.append(_Entry(f"hosts.{host}", host_lines[host], values))
    return entries


# ---------------------------------------------------------------- validation


def _resolve_env(
    value: Any, line: int, label: str, source: _Source
) -> tuple[Any, str | None]:
    """Replace `${VAR}` references in a string; returns (value, original text if any)."""
    if not isinstance(value, str) or "${" not in value:
        return value, None

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise source.error(line, label, f"environment variable {name} is not set")
        return os.environ[name]

    return ENV_REF_RE.sub(substitute, value), value


def _build_device(
    entry: _Entry, source: _Source, env_refs: dict[tuple[str, str], str]
) -> Device:
    resolved: dict[str, Any] = {}
    name_value = entry.values["name"][0]
    for key, (raw, line, label) in entry.values.items():
        value, ref = _resolve_env(raw, line, label, source)
        if ref is not None:
            env_refs[(str(name_value), key)] = ref
        if key == "meter" and isinstance(value, YamlMap):
            meter = {}
            for meter_key, meter_value in value.items():
                meter_value, meter_ref = _resolve_env(
                    meter_value, value.line_of(meter_key), f"{label}.{meter_key}", source
                )
                if meter_ref is not None:
                    env_refs[(str(name_value), f"meter.{meter_key}")] = meter_ref
                meter[meter_key] = meter_value
            value = meter
        resolved[key] = _check_field(key, value, line, label, source)
    transport = resolved.get("transport", "ssh")
    if transport == "ssh" and not resolved.get("host"):
        raise source.error(entry.name_line, f"{entry.label}.host",
                           "missing (required for transport ssh)")
    return Device(**resolved)


def _check_field(key: str, value: Any, line: int, label: str, source: _Source) -> Any:
    def fail(message: str) -> HarnessUsageError:
        return source.error(line, label, f"{message}, got {value!r}")

    if key == "name":
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise fail("expected a name of letters, digits, '_', '.', '-' (max 63)")
        return value
    if key == "transport":
        if value not in TRANSPORTS:
            raise fail(f"expected one of {', '.join(TRANSPORTS)}")
        return value
    if key == "host":
        if not isinstance(value, str) or not HOST_RE.match(value) or value.startswith("-"):
            raise fail("expected a host name or IP address")
        return value
    if key == "user":
        if not isinstance(value, str) or not USER_RE.match(value):
            raise fail("expected a user name of letters, digits, '_', '.', '-'")
        return value
    if key == "port":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise fail("expected a port number 1-65535")
        return value
    if key in ("key_file", "known_hosts"):
        if not isinstance(value, str) or not value:
            raise fail("expected a file path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (source.path.parent / path).resolve()
    if key in ("python", "workdir"):
        if not isinstance(value, str) or not REMOTE_PATH_RE.match(value) or value.startswith("-"):
            raise fail(
                "expected a plain path (letters, digits, '_', '.', '/', '+', '~', '-'; "
                "no spaces, quotes or shell characters)"
            )
        if ".." in Path(value).parts:
            raise fail("expected a path without '..'")
        return value
    if key == "tags":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(t, str) and NAME_RE.match(t) for t in value
        ):
            raise fail("expected a list of tags of letters, digits, '_', '.', '-'")
        return tuple(value)
    if key == "meter":
        if value is not None and not isinstance(value, Mapping):
            raise fail("expected a mapping (the meter's settings) or null")
        return dict(value) if value is not None else None
    if key == "trust_on_first_use":
        if not isinstance(value, bool):
            raise fail("expected true or false")
        return value
    if key in ("connect_timeout_s", "retry_backoff_s", "keepalive_s"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise fail("expected a non-negative number of seconds")
        return float(value)
    if key == "connect_retries":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            raise fail("expected a whole number 0-100")
        return value
    if key in SECRET_FIELDS:
        if value is not None and not isinstance(value, str):
            raise source.error(line, label, "expected a string (use ${VAR} for secrets)")
        return value
    raise source.error(line, label, "unknown field")
