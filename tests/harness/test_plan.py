"""Plans: matrix expansion, stable ids, pinning, and errors that name file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.checksum import file_sha256
from contract.fields import SpecError
from contract.jobspec import FileRef, JobSpec
from harness.errors import HarnessUsageError
from harness.plan import assign_to_devices, eligible, idle_job, load_plan
from harness.recorder import Recorder
from harness.runner import Runner
from harness.store import RunStore

REPO = Path(__file__).resolve().parents[2]

MATRIX = """\
idle_baseline_s: 4
cooldown_s: 1.5
telemetry: {memory_hz: 5}
datasets:
  digits: {}
  mnist: {from: raw/mnist}
matrix:
  - methods: [standard, {name: lowmem, label: lowmem-nofp16, disable: [fp16_grads]}]
    models: [mlp]
    datasets: [digits, mnist]
    batch_sizes: [50, 100]
    seeds: [0, 1]
    repeats: 2
    epochs: 3
    devices: [pi4]
  - methods: [bop]
    models: [mlp]
    datasets: [digits]
    max_steps: 10
    epochs: null
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def test_matrix_expands_to_every_combination_with_stable_ids(tmp_path):
    plan = load_plan(write(tmp_path, MATRIX))
    assert len(plan.jobs) == 2 * 1 * 2 * 2 * 2 * 2 + 1
    ids = [job.job_id for job in plan.jobs]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "mlp-digits-standard-b50-s0-r0"
    assert "mlp-mnist-lowmem-nofp16-b100-s1-r1" in ids
    assert ids == [job.job_id for job in load_plan(write(tmp_path, MATRIX)).jobs]  # stable
    assert [job.plan_index for job in plan.jobs] == list(range(len(ids)))
    assert plan.idle_baseline_s == 4 and plan.cooldown_s == 1.5
    assert plan.datasets[1].source == tmp_path / "raw" / "mnist"
    lowmem = next(j for j in plan.jobs if "nofp16" in j.job_id)
    assert lowmem.spec["method"]["disable"] == ["fp16_grads"]
    assert lowmem.pinned == ("pi4",)
    bop = plan.jobs[-1]
    assert bop.max_steps == 10 and bop.epochs is None and bop.pinned == ()
    assert bop.spec["telemetry"]["memory_hz"] == 5
    for job in plan.jobs:  # every expanded job is a valid description, and becomes a spec
        assert JobSpec.describe(job.spec) == job.spec
        file = FileRef(f"/run/data/{job.dataset}.npz", "ab" * 32)
        assert JobSpec.from_description(job.spec, dataset=file).dataset.sha256 == "ab" * 32


@dataclass(frozen=True)
class Device:
    name: str
    tags: tuple[str, ...] = ()


def test_every_arm_runs_on_every_device_in_a_recorded_random_order(tmp_path):
    """Comparisons sound by design: each device that runs one arm runs them all, shuffled
    per device within blocks of (seed, repeat); the same seed gives the same order."""
    plan = load_plan(write(tmp_path, MATRIX))
    devices = [Device("a", ("pi4",)), Device("b", ("pi4",)), Device("c")]
    jobs = assign_to_devices(plan.jobs, devices, seed=11)
    assert jobs == assign_to_devices(plan.jobs, devices, seed=11)
    by_device = {d.name: [j for j in jobs if j.pinned == (d.name,)] for d in devices}
    pinned = [j for j in plan.jobs if j.pinned == ("pi4",)]
    for name in ("a", "b"):  # the pi4 entry's 32 arms and bop, each on both pi4 devices
        own = by_device[name]
        assert sorted(j.job_id for j in own) == sorted(
            f"{j.job_id}-on-{name}" for j in [*pinned, plan.jobs[-1]])
        assert all(j.spec["job_id"] == j.job_id for j in own)
        blocks = [(j.seed, j.repeat) for j in own]
        assert blocks == sorted(blocks)  # arms interleaved repeat by repeat
    assert [j.job_id for j in by_device["c"]] == ["mlp-digits-bop-b100-s0-r0-on-c"]
    order_a = [j.job_id.removesuffix("-on-a") for j in by_device["a"]]
    order_b = [j.job_id.removesuffix("-on-b") for j in by_device["b"]]
    assert order_a != order_b  # randomised per device
    other = assign_to_devices(plan.jobs, devices, seed=12)
    assert [j.job_id for j in other] != [j.job_id for j in jobs]
    single = assign_to_devices(plan.jobs[-1:], [Device("solo")], seed=0)
    assert [j.job_id for j in single] == ["mlp-digits-bop-b100-s0-r0"]  # one device: its id


