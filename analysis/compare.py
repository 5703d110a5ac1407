"""Comparisons: methods against a baseline on the same device, model and data; two runs.

Every figure is a mean over repeats and seeds with a Student t confidence interval
and its n. Against the baseline method: memory as a reduction factor
(baseline / method), time and energy as a ratio (method / baseline), accuracy as a
difference (method - baseline, in accuracy units). When both methods ran the same
(seed, repeat) pairs the interval is over the paired ratios or differences;
otherwise a difference uses Welch's interval and a ratio is the ratio of the means
with no interval. An energy metric also carries each job's measurement interval (the
`*_lo_j` / `*_hi_j` columns of the job table, from `analysis.energy`): with one job it is
the figure's interval; with more, its mean half-width is added in quadrature to the
t-interval's. Jobs whose energy was withheld are left out and counted (`withheld`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

GROUP_KEYS = ("device", "meter", "meter_kind", "model", "dataset", "batch_size")
PAIR_KEYS = ("seed", "repeat")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    versus: str  # "reduction" (baseline / method), "ratio" (method / baseline), "difference"


METRICS = (
    Metric("peak_tensor_bytes", "peak tensor bytes", "reduction"),
    Metric("peak_rss_delta_bytes", "peak RSS increase bytes", "reduction"),
    Metric("peak_hwm_bytes", "peak RSS (high-water) bytes", "reduction"),
    Metric("epoch_s", "s / epoch", "ratio"),
    Metric("step_s", "s / step", "ratio"),
    Metric("energy_per_epoch_j", "J / epoch (gross)", "ratio"),
    Metric("energy_above_idle_per_epoch_j", "J / epoch (above idle)", "ratio"),
    Metric("energy_per_sample_j", "J / sample (gross)", "ratio"),
    Metric("energy_above_idle_per_sample_j", "J / sample (above idle)", "ratio"),
    Metric("test_accuracy", "test accuracy", "difference"),
)


ENERGY_PER_EPOCH = next(m for m in METRICS if m.column == "energy_per_epoch_j")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def t_interval(values: np.ndarray | pd.Series, confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student t interval; nan bounds when n < 2."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def welch_difference(a: np.ndarray, b: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) with Welch's interval; n is the smaller sample."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    diff = float(a.mean() - b.mean())
    n = int(min(a.size, b.size))
    if a.size < 2 or b.size < 2:
        return Interval(diff, math.nan, math.nan, n)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, n)
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
    return Interval(diff, diff - half, diff + half, n)


def _bounds(metric: Metric, frame: pd.DataFrame) -> tuple[str, str] | None:
    """The job table's measurement-interval columns of an energy metric, if it has them."""
    lo, hi = f"{metric.column[:-2]}_lo_j", f"{metric.column[:-2]}_hi_j"
    return (lo, hi) if metric.column.endswith("_j") and lo in frame and hi in frame else None


def with_measurement(own: Interval, frame: pd.DataFrame, metric: Metric) -> Interval:
    """The t-interval over jobs widened by the jobs' own measurement intervals."""
    bounds = _bounds(metric, frame)
    if bounds is None or own.n == 0:
        return own
    data = frame.dropna(subset=[metric.column])
    lo = pd.to_numeric(data[bounds[0]], errors="coerce")
    hi = pd.to_numeric(data[bounds[1]], errors="coerce")
    if own.n == 1:
        return Interval(own.mean, float(lo.iloc[0]), float(hi.iloc[0]), 1)
    half = float(((hi - lo) / 2).mean())
    t_half = (own.high - own.low) / 2 if not math.isnan(own.low) else 0.0
    total = math.hypot(t_half, half)
    return Interval(own.mean, own.mean - total, own.mean + total, own.n)


