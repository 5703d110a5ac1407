"""Plan values the engine would refuse are refused on the host, at `plan show` time.

Real `harness` and `device_agent` processes; the vocabulary itself is pinned to the
engine by tests/test_vocabulary.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fleet import digits_file, training_spec  # noqa: F401

# ---------------------------------------------------------------- plans refused on the host

PLAN = """\
datasets: {{digits: {{}}}}
matrix:
  - methods: [{method}]
    models: [{model}]
    datasets: [digits]
"""


@pytest.mark.parametrize(
    ("method", "model", "expected"),
    [
        ("standard", "resnet50", "field 'matrix[0].model': expected one of mlp, cnv, binarynet"),
        ("{name: lowmem, disable: [fp16_grad]}", "mlp", "expected one of binary_inputs"),
        ("{name: bop, momentum_format: '9,4'}", "mlp", "expected exponent bits in 2..8"),
        ("{name: bop, momentum_format: '5,10,200'}", "mlp", "float32's smallest value"),
        ("{name: standard, momentum_format: '5,10'}", "mlp", "null unless the optimizer is bop"),
        ("{name: standard, optimizer: bop, lr_plateau: true}", "mlp",
         "false with the bop optimizer"),
        ("{name: cwr, optimizer: sgd}", "mlp", "nothing for method cwr"),
    ],
    ids=["model", "switch", "format-bits", "format-range", "format-optimizer", "plateau", "cwr"],
)
def test_plan_values_the_engine_refuses_are_refused_by_plan_show(tmp_path, method, model,
                                                                  expected):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.format(method=method, model=model))
    result = subprocess.run([sys.executable, "-m", "harness", "plan", "show", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_data_set_is_refused_before_a_run_directory_exists(tmp_path):
    (tmp_path / "plan.yaml").write_text(
        "datasets: {imagenet: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n"
        "    datasets: [imagenet]\n"
    )
    result = subprocess.run([sys.executable, "-m", "harness", "run", "--plan", "plan.yaml"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "imagenet" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_standard_with_bop_optimizer_runs_on_the_agent(tmp_path, digits_file):  # noqa: F811
    """It crashed on the device ('Out of range float values are not JSON compliant'):
    Bop has no learning rate, so the epoch record's lr was NaN."""
    spec = training_spec("std-bop", digits_file, max_steps=3)
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    spec["method"] = {"name": "standard", "optimizer": "bop"}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "job.json", "--out", "out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]  # strict JSON
    assert events[-1]["kind"] == "job_end"
    epoch_end = [e for e in events if e["kind"] == "epoch_end"]
    assert epoch_end and epoch_end[0]["data"]["lr"] is None
