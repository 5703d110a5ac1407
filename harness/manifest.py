"""The run's `manifest.json`: what ran, with which software, from which commit.

Secrets never reach it: the inventory comes through `Inventory.redacted()`
(environment references, not values), and any remaining key that looks like a
secret is replaced.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "bnn-harness",
    "numpy",
    "psutil",
    "pyyaml",
    "rich",
    "fabric",
    "paramiko",
    "pyserial",
    "pandas",
    "pyarrow",
    "torch",
)
SECRET_KEY = re.compile(r"pass(word|phrase)?|secret|token|api_?key", re.IGNORECASE)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """The project's commit and whether the tree had changes (None outside a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def redact(value: Any) -> Any:
    """Replace the value of any key that looks like a secret, at any depth."""
    if isinstance(value, dict):
        return {
            key: (
                "<redacted>"
                if SECRET_KEY.search(str(key))
                and item is not None
                and not str(item).startswith("${")
                else redact(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


def path_sha256(path: Path) -> str | None:
    """sha256 of a file, or of a directory's files (an Ansible inventory directory)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    try:
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode())
            digest.update(file.read_bytes())
    except OSError:
        return None
    return digest.hexdigest()


def build_manifest(
    run_id: str,
    argv: list[str],
    plan: Any,
    inventory: Any,
    datasets: list[dict[str, Any]],
    power: dict[str, Any],
) -> dict[str, Any]:
    inventory_record = redact(inventory.redacted())
    inventory_record["path"] = str(Path(inventory.path).resolve())  # --resume from anywhere
    inventory_record["sha256"] = path_sha256(Path(inventory.path))  # to warn if it changed
    return {
        "run_id": run_id,
        "created_host_s": time.time(),
        "argv": list(argv),
        "cwd": os.getcwd(),
        "host": {
            "hostname": platform.node(),
            "os": f"{platform.system()} {platform.release()}",
            "python_executable": sys.executable,
        },
        "plan": {
            "path": str(Path(plan.path).resolve()),
            "content": redact(dict(plan.raw)),
            "jobs": [job.job_id for job in plan.jobs],
            "idle_baseline_s": plan.idle_baseline_s,
            "cooldown_s": plan.cooldown_s,
            "max_attempts": plan.max_attempts,
        },
        "inventory": inventory_record,
        "datasets": datasets,
        "power": power,
        "versions": package_versions(),
        "git": git_commit(),
        "resumes": [],
    }
