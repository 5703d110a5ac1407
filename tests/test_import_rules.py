"""Import rules: the host never loads torch; the device side loads none of the host's stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST_STACK = ("torch", "pandas", "seaborn", "fabric", "paramiko", "rich", "yaml", "serial")


def loaded_after(imports: str) -> set[str]:
    """Top-level modules present after `imports`, in a fresh interpreter."""
    code = (
        f"import sys\n{imports}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "imports",
    [
        "import harness.cli; harness.cli.build_parser()",
        "import harness.runner, harness.store, harness.plan, harness.local, harness.clock",
        "import harness.commands.run, harness.commands.data, harness.commands.export",
        "import contract.events, contract.jobspec, contract.vocabulary",
    ],
)
def test_host_side_does_not_import_torch(imports):
    assert "torch" not in loaded_after(imports)


def test_device_protocol_and_agent_cli_import_nothing_of_the_host():
    loaded = loaded_after("import contract.events, device_agent.cli, device_agent.job")
    assert not loaded & set(HOST_STACK), loaded & set(HOST_STACK)


def test_data_prepare_works_where_torch_cannot_be_imported(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "data",
            "prepare",
            "digits",
            "--out",
            str(tmp_path),
            "--format",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{blocker}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "digits.npz").is_file()
