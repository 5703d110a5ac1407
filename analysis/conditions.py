"""What a job ran under, and what each device is: the tidy `jobs` and `devices` tables.

The agent reports each job's conditions in its `job_end` (or `error` / `interrupted`)
payload under `conditions` (`device_agent.conditions`): the low-memory implementation
that ran and why, torch threads, CPU governor and frequency, temperature and throttling
over the job, kernel and library versions, and the wait before it for the board's idle
temperature (`cooldown_*`). A job that throttled is flagged (`throttled`), and every table
that shows it carries the flag.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from analysis.load import Run

CONDITION_COLUMNS = (
    "implementation", "implementation_reason", "torch_threads", "governor", "cpu_mhz_min",
    "cpu_mhz_max", "temp_c_max", "throttled", "throttled_reason", "kernel",
    "torch_version", "numpy_version", "python_version", "cooldown_to_c", "cooldown_from_c",
    "cooldown_at_c", "cooldown_wait_s", "cooldown_reached",
)


def _json(value: Any) -> dict[str, Any]:
    if not isinstance(value, str):
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _conditions(metrics: dict[str, Any]) -> dict[str, Any]:
    cond = metrics.get("conditions")
    if not isinstance(cond, dict):
        return {col: None for col in CONDITION_COLUMNS}
    versions = cond.get("versions") if isinstance(cond.get("versions"), dict) else {}
    cooled = cond.get("cooldown") if isinstance(cond.get("cooldown"), dict) else {}
    return {
        "implementation": cond.get("implementation"),
        "implementation_reason": cond.get("implementation_reason"),
        "torch_threads": cond.get("torch_threads"),
        "governor": cond.get("governor"),
        "cpu_mhz_min": cond.get("cpu_mhz_min"),
        "cpu_mhz_max": cond.get("cpu_mhz_max"),
        "temp_c_max": cond.get("temp_c_max"),
        "throttled": cond.get("throttled"),
        "throttled_reason": cond.get("throttled_reason"),
        "kernel": cond.get("kernel"),
        "torch_version": versions.get("torch"),
        "numpy_version": versions.get("numpy"),
        "python_version": versions.get("python"),
        # the wait (in setup) for the board's idle temperature; reached False: the agent
        # gave up after the plan's maximum and the job started warmer
        "cooldown_to_c": cooled.get("to_c"),
        "cooldown_from_c": cooled.get("from_c"),
        "cooldown_at_c": cooled.get("at_c"),
        "cooldown_wait_s": cooled.get("waited_s"),
        "cooldown_reached": cooled.get("reached"),
    }


def conditions_by_job(run: Run) -> pd.DataFrame:
    """One row per job with a result: `job_id` and the condition columns."""
    rows = [{"job_id": r.job_id, **_conditions(_json(r.metrics_json))}
            for r in run.results.itertuples()]
    return pd.DataFrame(rows, columns=["job_id", *CONDITION_COLUMNS])


def job_conditions(run: Run) -> pd.DataFrame:
    """The store's jobs with `job` (its id) first and the conditions it ran under."""
    jobs = run.jobs.merge(conditions_by_job(run), on="job_id", how="left")
    jobs.insert(0, "job", jobs["job_id"])
    return jobs


def device_table(run: Run) -> pd.DataFrame:
    """The store's devices with `device` (its name) and `machine` (`platform.machine()` on
    the device, from its `hello` facts) first, then the other facts as columns."""
    devices = run.devices.copy()
    facts = [_json(f) for f in devices["facts_json"]]
    devices.insert(0, "device", devices["name"])
    devices.insert(1, "machine", [f.get("machine") for f in facts])
    for key in ("cpu_model", "cpu_cores", "total_memory_bytes", "os", "pi_model",
                "python_version", "torch_version", "emulation"):
        devices[key] = [f.get(key) for f in facts]
    return devices
