"""Deployment: the device-side code and prepared data sets, copied only when changed.

The device's work directory is laid out as `contract.layout` says (code/, data/, jobs/).
One remote command reports the sha256 of every file that should be there
(and makes the directories); only missing or different files are sent, each
to a temporary name and then renamed, so a half-copied file is never used.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from contract.checksum import file_sha256
from contract.layout import CODE_DIR, DEVICE_PACKAGES, device_data_path
from harness.fleet.connection import DeviceConnection
from harness.fleet.errors import DeviceNotReady

# Runs on the device with the device's Python: stdin is a JSON list of relative paths.
_CHECKSUM_SCRIPT = """
import hashlib, json, os, sys
out = {}
for rel in json.load(sys.stdin):
    os.makedirs(os.path.dirname(rel) or ".", exist_ok=True)
    try:
        digest = hashlib.sha256()
        with open(rel, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out[rel] = digest.hexdigest()
    except OSError:
        out[rel] = None
json.dump(out, sys.stdout)
"""

@dataclass(frozen=True)
class FileToDeploy:
    local: Path
    remote: str  # relative to the work directory, POSIX
    sha256: str


@dataclass
class DeployReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name} not found on the host")
    return Path(next(iter(spec.submodule_search_locations)))


def code_files() -> list[FileToDeploy]:
    """Every file of the device packages (sources and package data), no caches."""
    files = []
    for package in DEVICE_PACKAGES:
        root = _package_dir(package)
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(root.parent).as_posix()
            files.append(FileToDeploy(path, f"{CODE_DIR}/{rel}", file_sha256(path)))
    return files


def dataset_files(datasets: dict[Path, str]) -> list[FileToDeploy]:
    """The data set (and script) files to deploy, by the checksums the host computed once."""
    return [FileToDeploy(p, device_data_path(p), sha) for p, sha in datasets.items()]


def remote_python_env(workdir: str) -> list[str]:
    """The `env` prefix that makes the deployed code importable."""
    return ["env", f"PYTHONPATH={posixpath.join(workdir, CODE_DIR)}", "PYTHONUNBUFFERED=1"]


def sync_files(
    connection: DeviceConnection, python: str, workdir: str, files: list[FileToDeploy]
) -> DeployReport:
    """Copy what is missing or changed; leave what matches by checksum."""
    report = DeployReport()
    connection.run(["mkdir", "-p", workdir], timeout_s=30)
    listing = connection.run(
        [python, "-c", _CHECKSUM_SCRIPT],
        cwd=workdir,
        stdin=json.dumps([f.remote for f in files]).encode(),
        timeout_s=120,
    )
    if listing.exit_code != 0:
        raise DeviceNotReady(
            f"device {connection.device.name}: cannot run {python} in {workdir}: "
            f"{listing.stderr.strip()[-300:]}"
        )
    remote_sums = json.loads(listing.stdout)
    for item in files:
        if remote_sums.get(item.remote) == item.sha256:
            report.skipped.append(item.remote)
            continue
        target = posixpath.join(workdir, item.remote)
        temporary = f"{target}.partial"
        connection.put_file(item.local, temporary, final=target)
        report.copied.append(item.remote)
    return report


