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
      ssh_config: ~/.ssh/config    # absent: ~/.ssh/config and /etc/ssh/ssh_config
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

Any other inventory (INI or YAML, a directory, with `group_vars/` and
`host_vars/` beside it) is read by Ansible's own inventory code
(`harness.ansible_inventory`), with Ansible's variable precedence:
`ansible_host`, `ansible_user`, `ansible_port`, `ansible_ssh_private_key_file`,
`ansible_python_interpreter`, `ansible_password`, `ansible_connection` and
`ansible_ssh_common_args` (`-J`, `-o ProxyJump=`, `-F`) set the device's
fields, `harness_<field>` variables set any other field, and every group the
host is in (parent groups included) becomes a tag.

For ssh devices the SSH client configuration is honoured as OpenSSH would
(read by Fabric's SSH config support): `host` may be a `Host` alias, and its
HostName, Port, User, IdentityFile, ProxyJump and UserKnownHostsFile fill
whatever the inventory does not set itself.

`${VAR}` in any string is replaced by the environment variable at load;
`Inventory.redacted()` gives the inventory with the references (not the
values) for the manifest. Paths are relative to the file.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.ansible_inventory import Where
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
# One ProxyJump hop: [user@]host[:port]; hops are separated by commas.
JUMP_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]{0,31}@)?[A-Za-z0-9_.%-]{1,253}(:[0-9]{1,5})?$")
SECRET_FIELDS = ("password", "key_passphrase")
MAX_SECONDS = 86_400  # timeouts, back-off and keepalive periods: at most a day


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
    ssh_config: Path | None = None  # None: ~/.ssh/config and /etc/ssh/ssh_config
    ssh_alias: str | None = None  # the ssh config `Host` the host was resolved from
    proxy_jump: str | None = None  # OpenSSH ProxyJump: [user@]host[:port][,...]
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

    def redacted_meter(self, name: str) -> dict[str, Any] | None:
        """A device's meter section as recorded: `${VAR}` references, never their values."""
        meter = self.device(name).meter
        return None if meter is None else _redact_meter(name, dict(meter), self.env_refs)

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

# Where a value was set: a line of the inventory file, or (Ansible) file and line.
Location = int | Where
NATIVE_KEYS = ("version", "defaults", "devices")
YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class _Source:
    """Where a raw value came from, for error messages."""

    path: Path

    def error(self, line: Location, field_path: str, message: str) -> HarnessUsageError:
        where = str(line) if isinstance(line, Where) else f"{self.path}:{line}"
        text = f"{where}: {field_path}: {message}"
        return HarnessUsageError(text.replace("\r", "\\r").replace("\n", "\\n"))


def load_inventory(path: str | Path) -> Inventory:
    """Read, resolve and validate an inventory: the native YAML, or anything Ansible reads."""
    path = Path(path)
    source = _Source(path)
    if not path.exists():
        raise HarnessUsageError(f"{path}: cannot read: no such file or directory")
    data, yaml_error = None, None
    if path.is_file():
        try:
            data = load_yaml_with_lines(path)
        except HarnessUsageError as exc:
            if not _is_yaml_syntax_error(exc):
                raise  # too large, not text, nested too deep, alias bomb: never Ansible's
            yaml_error = exc
    if isinstance(data, YamlMap) and any(key in data for key in NATIVE_KEYS):
        entries = _native_entries(data, source)
    else:
        try:
            entries = _ansible_entries(path)
        except HarnessUsageError:
            # A file meant as YAML: its own YAML or shape error says more than Ansible's.
            if path.suffix in YAML_SUFFIXES and yaml_error is not None:
                raise yaml_error from None
            if path.suffix in YAML_SUFFIXES and not isinstance(data, YamlMap):
                raise source.error(
                    getattr(data, "line", 1) or 1, "(top level)",
                    "expected a mapping with 'devices' (or an Ansible inventory)",
                ) from None
            raise
    env_refs: dict[tuple[str, str], str] = {}
    devices = [_build_device(entry, source, env_refs) for entry in entries]
    if not devices:
        line = data.line if isinstance(data, YamlMap) else 1
        raise source.error(line, "devices", "no devices listed")
    seen: dict[str, Location] = {}
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
    """One device's raw settings: field -> (value, where, field path for messages)."""

    label: str  # how messages name the device's section, e.g. devices[2]
    name_line: Location
    values: dict[str, tuple[Any, Location, str]]
    base: Path | None = None  # what relative paths are relative to (None: the inventory's folder)


