"""Remote commands are injection-safe: hostile text is rejected or travels as data."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from fleet import idle_spec, lab_factory, requires_sshd  # noqa: F401

from harness.errors import HarnessUsageError
from harness.fleet.connection import DeviceConnection, shell_command
from harness.fleet.transport import SshTransport
from harness.inventory import load_inventory

HOSTILE = [
    "two words",
    "it's \"quoted\"",
    "a; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "x' ; touch {canary} ; echo 'y",
    "line\nbreak && touch {canary}",
]


def test_shell_command_quotes_every_word():
    argv = ["printf", "%s", "a; rm -rf / $(id) `id` 'q'"]
    assert shlex.split(shell_command(argv)) == argv
    assert shell_command(["ls"], cwd="/tmp/x y") == "cd '/tmp/x y' && ls"


@requires_sshd
def test_hostile_arguments_reach_the_device_verbatim(lab_factory, tmp_path: Path):  # noqa: F811
    lab = lab_factory(1)
    canary = tmp_path / "canary"
    device = load_inventory(lab.inventory_path).device("dev1")
    with DeviceConnection(device) as connection:
        for template in HOSTILE:
            text = template.format(canary=canary)
            result = connection.run(["printf", "%s", text], cwd=device.workdir)
            assert (result.exit_code, result.stdout) == (0, text)
    assert not canary.exists()


@requires_sshd
def test_hostile_job_options_are_data_and_hostile_job_ids_rejected(
    lab_factory, tmp_path: Path  # noqa: F811
):
    lab = lab_factory(1)
    canary = tmp_path / "canary"
    device = load_inventory(lab.inventory_path).device("dev1")
    hostile = [t.format(canary=canary) for t in HOSTILE]
    spec = idle_spec("options-as-data", 0.2)  # the host would refuse these: build it raw
    spec = replace(spec, method=replace(spec.method, optimizer=hostile[4],
                                        enable=tuple(hostile)))
    with SshTransport(device) as transport:
        transport.ensure_deployed({})
        job = transport.start_job(spec)
        events = [json.loads(line) for line in job.lines()]
        # The agent got the text as data and its validation refused it (exit 2, bad spec).
        assert job.wait(30) == 2, job.stderr_tail
        assert events[-1]["kind"] == "error" and hostile[4] in events[-1]["data"]["message"]
        written = json.loads(
            (Path(device.workdir) / "jobs" / "options-as-data" / "job.json").read_text()
        )
        assert written["method"]["enable"] == hostile
        assert written["method"]["optimizer"] == hostile[4]
        for template in HOSTILE:
            bad = replace(idle_spec("x", 0.1), job_id=template.format(canary=canary))
            with pytest.raises(HarnessUsageError, match="job_id: expected"):
                transport.start_job(bad)
    assert not canary.exists()
    assert sorted(p.name for p in (Path(device.workdir) / "jobs").iterdir()) == ["options-as-data"]