def _versus(metric: Metric, method: pd.DataFrame, base: pd.DataFrame) -> tuple[Interval, str]:
    col = metric.column
    bounds = _bounds(metric, method)
    if bounds is not None and len(method.dropna(subset=[col])) == 1 == len(
            base.dropna(subset=[col])):
        # one job each: the ratio's interval from the two measurement intervals (conservative:
        # the meter's accuracy class, common to both, would cancel)
        m = method.dropna(subset=[col]).iloc[0]
        b = base.dropna(subset=[col]).iloc[0]
        if b[col] and b[bounds[0]] > 0:
            return Interval(float(m[col] / b[col]), float(m[bounds[0]] / b[bounds[1]]),
                            float(m[bounds[1]] / b[bounds[0]]), 1), "measurement intervals"
    m = method.dropna(subset=[col]).set_index(list(PAIR_KEYS))[col].astype(float)
    b = base.dropna(subset=[col]).set_index(list(PAIR_KEYS))[col].astype(float)
    m = m[~m.index.duplicated()]
    b = b[~b.index.duplicated()]
    common = m.index.intersection(b.index)
    paired = len(common) > 0 and len(common) == len(m) == len(b)
    if metric.versus == "difference":
        if paired:
            return t_interval((m[common] - b[common]).to_numpy()), "paired"
        return welch_difference(m.to_numpy(), b.to_numpy()), "welch"
    num, den = (b, m) if metric.versus == "reduction" else (m, b)
    if paired:
        ratios = (num[common] / den[common]).replace([np.inf, -np.inf], np.nan)
        return t_interval(ratios.to_numpy()), "paired"
    if num.empty or den.empty or den.mean() == 0:
        return Interval(math.nan, math.nan, math.nan, 0), "none"
    n = int(min(num.size, den.size))
    return Interval(float(num.mean() / den.mean()), math.nan, math.nan, n), "ratio of means"


def compare_methods(jobs: pd.DataFrame, baseline: str = "standard") -> pd.DataFrame:
    """Long table: per group, method and metric: mean, t-interval, n, and vs the baseline."""
    done = jobs[jobs["result_status"] == "completed"]
    rows = []
    keys = [k for k in GROUP_KEYS if k in done]
    for group, frame in done.groupby(keys, dropna=False):
        group = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        base = frame[frame["method"] == baseline]
        for method, mframe in frame.groupby("method"):
            withheld = (int((mframe["energy_status"] == "withheld").sum())
                        if "energy_status" in mframe else 0)
            throttled = (int(mframe["throttled"].fillna(False).astype(bool).sum())
                         if "throttled" in mframe else 0)
            for metric in METRICS:
                own = with_measurement(t_interval(mframe[metric.column]), mframe, metric)
                if own.n == 0:
                    continue
                row = {**group, "method": method, "metric": metric.column,
                       "label": metric.label, "n": own.n, "mean": own.mean,
                       "ci_low": own.low, "ci_high": own.high, "baseline": baseline,
                       "versus": metric.versus,
                       "withheld": withheld if _bounds(metric, mframe) else 0,
                       "throttled": throttled}
                if method != baseline and not base.empty:
                    vs, how = _versus(metric, mframe, base)
                    row.update(vs_mean=vs.mean, vs_ci_low=vs.low, vs_ci_high=vs.high,
                               vs_n=vs.n, vs_how=how)
                rows.append(row)
    columns = [*keys, "method", "metric", "label", "n", "withheld", "throttled", "mean",
               "ci_low", "ci_high",
               "baseline", "versus", "vs_mean", "vs_ci_low", "vs_ci_high", "vs_n", "vs_how"]
    return pd.DataFrame(rows).reindex(columns=columns)


def _fmt(mean: float, low: float, high: float, scale: float = 1.0, digits: int = 3) -> str:
    if mean is None or pd.isna(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}g}"
    if not (pd.isna(low) or pd.isna(high)):
        text += f" [{low * scale:.{digits}g}, {high * scale:.{digits}g}]"
    return text


