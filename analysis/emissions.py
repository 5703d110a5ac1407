"""CodeCarbon-compatible `emissions.csv`: one row per job and meter, energy in kWh.

CodeCarbon users keep their tools (its dashboard, pandas scripts that read
`emissions.csv`): the columns are CodeCarbon's, in its order, then the harness's own.
The energy is **measured** (or *modeled*, said in `meter_kind`) for the whole board by
the device's meter over the job's window (`job` phase: first epoch to job end; the
agent's start-up and data loading are `setup_energy_kwh`, not in `energy_consumed`), the
figure of `analysis.run_energy` with its interval. CodeCarbon's split into CPU, GPU and
RAM is an estimate this harness does not make: `cpu_energy`, `ram_energy`,
`cpu_power` and `ram_power` are empty, `gpu_*` are 0 (the boards have no GPU).

`emissions` (kg CO2e) = `energy_consumed` (kWh) x the carbon intensity of the
electricity. CodeCarbon looks the intensity up by country; here it is given
(`--carbon-intensity` gCO2e/kWh, `--country` for the record). The default,
`DEFAULT_INTENSITY_G_PER_KWH` = 475 gCO2e/kWh, is the world-average carbon intensity of
electricity generation in the IEA's Global Energy & CO2 Status Report 2019 — set your
grid's figure for anything you publish.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from analysis.load import Run

DEFAULT_INTENSITY_G_PER_KWH = 475.0
J_PER_KWH = 3.6e6
# CodeCarbon's emissions.csv columns, in its order.
CODECARBON_COLUMNS = (
    "timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions",
    "emissions_rate", "cpu_power", "gpu_power", "ram_power", "cpu_energy", "gpu_energy",
    "ram_energy", "energy_consumed", "country_name", "country_iso_code", "region",
    "cloud_provider", "cloud_region", "os", "python_version", "codecarbon_version",
    "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude", "latitude",
    "ram_total_size", "tracking_mode", "on_cloud", "pue",
)
# The harness's columns after them.
EXTRA_COLUMNS = (
    "device", "job", "attempt", "method", "model", "meter", "meter_kind", "status",
    "energy_lo_kwh", "energy_hi_kwh", "setup_energy_kwh", "carbon_intensity_g_per_kwh",
)


# The energy table's figures that get a kWh twin (its interval terms stay in joules).
KWH_OF = ("energy_j", "energy_lo_j", "energy_hi_j", "above_idle_j", "above_idle_lo_j",
          "above_idle_hi_j")


def kwh(joules: Any) -> Any:
    """Joules (a number or a column) in kWh."""
    return joules / J_PER_KWH


def emissions_table(run: Run, energy: pd.DataFrame, devices: pd.DataFrame,
                    intensity_g_per_kwh: float = DEFAULT_INTENSITY_G_PER_KWH,
                    country_iso_code: str | None = None) -> pd.DataFrame:
    """`energy` (`analysis.run_energy.energy_table`) per job as CodeCarbon's rows;
    `devices` is `analysis.conditions.device_table` (its facts fill os, CPU, RAM)."""
    if not intensity_g_per_kwh >= 0:
        raise ValueError(f"carbon intensity: expected gCO2e/kWh >= 0, got {intensity_g_per_kwh}")
    kg_per_kwh = intensity_g_per_kwh / 1000.0
    facts = {str(r["device"]): r for r in devices.to_dict("records")}
    last_attempt = energy.groupby("job")["attempt"].transform("max") if not energy.empty else None
    rows = []
    if last_attempt is not None:
        current = energy[energy["attempt"] == last_attempt]
        setup = {(r["device"], r["job"], r["meter"]): r["energy_j"]
                 for r in current[current["phase"] == "setup"].to_dict("records")}
        for r in current[current["phase"].isin(["job", "idle"])].to_dict("records"):
            fact = facts.get(str(r["device"]), {})
            energy_kwh = kwh(r["energy_j"])
            emissions = energy_kwh * kg_per_kwh
            duration = r["duration_s"]
            row = {
                "timestamp": dt.datetime.fromtimestamp(r["t_end_s"], dt.timezone.utc)
                .isoformat(timespec="seconds"),
                "project_name": run.run_id,
                "run_id": r["job"],
                "experiment_id": run.run_id,
                "duration": duration,
                "emissions": emissions,
                "emissions_rate": emissions / duration if duration else 0.0,
                "cpu_power": None, "gpu_power": 0.0, "ram_power": None,
                "cpu_energy": None, "gpu_energy": 0.0, "ram_energy": None,
                "energy_consumed": energy_kwh,
                "country_name": None, "country_iso_code": country_iso_code,
                "region": None, "cloud_provider": None, "cloud_region": None,
                "os": fact.get("os"), "python_version": fact.get("python_version"),
                "codecarbon_version": None,
                "cpu_count": fact.get("cpu_cores"), "cpu_model": fact.get("cpu_model"),
                "gpu_count": 0, "gpu_model": None, "longitude": None, "latitude": None,
                "ram_total_size": (fact["total_memory_bytes"] / 2**30
                                   if fact.get("total_memory_bytes") else None),
                "tracking_mode": "machine", "on_cloud": "N", "pue": 1.0,
                "device": r["device"], "job": r["job"], "attempt": r["attempt"],
                "method": "idle" if r["phase"] == "idle" else r["method"],
                "model": r["model"], "meter": r["meter"], "meter_kind": r["meter_kind"],
                "status": r["status"], "energy_lo_kwh": kwh(r["energy_lo_j"]),
                "energy_hi_kwh": kwh(r["energy_hi_j"]),
                "setup_energy_kwh": kwh(setup[(r["device"], r["job"], r["meter"])])
                if (r["device"], r["job"], r["meter"]) in setup else None,
                "carbon_intensity_g_per_kwh": intensity_g_per_kwh,
            }
            rows.append(row)
    return pd.DataFrame(rows, columns=[*CODECARBON_COLUMNS, *EXTRA_COLUMNS])


def with_kwh(energy: pd.DataFrame) -> pd.DataFrame:
    """The tidy energy table with its energy columns also in kWh, appended after the
    documented columns (`energy_kwh` for `energy_j`, ...)."""
    out = energy.copy()
    for column in KWH_OF:
        out[column[:-2] + "_kwh"] = kwh(pd.to_numeric(out[column]))
    return out
