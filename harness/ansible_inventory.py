"""Ansible inventories read by Ansible's own inventory code (ansible-core).

Every form Ansible accepts works the way Ansible reads it: INI and YAML files,
inventory directories, `group_vars/` and `host_vars/` beside the inventory,
parent groups (`[pis:children]`), Ansible's variable precedence (all < parent
group < child group < host, `ansible_group_priority`, files in group_vars over
the inventory's inline vars) and Jinja2 templates in variables
(`"{{ inventory_hostname }}.lab"`). What comes back is, per host, the variables
the harness uses, each with where it was set (file and line, when Ansible
knows), so that a bad value is reported at its source.

Ansible is run in a child process (`python -m harness.ansible_inventory PATH PREFIX...`,
which prints the hosts as JSON): importing ansible-core patches interpreter globals
(`sys.intern`, `socket`), which breaks other libraries imported later in the same process
(torch's compiler among them). The harness process never imports it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessUsageError

# The groups every host is in; they do not become tags.
IMPLICIT_GROUPS = ("all", "ungrouped")
CHILD_TIMEOUT_S = 300.0
# Ansible's "could not parse" warnings, one per plugin that tried.
_PLUGIN_FAILURE = re.compile(r"\[WARNING\]: Failed to parse inventory with '([^']+)' plugin: (.*)")


@dataclass(frozen=True)
class Where:
    """Where a value was set: file and line when Ansible recorded them."""

    path: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


@dataclass(frozen=True)
class AnsibleHost:
    """One host of an Ansible inventory: its groups (parents included) and variables."""

    name: str
    where: Where  # the inventory file that declares it
    groups: tuple[str, ...]
    # variable -> (plain value after templating, where it was set)
    variables: dict[str, tuple[Any, Where]]


def ansible_available() -> bool:
    try:
        import ansible  # noqa: F401
    except ImportError:
        return False
    return True


def read_ansible_inventory(path: Path, wanted: tuple[str, ...]) -> list[AnsibleHost]:
    """The hosts of the inventory at `path` (file or directory), with the variables whose
    names start with one of `wanted` (e.g. `("ansible_", "harness_")`), templated; read by
    Ansible in a child process."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "harness.ansible_inventory", str(path), *wanted],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HarnessUsageError(f"{path}: reading it with Ansible failed: {exc}") from None
    try:
        answer = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = _first_line(child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "")
        raise HarnessUsageError(
            f"{path}: reading it with Ansible failed (exit {child.returncode}): {tail}"
        ) from None
    if "error" in answer:
        raise HarnessUsageError(answer["error"])
    return [
        AnsibleHost(h["name"], Where(*h["where"]), tuple(h["groups"]),
                    {k: (v, Where(*w)) for k, (v, w) in h["variables"].items()})
        for h in answer["hosts"]
    ]


def main(argv: list[str]) -> int:
    """The child: read one inventory with Ansible, print {"hosts": [...]} or {"error": ...}."""
    path, wanted = Path(argv[0]), tuple(argv[1:])
    try:
        hosts = _read_here(path, wanted)
    except HarnessUsageError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps({"hosts": [
        {"name": h.name, "where": [h.where.path, h.where.line], "groups": list(h.groups),
         "variables": {k: [v, [w.path, w.line]] for k, (v, w) in h.variables.items()}}
        for h in hosts]}))
    return 0


def _read_here(path: Path, wanted: tuple[str, ...]) -> list[AnsibleHost]:
    """Ansible's InventoryManager and VariableManager in this process (the child's)."""
    if not ansible_available():
        raise HarnessUsageError(
            f"{path}: this looks like an Ansible inventory, and reading one needs ansible-core "
            "(pip install 'bnn-harness[host]' or pip install ansible-core)"
        )
    from ansible import constants
    from ansible.errors import AnsibleError
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    # A source no plugin can read is an error here, not a warning and an empty inventory.
    constants.INVENTORY_ANY_UNPARSED_IS_FAILED = True
    loader = DataLoader()
    chatter = io.StringIO()  # Ansible's warnings: folded into our one-line error instead
    try:
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter):
            manager = InventoryManager(loader=loader, sources=[str(path)])
            variables = VariableManager(loader=loader, inventory=manager)
            hosts = []
            for host in manager.get_hosts():
                all_vars = variables.get_vars(host=host, include_hostvars=False)
                templar = Templar(loader=loader, variables=all_vars)
                picked: dict[str, tuple[Any, Where]] = {}
                for key, value in all_vars.items():
                    if isinstance(key, str) and key.startswith(wanted):
                        where = _where(value, path)
                        try:
                            rendered = templar.template(value)
                        except AnsibleError as exc:
                            raise HarnessUsageError(
                                f"{where}: host {host.name}: {key}: cannot template "
                                f"{_plain(value)!r}: {_first_line(str(exc))}"
                            ) from None
                        picked[key] = (_plain(rendered), where)
                groups = tuple(
                    g.name for g in host.get_groups() if g.name not in IMPLICIT_GROUPS
                )
                declared = Where(str(_plain(all_vars.get("inventory_file")) or path))
                hosts.append(AnsibleHost(str(host.name), declared, groups, picked))
    except AnsibleError as exc:
        reasons = [f"{m.group(1)} plugin: {m.group(2).strip()}"
                   for m in _PLUGIN_FAILURE.finditer(chatter.getvalue())]
        detail = "; ".join(reasons) or _first_line(str(exc))
        raise HarnessUsageError(
            f"{path}: not a harness inventory (YAML with 'devices:'), and Ansible could not "
            f"read it either: {detail}"
        ) from None
    return hosts


def inventory_files(path: Path) -> Iterator[Path]:
    """The files Ansible will read for `path`: the inventory (every file of a directory)
    and the group_vars/host_vars files beside it (checked for size before Ansible reads them)."""
    roots = [path] if path.is_file() else []
    base = path if path.is_dir() else path.parent
    if path.is_dir():
        roots += [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    yield from roots
    for folder in ("group_vars", "host_vars"):
        directory = base / folder
        if directory.is_dir():
            yield from (p for p in sorted(directory.rglob("*")) if p.is_file())


def _where(value: Any, path: Path) -> Where:
    """Where Ansible says `value` came from (ansible-core >= 2.19 tags values with it)."""
    try:
        from ansible._internal._datatag._tags import Origin
    except ImportError:
        return Where(str(path))
    origin = Origin.get_tag(value)
    if origin is None or not origin.path:
        return Where(str(path))
    return Where(origin.path, origin.line_num)


def _plain(value: Any) -> Any:
    """Ansible's tagged str/int/dict subclasses as plain Python values."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return str(value)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
