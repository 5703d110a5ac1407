"""What a job ran under: implementation, threads, CPU governor and frequency, kernel and
library versions; with the board sampler's temperature and throttling over the job.

Reported as `conditions` in `job_start` (as the job starts) and in `job_end` / `error`
(over the whole job), so a figure records what produced it and a job that throttled is
flagged in every table (`analysis.conditions`). The engine is imported only for training
jobs, after it is loaded anyway.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from contract.jobspec import JobSpec
from device_agent.facts import _package_version

CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")
THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_mhz() -> float | None:
    """The first CPU's current frequency (cpufreq), None where the kernel has none."""
    value = _read(CPUFREQ / "scaling_cur_freq")
    try:
        return round(float(value) / 1000.0, 1) if value else None
    except ValueError:
        return None


def temperature_c(thermal: Path = THERMAL) -> float | None:
    value = _read(thermal)
    try:
        return int(value) / 1000.0 if value else None
    except ValueError:
        return None


def cool_down(to_c: float, max_s: float, thermal: Path = THERMAL, poll_s: float = 1.0,
              sleep=time.sleep) -> dict[str, Any]:
    """Wait (reading the thermal zone once a second) until the board is at most `to_c`, or
    `max_s` has passed; what happened, for `job_start`. A board without a thermal zone
    does not wait."""
    start_c = temperature_c(thermal)
    waited = 0.0
    now_c = start_c
    while now_c is not None and now_c > to_c and waited < max_s:
        sleep(poll_s)
        waited += poll_s
        now_c = temperature_c(thermal)
    return {"to_c": to_c, "from_c": start_c, "at_c": now_c, "waited_s": waited,
            "reached": now_c is not None and now_c <= to_c}


def implementation(spec: JobSpec) -> tuple[str, str]:
    """Which implementation of the method runs here, and why."""
    name = spec.method.name
    if name == "idle":
        return "none", "idle baseline"
    if name == "script":
        return "user script", "the plan's own training script"
    if name not in ("lowmem", "bop"):
        return "pytorch", "autograd (no low-memory block)"
    from trainers import native
    from trainers.lowmem_fused import runs_fused
    from trainers.methods import make_recipe

    recipe = make_recipe(name, optimizer=spec.method.optimizer, enable=spec.method.enable,
                         disable=spec.method.disable, lr=spec.method.lr,
                         momentum_format=spec.method.momentum_format)
    status = native.status()
    if not (recipe.switches.bn_sign_trick and recipe.switches.packed_masks):
        return "pytorch", "the recipe's switches keep no packed block (bn_sign_trick, packed_masks)"
    if runs_fused(recipe.switches):
        return "fused C++", status
    return "reference", status


def start_conditions(spec: JobSpec) -> dict[str, Any]:
    """The conditions as the job starts."""
    impl, why = implementation(spec)
    threads = None
    if spec.method.name != "idle":
        import torch

        threads = torch.get_num_threads()
    mhz = cpu_mhz()
    return {
        "implementation": impl,
        "implementation_reason": why,
        "torch_threads": threads,
        "governor": _read(CPUFREQ / "scaling_governor"),
        "cpu_mhz_start": mhz,
        "cpu_mhz_min": mhz,
        "cpu_mhz_max": mhz,
        "kernel": platform.release(),
        "versions": {"python": platform.python_version(), "torch": _package_version("torch"),
                     "numpy": _package_version("numpy")},
    }


def end_conditions(start: dict[str, Any], board: dict[str, Any] | None,
                   mhz_seen: list[float]) -> dict[str, Any]:
    """The start conditions with what was seen over the job: frequency range, temperature
    and throttling (from the board sampler), and the `throttled` flag."""
    seen = [m for m in [start.get("cpu_mhz_start"), *mhz_seen] if m is not None]
    board = board or {}
    reason = board.get("throttled")
    return {
        **start,
        "cpu_mhz_min": min(seen) if seen else None,
        "cpu_mhz_max": max(seen) if seen else None,
        "temp_c_max": board.get("cpu_temp_max_c"),
        "throttled": bool(reason),
        "throttled_reason": reason,
        "throttled_bits": board.get("throttled_bits"),
    }