_NATIVE_TOP = set(NATIVE_KEYS)
# Set by the harness from the ssh config, never written in an inventory.
_DERIVED_FIELDS = {"ssh_alias"}
_DEVICE_FIELDS = {f.name for f in fields(Device)} - _DERIVED_FIELDS


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
# ansible_connection values: Ansible's ssh-based plugins are one ssh transport here.
_ANSIBLE_CONNECTIONS = {"ssh": "ssh", "paramiko": "ssh", "paramiko_ssh": "ssh", "smart": "ssh",
                        "local": "local"}
_SSH_ARGS_VARS = ("ansible_ssh_common_args", "ansible_ssh_extra_args")
_HARNESS_PREFIX = "harness_"


def _ansible_entries(path: Path) -> list[_Entry]:
    """Hosts of an Ansible inventory, by Ansible's own reader; groups become tags."""
    from harness.ansible_inventory import inventory_files, read_ansible_inventory

    for file in inventory_files(path):
        _check_ansible_file(file)
    entries = []
    for host in read_ansible_inventory(path, ("ansible_", _HARNESS_PREFIX)):
        label = f"host {host.name}"
        name_where = host.where
        values: dict[str, tuple[Any, Location, str]] = {
            "name": (host.name, name_where, label)
        }
        # Plain Ansible variables first, harness_<field> over them.
        for key, (value, where) in sorted(host.variables.items(),
                                         key=lambda kv: kv[0].startswith(_HARNESS_PREFIX)):
            var_label = f"{label}: {key}"
            if key in _ANSIBLE_VARS:
                target = _ANSIBLE_VARS[key]
                if target == "transport":
                    if value not in _ANSIBLE_CONNECTIONS:
                        raise HarnessUsageError(
                            f"{where}: {var_label}: the harness reaches devices over ssh or "
                            f"runs locally; expected one of "
                            f"{', '.join(sorted(_ANSIBLE_CONNECTIONS))}, got {value!r}"
                        )
                    value = _ANSIBLE_CONNECTIONS[value]
                if target == "python" and isinstance(value, str) and value.startswith("auto"):
                    continue  # Ansible's interpreter discovery: the harness default (python3)
                values[target] = (value, where, var_label)
            elif key in _SSH_ARGS_VARS:
                for target, option in _ssh_args(value, where, var_label).items():
                    values[target] = (option, where, var_label)
            elif key.startswith(_HARNESS_PREFIX):
                target = key[len(_HARNESS_PREFIX):]
                if target in _DEVICE_FIELDS and target != "name":
                    values[target] = (value, where, var_label)
            # Other Ansible variables (become, etc.) do not concern the harness.
        values.setdefault("host", (host.name, name_where, label))
        tags = list(host.groups)
        if "tags" in values:
            extra, where, var_label = values["tags"]
            extra = [extra] if isinstance(extra, str) else extra
            if isinstance(extra, list):
                tags += [t for t in extra if t not in tags]
                values["tags"] = (tags, where, var_label)
        elif tags:
            values["tags"] = (tags, name_where, f"{label}: groups")
        entries.append(_Entry(label, name_where, values, base=_base_of(values, path)))
    return entries


def _base_of(values: dict[str, tuple[Any, Location, str]], path: Path) -> Path | None:
    """Relative key files are relative to the file that names them (group_vars/x.yml too)."""
    where = values.get("key_file", (None, None, ""))[1]
    if isinstance(where, Where) and where.path and Path(where.path).is_file():
        return Path(where.path).parent
    return path if path.is_dir() else None


def _check_ansible_file(file: Path) -> None:
    """Our bounds in front of Ansible's reader: every file of the inventory (group_vars and
    host_vars too) is read through the bounded YAML loader (size, UTF-8, nesting depth,
    alias expansion); only a YAML syntax error passes, for files that are not YAML (INI)."""
    try:
        load_yaml_with_lines(file)
    except HarnessUsageError as exc:
        if not _is_yaml_syntax_error(exc) or file.suffix in YAML_SUFFIXES:
            raise


def _is_yaml_syntax_error(exc: HarnessUsageError) -> bool:
    return ": invalid YAML" in str(exc)


def _ssh_args(value: Any, where: Where, label: str) -> dict[str, str]:
    """ProxyJump and the ssh config file from `ansible_ssh_common_args` (-J, -o ProxyJump=, -F)."""
    if not isinstance(value, str):
        raise HarnessUsageError(f"{where}: {label}: expected a string of ssh options, "
                                f"got {value!r}")
    words = shlex.split(value)
    found: dict[str, str] = {}
    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        if word == "-J":
            found["proxy_jump"] = following
        elif word.startswith("-J") and len(word) > 2:
            found["proxy_jump"] = word[2:]
        elif word == "-F":
            found["ssh_config"] = following
        elif word == "-o" and following.lower().startswith("proxyjump="):
            found["proxy_jump"] = following.split("=", 1)[1]
        elif word.lower().startswith("-oproxyjump="):
            found["proxy_jump"] = word.split("=", 1)[1]
    return found


