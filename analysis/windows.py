"""The user windows of a run (`device_agent.window` in a script): names, times and energy.

The runner stores each window as a phase `window` (its index in the job); the name
travels in the `window_end` event, read here.
"""

from __future__ import annotations

import json

import pandas as pd

from analysis.load import Run

WINDOW_COLUMNS = ("device", "job", "attempt", "window", "index", "t_start_s", "t_end_s",
                  "duration_s")


def window_names(run: Run) -> dict[tuple[str, str, int, int], str]:
    """(device, job, attempt, index) -> the window's name."""
    events = run.events[run.events["kind"] == "window_end"]
    names = {}
    for row in events.itertuples():
        try:
            data = json.loads(row.raw_json).get("data") or {}
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(data.get("name"), str) and isinstance(data.get("index"), int):
            names[(str(row.device), str(row.job_id), int(row.attempt), data["index"])] = data[
                "name"]
    return names


def name_windows(energy: pd.DataFrame, run: Run) -> pd.DataFrame:
    """The energy table with each `window` row's `window` column set to the window's name."""
    rows = energy["phase"] == "window"
    if not rows.any():
        return energy
    names = window_names(run)
    energy = energy.copy()
    energy["window"] = energy["window"].astype(object)
    for index in energy.index[rows]:
        r = energy.loc[index]
        key = (str(r["device"]), str(r["job"]), int(r["attempt"]), int(r["window"]))
        energy.at[index, "window"] = names.get(key, r["window"])
    return energy


def windows_table(run: Run) -> pd.DataFrame:
    """One row per recorded window: device, job, attempt, name, index, host times."""
    phases = run.phases[run.phases["kind"] == "window"]
    names = window_names(run)
    rows = [
        {"device": r.device, "job": r.job_id, "attempt": int(r.attempt),
         "window": names.get((str(r.device), str(r.job_id), int(r.attempt), int(r.idx))),
         "index": int(r.idx), "t_start_s": r.t_start_host_s, "t_end_s": r.t_end_host_s,
         "duration_s": r.t_end_host_s - r.t_start_host_s}
        for r in phases.itertuples()
    ]
    return pd.DataFrame(rows, columns=list(WINDOW_COLUMNS))
