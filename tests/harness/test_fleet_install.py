"""`devices setup --install`: what it would run on a device, from the device's probe."""

from __future__ import annotations

import pytest

from harness.fleet.errors import DeviceNotReady
from harness.fleet.install import AARCH64_CPU_TORCH, plan_install, preflight
from harness.fleet.probe import DeviceProbe

GIB = 1 << 30


def probe(**overrides) -> DeviceProbe:
    fields = dict(python="3.11.2", executable="/usr/bin/python3",
                  modules={"torch": None, "psutil": None, "numpy": "1.24.2"},
                  device_agent_path=None, mem_available_bytes=3 * GIB,
                  disk_free_bytes=20 * GIB, cpu_temp_c=48.0, throttled="0x0", cxx="/usr/bin/c++",
                  ninja=False, machine="aarch64", in_venv=False, externally_managed=True,
                  python_dev=True, gpu=False)
    fields.update(overrides)
    return DeviceProbe(**fields)


def test_a_pi_gets_a_venv_and_the_cpu_build_of_torch():
    plan = plan_install(probe(), "/home/pi/bnn")
    assert plan.venv == "/home/pi/bnn/venv" and plan.python == "/home/pi/bnn/venv/bin/python"
    argvs = [argv for _, argv in plan.steps]
    assert argvs[0] == ["/usr/bin/python3", "-m", "venv", "--system-site-packages",
                        "/home/pi/bnn/venv"]
    assert argvs[1][-1] == AARCH64_CPU_TORCH == "torch>=2.1,<2.11"
    assert argvs[2][-3:] == ["psutil", "numpy", "ninja"]
    assert all(argv[0] == plan.python for argv in argvs[1:])
    assert plan.disk_needed_bytes == 2 * GIB


def test_a_venv_python_installs_in_place_and_only_what_lacks():
    plan = plan_install(probe(executable="/home/pi/v/bin/python", in_venv=True,
                              externally_managed=False, ninja=True,
                              modules={"torch": "2.10.0+cpu", "psutil": None, "numpy": "2"}),
                        "/w")
    assert plan.venv is None and [argv[-1] for _, argv in plan.steps] == ["psutil"]


def test_x86_without_a_gpu_needs_a_cpu_index():
    with pytest.raises(DeviceNotReady, match="--torch-index"):
        plan_install(probe(machine="x86_64"), "/w")
    plan = plan_install(probe(machine="x86_64"), "/w", torch_index="http://wheels.lan/cpu")
    assert plan.steps[1][1][-3:] == ["--index-url", "http://wheels.lan/cpu", "torch"]


def test_a_cuda_torch_on_a_gpu_less_pi_is_flagged_and_replaced():
    cuda = probe(modules={"torch": "2.13.0", "psutil": "7", "numpy": "2"}, in_venv=True,
                 externally_managed=False, ninja=True, torch_cuda="CUDA (nvidia packages "
                 "required)", cuda_packages_bytes=3 * GIB)
    assert "CUDA build" in cuda.warnings[0] and "3.0 GiB" in cuda.warnings[0]
    plan = plan_install(cuda, "/w", replace_cuda_torch=True)
    whats = [what for what, _ in plan.steps]
    assert whats[0] == "remove torch's CUDA packages"
    assert plan.steps[1][1][-3:] == ["--force-reinstall", "--no-deps", AARCH64_CPU_TORCH]
    assert plan_install(cuda, "/w").steps == []  # not asked: nothing replaced


def test_missing_python3_dev_is_a_warning_and_blocks_the_kernels():
    bare = probe(python_dev=False, ninja=True)
    assert any("python3-dev" in w for w in bare.warnings)
    assert bare.fused_kernels == "reference path (missing: python3-dev)"


def test_short_disk_or_memory_refuses_before_pip_runs():
    plan = plan_install(probe(), "/w")
    with pytest.raises(DeviceNotReady, match=r"1\.0 GiB free .* needs about 2\.0 GiB"):
        preflight(probe(disk_free_bytes=GIB), plan, "pi4-a")
    with pytest.raises(DeviceNotReady, match="200 MiB of memory available"):
        preflight(probe(mem_available_bytes=200 << 20), plan, "pi4-a")
    preflight(probe(), plan, "pi4-a")


def test_the_probe_reads_a_cuda_build_from_torchs_version_file(tmp_path):
    """torch/version.py says `cuda = '13.0'` in a CUDA build and None in a CPU one (the
    metadata's nvidia requirements carry platform markers, so they cannot tell)."""
    import os
    import subprocess
    import sys

    from harness.fleet.probe import parse_probe, probe_argv

    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("cuda: Optional[str] = '13.0'\nhip = None\n")
    result = subprocess.run(probe_argv(sys.executable, str(tmp_path)), capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    found = parse_probe(result.stdout)
    assert found.torch_cuda == "cuda 13.0"
    if found.modules.get("torch") and not found.gpu:
        assert "is a CUDA build (cuda 13.0)" in found.warnings[0]
    (fake / "version.py").write_text("cuda: Optional[str] = None\n")
    result = subprocess.run(probe_argv(sys.executable, str(tmp_path)), capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert parse_probe(result.stdout).torch_cuda is None
