"""One row per training job: what it cost (memory, time, energy) and how accurate it is.

Joins the jobs the plan expanded, their results, the memory samples and the phase
energies. A job without a result, or on a device without power samples, keeps its
row with the missing figures empty and `missing` saying why.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.conditions import conditions_by_job
from analysis.load import Run

JOB_KEYS = ("device", "model", "dataset", "batch_size", "method", "seed", "repeat")


ENERGY_JOB_COLUMNS = (
    "job_id", "attempt", "meter", "meter_kind", "epochs_metered", "epochs_withheld",
    "epoch_energy_j", "epoch_energy_above_idle_j", "energy_per_epoch_j", "energy_per_epoch_lo_j",
    "energy_per_epoch_hi_j", "energy_above_idle_per_epoch_j",
    "energy_above_idle_per_epoch_lo_j", "energy_above_idle_per_epoch_hi_j", "job_energy_j",
    "job_energy_lo_j", "job_energy_hi_j", "setup_energy_j", "energy_status", "energy_reason",
)


def _epoch_energy(energy: pd.DataFrame) -> pd.DataFrame:
    """Per (job, attempt, meter): energy per epoch (mean over the epochs whose figure is not
    withheld, with the mean of their interval bounds), the job's and its setup's figures,
    and the worst status (`withheld` when no epoch has a figure) with the reasons."""
    rows = []
    for (job, attempt, meter), frame in energy.groupby(["job", "attempt", "meter"]):
        ep = frame[frame["phase"] == "epoch"]
        if ep.empty:
            continue
        have = ep[ep["status"] != "withheld"]
        job_row = frame[frame["phase"] == "job"]
        setup = frame[frame["phase"] == "setup"]
        statuses = set(ep["status"]) | set(job_row["status"])
        if "counter_mismatch" in job_row and job_row["counter_mismatch"].fillna(False).any():
            statuses.add("low_confidence")  # the meter's own counter contradicts the figure
        status = ("withheld" if have.empty else "low_confidence"
                  if statuses - {"ok"} else "ok")
        above = pd.to_numeric(have["above_idle_j"], errors="coerce")
        job_figure = job_row.iloc[0] if len(job_row) else None
        rows.append({
            "job_id": job, "attempt": int(attempt), "meter": meter,
            "meter_kind": frame["meter_kind"].iloc[0],
            "epochs_metered": len(have), "epochs_withheld": len(ep) - len(have),
            "epoch_energy_j": have["energy_j"].sum() if len(have) else np.nan,
            "epoch_energy_above_idle_j": above.sum(min_count=len(have)) if len(have) else np.nan,
            "energy_per_epoch_j": have["energy_j"].mean(),
            "energy_per_epoch_lo_j": have["energy_lo_j"].mean(),
            "energy_per_epoch_hi_j": have["energy_hi_j"].mean(),
            "energy_above_idle_per_epoch_j": above.mean(),
            "energy_above_idle_per_epoch_lo_j":
                pd.to_numeric(have["above_idle_lo_j"], errors="coerce").mean(),
            "energy_above_idle_per_epoch_hi_j":
                pd.to_numeric(have["above_idle_hi_j"], errors="coerce").mean(),
            "job_energy_j": job_figure["energy_j"] if job_figure is not None else np.nan,
            "job_energy_lo_j": job_figure["energy_lo_j"] if job_figure is not None else np.nan,
            "job_energy_hi_j": job_figure["energy_hi_j"] if job_figure is not None else np.nan,
            "setup_energy_j": setup["energy_j"].iloc[0] if len(setup) else np.nan,
            "energy_status": status,
            "energy_reason": _reasons(pd.concat([ep["reason"], job_row["reason"],
                                                 _counter_notes(job_row)])),
        })
    return pd.DataFrame(rows, columns=list(ENERGY_JOB_COLUMNS))


def _counter_notes(job_rows: pd.DataFrame) -> pd.Series:
    """A job window whose figure the meter's own counter contradicts, said as a reason."""
    if "counter_mismatch" not in job_rows:
        return pd.Series(dtype=object)
    bad = job_rows[job_rows["counter_mismatch"].fillna(False).astype(bool)]
    return pd.Series([f"the meter's own counter says {r.counter_j:.1f} J, "
                      f"{r.counter_diff_j:+.1f} J from the integrated figure"
                      for r in bad.itertuples()], dtype=object)


def _reasons(reasons: pd.Series) -> str | None:
    """The distinct reasons of a job's figures that are not ok, joined."""
    return "; ".join(sorted({r for r in reasons if isinstance(r, str)}))[:300] or None