def test_a_planned_job_has_no_checksum_until_its_spec_is_built_once(tmp_path, monkeypatch):
    """A plan names its data sets and scripts; the spec a device gets is built once, with
    the prepared file's real checksum (no made-up one in between), the device's idle
    temperature to cool to after a cooldown, and the file hashed once per run."""
    (tmp_path / "train.py").write_text("print('hi')\n")
    plan = load_plan(write(tmp_path, MATRIX + "scripts:\n  - {name: mine, path: train.py}\n"))
    job = plan.jobs[0]
    assert job.spec["dataset"] == {"name": "digits"}
    script_job = plan.jobs[-1]
    assert script_job.spec["script"] == {"name": "mine", "args": []}
    assert [(s.name, s.path) for s in plan.scripts] == [("mine", tmp_path / "train.py")]
    with pytest.raises(SpecError, match=r"dataset\.sha256"):  # a description is not a spec
        JobSpec.from_dict(job.spec)
    with pytest.raises(SpecError, match=r"dataset\.path"):  # nor a spec a description
        JobSpec.describe({**job.spec, "dataset": {"name": "digits", "path": "x"}})
    data = tmp_path / "digits.npz"
    data.write_bytes(b"not really a data set")
    sums = {data: file_sha256(data), plan.scripts[0].path: file_sha256(plan.scripts[0].path)}
    monkeypatch.setattr("harness.runner.file_sha256", lambda path: pytest.fail(f"{path} again"))
    with RunStore.create(tmp_path / "run") as store:
        runner = Runner(Recorder(store), [], [], {"digits": data}, max_attempts=1, cooldown_s=1,
                        attempts={}, log=print, checksums=sums,
                        script_files={"mine": plan.scripts[0].path})
    spec = runner.device_spec(job, idle_temp_c=45.04)
    assert spec.dataset.path == str(data) and spec.dataset.sha256 == sums[data]
    assert spec.telemetry.cool_to_c == 47.0 and spec.telemetry.cool_max_s == 120
    assert spec.on_device().dataset.path == "data/digits.npz"
    assert runner.device_spec(job).telemetry.cool_to_c is None
    script = runner.device_spec(script_job).script
    assert (script.path, script.sha256) == (str(plan.scripts[0].path), sums[plan.scripts[0].path])


def test_pinning_by_name_or_tag():
    plan_job = idle_job("pi-a", 2, {})
    assert eligible(plan_job, "pi-a", ())
    assert not eligible(plan_job, "pi-b", ("pi-a-lookalike",))
    assert JobSpec.from_dict(plan_job.spec).method.duration_s == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("matrix: []\n", r"plan.yaml:1: field 'matrix': expected a non-empty list"),
        (
            "matrix:\n  - methods: [fancy]\n    models: [mlp]\n    datasets: [digits]\n"
            "datasets: {digits: {}}\n",
            r"plan.yaml:2: field 'matrix\[0\].methods\[0\].name': unknown method 'fancy'",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n"
            "    datasets: [digits]\n    batch_sizes: [100, -3]\n",
            r"plan.yaml:6: field 'matrix\[0\].batch_sizes': expected integers >= 1, got -3",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n"
            "    datasets: [e]\n",
            r"plan.yaml:5: field 'matrix\[0\].datasets': 'e' is not in",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n"
            "    datasets: [digits]\n    epochs: two\n",
            r"plan.yaml:6: field 'matrix\[0\].epochs': expected an integer or null, got 'two'",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n"
            "    datasets: [digits]\n    colour: red\n",
            r"plan.yaml:6: field 'matrix\[0\].colour'",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard, standard]\n"
            "    models: [mlp]\n    datasets: [digits]\n",
            r"job 'mlp-digits-standard-b100-s0-r0' is also made",
        ),
        ("idle_baseline_s: -1\nmatrix: []\n", r"plan.yaml:1: field 'idle_baseline_s'"),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mpl]\n"
            "    datasets: [digits]\n",
            r"plan.yaml:4: field 'matrix\[0\].model': expected one of mlp, cnv, binarynet, "
            r"resnete18, got 'mpl'",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [{name: lowmem, disable: [fp16]}]\n"
            "    models: [mlp]\n    datasets: [digits]\n",
            r"plan.yaml:3: field 'matrix\[0\].method.disable': expected one of binary_inputs",
        ),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [{name: bop, momentum_format: '6'}]\n"
            "    models: [mlp]\n    datasets: [digits]\n",
            r"plan.yaml:3: field 'matrix\[0\].method.momentum_format': expected 'E,M' or",
        ),
        ("matrix: [\n", r"plan.yaml:2: invalid YAML"),
        ("- just a list\n", r"a plan is a mapping"),
        (
            "datasets: {digits: {}}\nmatrix:\n  - methods: [{name: lowmem, lr: -1}]\n"
            "    models: [mlp]\n    datasets: [digits]\n",
            r"field 'matrix\[0\].method.lr': expected a positive number",
        ),
    ],
)
def test_bad_plans_name_file_line_and_field(tmp_path, text, expected):
    with pytest.raises(HarnessUsageError, match=expected):
        load_plan(write(tmp_path, text))


def test_plan_show_prints_the_jobs_and_bad_plans_exit_2(tmp_path):
    path = write(tmp_path, MATRIX)
    shown = subprocess.run(
        [sys.executable, "-m", "harness", "plan", "show", str(path), "--format", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    jobs = json.loads(shown.stdout.splitlines()[-1])["jobs"]
    assert [j["job_id"] for j in jobs] == [j.job_id for j in load_plan(path).jobs]
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "plan",
            "show",
            str(REPO / "inventory" / "plan-default.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0 and "mlp-digits-lowmem-b20-s0-r0" in table.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "harness", "plan", "show", str(write(tmp_path, "matrix: 3\n"))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "field 'matrix'" in bad.stderr
