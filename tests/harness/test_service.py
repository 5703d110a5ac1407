"""The run service in-process: a whole run (this machine as the device) as `harness run`
does it, with the files' checksums counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from runs import TINY_PLAN

from contract import checksum
from harness.commands.run import packaged_file
from harness.exit_codes import ExitStatus
from harness.service import RunRequest, RunService
from runstore.reader import StoreReader


def test_a_run_hashes_each_data_file_once_and_sends_that_checksum(tmp_path, monkeypatch):
    """The prepared data set is hashed once on the host (its preparation); the manifest and
    the spec the agent ran with carry that checksum, which is the file's."""
    counted: Counter[Path] = Counter()
    real = checksum.file_sha256

    def counting(path: Path) -> str:
        counted[Path(path)] += 1
        return real(path)

    for where in ("contract.checksum", "harness.service", "harness.runner"):
        monkeypatch.setattr(f"{where}.file_sha256", counting)
    (tmp_path / "plan.yaml").write_text(TINY_PLAN)
    run_dir = tmp_path / "runs" / "r"
    request = RunRequest(run_dir, plan_path=tmp_path / "plan.yaml",
                         inventory_path=packaged_file("local.yaml"), argv=("test",))
    said: list[str] = []
    assert RunService(request, say=lambda text, **_: said.append(str(text))).run() == (
        ExitStatus.OK), said
    data = run_dir / "data" / "digits.npz"
    on_host = {path: n for path, n in counted.items() if "devices" not in path.parts}
    assert on_host == {data: 1}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["datasets"] == [{"name": "digits", "file": str(data),
                                     "sha256": real(data)}]
    reader = StoreReader(run_dir)
    (row,) = reader.query("SELECT raw_json FROM events WHERE kind = 'job_start'")
    sent = json.loads(row["raw_json"])["data"]["spec"]["dataset"]
    assert sent == {"name": "digits", "path": "data/digits.npz", "sha256": real(data)}
    (planned,) = reader.query("SELECT spec_json FROM jobs")
    assert json.loads(planned["spec_json"])["dataset"] == {"name": "digits"}
    reader.close()

