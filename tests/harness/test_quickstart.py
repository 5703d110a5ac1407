"""The README's quick start: two commands, and an install that is quick and harmless to repeat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK_START = re.compile(r"## Quick start.*?```sh\n(.*?)```", re.S)


def quick_start_commands() -> list[str]:
    block = QUICK_START.search((REPO_ROOT / "README.md").read_text()).group(1)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [c for c in commands if c]


def test_the_quick_start_is_two_commands_that_need_no_python_on_path() -> None:
    install_and_run, tests = quick_start_commands()
    assert install_and_run.startswith("bash .ci/install && ")
    # A plain Debian host has python3 but no `python`: nothing may call a bare `python`.
    for command in (install_and_run, tests):
        assert not re.search(r"(^|[\s;&|])python3?\s", command), command


def test_ci_runs_the_readme_commands_not_a_copy() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "env -i" in ci
    # The commands it would run are exactly the README's.
    assert "bash .ci/quickstart-commands" in ci
    extracted = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "quickstart-commands")],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert extracted == quick_start_commands()


INSTALLED_VENV = Path(sys.prefix) / ".bnn-install-stamp"


def _installed_from() -> str | None:
    """The checkout the running venv's install stamp names (after its hash), if any."""
    try:
        return INSTALLED_VENV.read_text().split(maxsplit=1)[1].strip()
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(
    not INSTALLED_VENV.exists(), reason="not running inside a venv made by .ci/install"
)
@pytest.mark.skipif(
    _installed_from() not in (None, str(REPO_ROOT)),
    reason=f"the venv was installed from {_installed_from()}, not this checkout: installing "
           "again would point it here (a venv shared between checkouts)",
)
def test_installing_again_is_quick_and_changes_nothing() -> None:
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "BNN_VENV": sys.prefix, "LANG": "C.UTF-8"}
    stamp_before = INSTALLED_VENV.stat().st_mtime_ns
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "install")], env=env, capture_output=True, text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "(reused)" in result.stderr and "Python packages: up to date" in result.stderr
    assert INSTALLED_VENV.stat().st_mtime_ns == stamp_before
    assert elapsed < 120, f"a repeated install took {elapsed:.0f} s"