HEADLINE = (
    ("s / epoch", "epoch_s", "own", 1.0),
    ("J / epoch", "energy_per_epoch_j", "own", 1.0),
    ("J / epoch above idle", "energy_above_idle_per_epoch_j", "own", 1.0),
    ("mJ / sample", "energy_per_sample_j", "own", 1e3),
    ("mJ / sample above idle", "energy_above_idle_per_sample_j", "own", 1e3),
    ("test accuracy", "test_accuracy", "own", 1.0),
    ("accuracy diff", "test_accuracy", "vs", 1.0),
    ("peak tensor MiB", "peak_tensor_bytes", "own", 2.0**-20),
    ("peak RSS+ MiB", "peak_rss_delta_bytes", "own", 2.0**-20),
    ("peak RSS MiB", "peak_hwm_bytes", "own", 2.0**-20),
    ("RSS+ reduction", "peak_rss_delta_bytes", "vs", 1.0),
    ("tensor reduction", "peak_tensor_bytes", "vs", 1.0),
    ("time ratio", "epoch_s", "vs", 1.0),
    ("energy ratio", "energy_per_epoch_j", "vs", 1.0),
)


def headline(comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, method): means with [95 % t-interval] and n, as text."""
    if comparison.empty:
        return pd.DataFrame()
    keys = [k for k in GROUP_KEYS if k in comparison]
    rows = []
    for group, frame in comparison.groupby([*keys, "method"], dropna=False, sort=False):
        row = dict(zip([*keys, "method"], group))
        by_metric = frame.set_index("metric")
        row["n"] = int(frame["n"].max())
        withheld = int(frame["withheld"].max()) if "withheld" in frame else 0
        row["energy withheld"] = withheld
        throttled = int(frame["throttled"].fillna(0).max()) if "throttled" in frame else 0
        row["throttled jobs"] = throttled
        for label, metric, which, scale in HEADLINE:
            if metric not in by_metric.index:
                row[label] = "n/a"
                continue
            r = by_metric.loc[metric]
            if which == "own":
                row[label] = _fmt(r["mean"], r["ci_low"], r["ci_high"], scale)
            else:
                row[label] = _fmt(r.get("vs_mean"), r.get("vs_ci_low"), r.get("vs_ci_high"),
                                  scale)
        rows.append(row)
    return pd.DataFrame(rows)


RUN_METRICS = ("epoch_s", "energy_per_epoch_j", "energy_above_idle_per_epoch_j",
               "energy_per_sample_j", "peak_rss_delta_bytes", "peak_tensor_bytes",
               "test_accuracy")


def compare_runs(jobs_a: pd.DataFrame, jobs_b: pd.DataFrame, across: bool = False
                 ) -> pd.DataFrame:
    """Run A vs run B per (method, model, dataset, batch, device, meter): means, n, B/A or
    B-A. Only like with like: a group that one run lacks (another device or meter) has no
    ratio. `across=True` pools devices and meters instead and labels every row so."""
    keys = ["method", "model", "dataset", "batch_size"]
    if not across:
        keys += ["device", "meter"]
    rows = []
    a_done = jobs_a[jobs_a["result_status"] == "completed"]
    b_done = jobs_b[jobs_b["result_status"] == "completed"]
    groups = pd.concat([a_done[keys], b_done[keys]]).drop_duplicates()
    for group in groups.itertuples(index=False):
        sel_a = (a_done[keys] == pd.Series(group._asdict())).all(axis=1)
        sel_b = (b_done[keys] == pd.Series(group._asdict())).all(axis=1)
        for metric in RUN_METRICS:
            spec = next((m for m in METRICS if m.column == metric), None)
            ia = t_interval(a_done.loc[sel_a, metric])
            ib = t_interval(b_done.loc[sel_b, metric])
            if spec is not None:  # energy: with the jobs' measurement intervals
                ia = with_measurement(ia, a_done.loc[sel_a], spec)
                ib = with_measurement(ib, b_done.loc[sel_b], spec)
            if ia.n == 0 and ib.n == 0:
                continue
            if metric == "test_accuracy":
                vs = welch_difference(
                    pd.to_numeric(b_done.loc[sel_b, metric], errors="coerce").dropna(),
                    pd.to_numeric(a_done.loc[sel_a, metric], errors="coerce").dropna(),
                )
                versus, value, low, high = "B - A", vs.mean, vs.low, vs.high
            else:
                versus = "B / A"
                value = ib.mean / ia.mean if ia.n and ib.n and ia.mean else math.nan
                low = high = math.nan
            rows.append({**group._asdict(), "metric": metric, "n_a": ia.n, "mean_a": ia.mean,
                         "ci_a": _fmt(ia.mean, ia.low, ia.high), "n_b": ib.n,
                         "mean_b": ib.mean, "ci_b": _fmt(ib.mean, ib.low, ib.high),
                         "versus": versus, "value": value, "ci_low": low, "ci_high": high,
                         "note": "across devices and meters" if across else
                         (None if ia.n and ib.n else "only in one run (other device or meter)")})
    return pd.DataFrame(rows)


def _pairs(jobs: pd.DataFrame) -> set[tuple[str, str]]:
    done = jobs[jobs["result_status"] == "completed"].dropna(subset=["meter"])
    return set(zip(done["device"], done["meter"]))


def shared_devices_and_meters(jobs_a: pd.DataFrame, jobs_b: pd.DataFrame
                              ) -> set[tuple[str, str]]:
    """The (device, meter) pairs both runs measured completed jobs on."""
    return _pairs(jobs_a) & _pairs(jobs_b)


def run_differences(run_a, run_b, jobs_a: pd.DataFrame, jobs_b: pd.DataFrame) -> list[str]:
    """What differs between two runs, one line each: plan, devices, meters, epochs, software."""
    notes = []
    man_a, man_b = run_a.manifest or {}, run_b.manifest or {}
    plan_a = (man_a.get("plan") or {}).get("content") or {}
    plan_b = (man_b.get("plan") or {}).get("content") or {}
    for key in sorted(set(plan_a) | set(plan_b)):
        if plan_a.get(key) != plan_b.get(key):
            notes.append(f"plan: {key} differs ({_short(plan_a.get(key))} vs "
                         f"{_short(plan_b.get(key))})")
    devices_a = set(run_a.devices["name"].dropna())
    devices_b = set(run_b.devices["name"].dropna())
    if devices_a != devices_b:
        notes.append(f"devices: {sorted(devices_a)} vs {sorted(devices_b)}")
    facts_a, facts_b = _facts(run_a), _facts(run_b)
    for name in sorted(devices_a & devices_b):
        for key in ("machine", "cpu_model", "os", "torch_version", "pi_model"):
            if facts_a.get(name, {}).get(key) != facts_b.get(name, {}).get(key):
                notes.append(f"device {name}: {key} {facts_a.get(name, {}).get(key)!r} vs "
                             f"{facts_b.get(name, {}).get(key)!r}")
    meters_a, meters_b = _meters(run_a), _meters(run_b)
    if meters_a != meters_b:
        notes.append(f"meters: {_short(meters_a)} vs {_short(meters_b)}")
    epochs_a = sorted(set(pd.to_numeric(jobs_a["epochs"], errors="coerce").dropna()))
    epochs_b = sorted(set(pd.to_numeric(jobs_b["epochs"], errors="coerce").dropna()))
    if epochs_a != epochs_b:
        notes.append(f"epochs: {epochs_a} vs {epochs_b}")
    for key in ("versions", "git"):
        if man_a.get(key) != man_b.get(key):
            notes.append(f"software ({key}): {_short(man_a.get(key))} vs "
                         f"{_short(man_b.get(key))}")
    return notes


def _facts(run) -> dict[str, dict]:
    import json

    out = {}
    for name, facts in zip(run.devices["name"], run.devices["facts_json"]):
        try:
            out[name] = json.loads(facts) if isinstance(facts, str) else {}
        except ValueError:
            out[name] = {}
    return out


def _meters(run) -> dict[str, list[str]]:
    recorded = run.info.get("meters") or {}
    if recorded:
        return {d: sorted(f"{m['name']} ({m.get('kind')})" for m in ms)
                for d, ms in recorded.items()}
    return {d: [str(m)] for d, m in zip(run.devices["name"], run.devices["meter_json"])}


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