def _memory_peaks(run: Run) -> pd.DataFrame:
    mem = run.memory
    if mem.empty:
        return pd.DataFrame(columns=["job_id", "attempt", "sampled_hwm_bytes",
                                     "sampled_peak_tensor_bytes", "memory_samples"])
    grouped = mem.groupby(["job_id", "attempt"])
    return grouped.agg(
        sampled_hwm_bytes=("hwm_bytes", "max"),
        sampled_peak_tensor_bytes=("peak_tensor_bytes", "max"),
        memory_samples=("seq", "size"),
    ).reset_index()


def job_table(run: Run, energy: pd.DataFrame) -> pd.DataFrame:
    """Training jobs with their figures; `energy` is `run_energy.energy_table(run)`."""
    jobs = run.jobs[run.jobs["kind"] == "train"].copy()
    jobs = jobs.rename(columns={"status": "job_status", "reason": "job_reason"})
    res = run.results.drop(columns=["method", "device"]).rename(columns={"status": "result_status"})
    table = jobs.merge(res, on="job_id", how="left", suffixes=("", "_result"))
    table["attempt"] = table["attempt"].fillna(table["attempts"]).fillna(1).astype(int)
    table = table.merge(_memory_peaks(run), on=["job_id", "attempt"], how="left")
    table = table.merge(conditions_by_job(run)[["job_id", "implementation", "throttled",
                                                "throttled_reason"]], on="job_id", how="left")
    table = table.merge(_epoch_energy(energy), on=["job_id", "attempt"], how="left")
    if "epochs_result" in table:
        table["epochs"] = table["epochs_result"].fillna(table["epochs"])
    steps = pd.to_numeric(table["steps"], errors="coerce")
    epochs = pd.to_numeric(table["epochs"], errors="coerce")
    batch = pd.to_numeric(table["batch_size"], errors="coerce")
    table["epoch_s"] = pd.to_numeric(table["mean_epoch_s"], errors="coerce")
    table["step_s"] = table["epoch_s"] * epochs / steps.replace(0, np.nan)
    table["samples_trained"] = steps * batch  # the last step of an epoch may be partial
    metered = pd.to_numeric(table["epochs_metered"], errors="coerce")
    per_sample = table["samples_trained"] * metered / epochs.replace(0, np.nan)
    table["energy_per_sample_j"] = table["epoch_energy_j"] / per_sample
    table["energy_above_idle_per_sample_j"] = table["epoch_energy_above_idle_j"] / per_sample
    for col in ("energy_per_sample_j", "energy_above_idle_per_sample_j"):
        per_epoch = col.replace("per_sample", "per_epoch")
        scale = table[col] / table[per_epoch].replace(0, np.nan)
        table[f"{col[:-2]}_lo_j"] = table[f"{per_epoch[:-2]}_lo_j"] * scale
        table[f"{col[:-2]}_hi_j"] = table[f"{per_epoch[:-2]}_hi_j"] * scale
    for col in ("batch_size", "seed", "repeat"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    table["missing"] = [_missing(row) for row in table.itertuples()]
    columns = [
        "job_id", *JOB_KEYS, "attempt", "job_status", "result_status", "implementation",
        "throttled", "throttled_reason", "meter", "meter_kind",
        "test_accuracy", "train_accuracy", "epochs", "steps", "epoch_s", "step_s",
        "seconds_total", "samples_trained", "peak_tensor_bytes", "peak_hwm_bytes",
        "peak_rss_delta_bytes", "sampled_hwm_bytes", "memory_samples", "epochs_metered",
        "epochs_withheld", "energy_per_epoch_j", "energy_per_epoch_lo_j",
        "energy_per_epoch_hi_j", "energy_above_idle_per_epoch_j",
        "energy_above_idle_per_epoch_lo_j", "energy_above_idle_per_epoch_hi_j",
        "energy_per_sample_j", "energy_per_sample_lo_j", "energy_per_sample_hi_j",
        "energy_above_idle_per_sample_j", "energy_above_idle_per_sample_lo_j",
        "energy_above_idle_per_sample_hi_j", "job_energy_j", "job_energy_lo_j",
        "job_energy_hi_j", "setup_energy_j", "energy_status", "energy_reason", "missing",
    ]
    return table[columns].sort_values(["device", "model", "method", "seed", "repeat"],
                                      na_position="last").reset_index(drop=True)


def _missing(row) -> str | None:
    notes = []
    if pd.isna(row.result_status):
        notes.append("no result")
    if pd.isna(row.meter):
        notes.append("no energy (no power samples or no epoch phases)")
    elif row.energy_status == "withheld":
        notes.append("energy withheld (see energy_reason)")
    elif pd.isna(row.energy_above_idle_per_epoch_j):
        notes.append("no idle baseline (energy above idle unknown)")
    if pd.isna(row.memory_samples):
        notes.append("no memory samples")
    return "; ".join(notes) or None