# ---------------------------------------------------------------- validation


def _resolve_env(
    value: Any, line: Location, label: str, source: _Source
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
    base = entry.base or source.path.parent
    for key, (raw, line, label) in entry.values.items():
        value, ref = _resolve_env(raw, line, label, source)
        if ref is not None:
            env_refs[(str(name_value), key)] = ref
        if key == "meter" and isinstance(value, Mapping):
            meter = {}
            for meter_key, meter_value in value.items():
                meter_line = value.line_of(meter_key) if isinstance(value, YamlMap) else line
                meter_value, meter_ref = _resolve_env(
                    meter_value, meter_line, f"{label}.{meter_key}", source
                )
                if meter_ref is not None:
                    env_refs[(str(name_value), f"meter.{meter_key}")] = meter_ref
                meter[meter_key] = meter_value
            value = meter
        resolved[key] = _check_field(key, value, line, label, source, base)
    transport = resolved.get("transport", "ssh")
    if transport == "ssh" and not resolved.get("host"):
        raise source.error(entry.name_line, f"{entry.label}.host",
                           "missing (required for transport ssh)")
    if transport == "ssh":
        _apply_ssh_config(resolved, source, base)
    return Device(**resolved)


def fabric_config(ssh_config: Path | None) -> Any:
    """Fabric's configuration with the SSH client config loaded: the given file, or
    OpenSSH's defaults (~/.ssh/config, /etc/ssh/ssh_config) when None."""
    from fabric import Config

    if ssh_config is None:
        return Config()
    return Config(runtime_ssh_path=str(ssh_config))


def _apply_ssh_config(resolved: dict[str, Any], source: _Source, base: Path) -> None:
    """Fill what the inventory left unset from the ssh config's entry for `host`, as ssh does:
    HostName, Port, User, IdentityFile, ProxyJump, UserKnownHostsFile."""
    path = resolved.get("ssh_config")
    if path is not None and not path.is_file():
        raise source.error(1, f"device {resolved['name']}: ssh_config",
                           f"no such file {str(path)!r}")
    alias = resolved["host"]
    try:
        entry = fabric_config(path).base_ssh_config.lookup(alias)
    except Exception as exc:  # paramiko's parser: bad lines, bad tokens
        raise HarnessUsageError(
            f"{path or '~/.ssh/config'}: cannot use the ssh config for {alias!r}: {exc}"
        ) from exc
    where = f"ssh config {path or '~/.ssh/config'}: Host {alias}"
    hostname = entry.get("hostname", alias)
    if hostname != alias:
        resolved["host"] = _check_field("host", hostname, 1, f"{where}: HostName", source, base)
        resolved["ssh_alias"] = alias
    if "port" not in resolved and "port" in entry:
        port = int(entry["port"]) if str(entry["port"]).isdigit() else entry["port"]
        resolved["port"] = _check_field("port", port, 1, f"{where}: Port", source, base)
    if "user" not in resolved and "user" in entry:
        resolved["user"] = _check_field("user", entry["user"], 1, f"{where}: User", source, base)
    if "key_file" not in resolved and entry.get("identityfile"):
        resolved["key_file"] = Path(entry["identityfile"][0]).expanduser()
    if "proxy_jump" not in resolved and entry.get("proxyjump", "none").lower() != "none":
        resolved["proxy_jump"] = _check_field(
            "proxy_jump", entry["proxyjump"], 1, f"{where}: ProxyJump", source, base
        )
    if "known_hosts" not in resolved and entry.get("userknownhostsfile"):
        first = entry["userknownhostsfile"].split()[0]
        resolved["known_hosts"] = Path(first).expanduser()


def _check_field(
    key: str, value: Any, line: Location, label: str, source: _Source, base: Path
) -> Any:
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
    if key in ("key_file", "known_hosts", "ssh_config"):
        if not isinstance(value, str) or not value:
            raise fail("expected a file path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    if key == "proxy_jump":
        if value is None:
            return None
        if not isinstance(value, str) or not all(JUMP_RE.match(h) for h in value.split(",")):
            raise fail("expected ProxyJump hops [user@]host[:port], separated by commas")
        return value
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
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value <= MAX_SECONDS
        ):
            raise fail(f"expected a number of seconds 0-{MAX_SECONDS}")
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
