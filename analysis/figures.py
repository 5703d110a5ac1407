"""The run's figures (matplotlib + seaborn, Agg backend): each function returns a Figure.

A figure whose data is absent is still drawn, with a note saying what is missing,
so that a report or notebook of a broken run shows the hole instead of failing.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis.load import Run

MIB = 2**20
MAX_PLOTTED_POINTS = 200_000
PHASE_COLOURS = {"idle": "#bbbbbb", "epoch": None, "eval": "#ffd27f"}


def _empty(ax: plt.Axes, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def power_trace(run: Run, device: str, meter: str | None = None,
                t_range_s: tuple[float, float] | None = None) -> Figure:
    """Power over time (seconds from the trace's start) with idle/epoch bands and gaps."""
    fig, ax = plt.subplots(figsize=(11, 3.6), layout="constrained")
    trace = run.trace(device, meter)
    if trace is None or trace.t_host_s.size == 0:
        _empty(ax, f"device {device}: no power samples (no meter)")
        ax.set_title(f"power trace — {device}")
        return fig
    t0 = float(trace.t_host_s[0])
    t = trace.t_host_s - t0
    p = trace.power_w
    if t_range_s is not None:
        keep = (t >= t_range_s[0]) & (t <= t_range_s[1])
        t, p = t[keep], p[keep]
    stride = max(1, t.size // MAX_PLOTTED_POINTS)
    ax.plot(t[::stride], p[::stride], lw=0.7, color="#1f4e79", label=trace.meter)
    methods = run.jobs.set_index("job_id")["method"].to_dict()
    palette = dict(zip(sorted({m for m in methods.values() if m}),
                       sns.color_palette("pastel", 10)))
    phases = run.phases[(run.phases["device"] == device)
                        & run.phases["kind"].isin(["idle", "epoch", "eval"])]
    seen: set[str] = set()
    for r in phases.itertuples():
        label = "idle" if r.kind == "idle" else str(methods.get(r.job_id, r.kind))
        if r.kind == "eval":
            label = "eval"
        colour = PHASE_COLOURS.get(r.kind) or palette.get(label, "#dddddd")
        ax.axvspan(r.t_start_host_s - t0, r.t_end_host_s - t0, color=colour, alpha=0.45, lw=0,
                   label=None if label in seen else label)
        seen.add(label)
    gaps = run.gaps[(run.gaps["device"] == device) & (run.gaps["meter"] == trace.meter)]
    for i, r in enumerate(gaps.itertuples()):
        end = r.t_end_s if pd.notna(r.t_end_s) else trace.t_host_s[-1]
        ax.axvspan(r.t_start_s - t0, end - t0, color="red", alpha=0.25, hatch="//",
                   label="meter gap" if i == 0 else None)
    if t_range_s is not None:
        ax.set_xlim(*t_range_s)
    ax.set_xlabel("time since the first sample (s)")
    ax.set_ylabel("power (W)")
    note = f", every {stride}th sample drawn" if stride > 1 else ""
    ax.set_title(f"power trace — {device} / {trace.meter} ({trace.t_host_s.size} samples{note})")
    ax.legend(loc="upper right", fontsize="small", ncols=4)
    return fig


def energy_per_epoch(jobs: pd.DataFrame) -> Figure:
    """Energy per epoch (gross and above idle) by method and device; dots are the jobs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    data = jobs.dropna(subset=["energy_per_epoch_j"])
    for ax, col, title in ((axes[0], "energy_per_epoch_j", "gross"),
                           (axes[1], "energy_above_idle_per_epoch_j", "above idle")):
        sub = data.dropna(subset=[col])
        if sub.empty:
            _empty(ax, f"no {title} energy (no power samples or no idle baseline)")
        else:
            sns.barplot(sub, x="method", y=col, hue="device", errorbar=None, alpha=0.6, ax=ax)
            sns.stripplot(sub, x="method", y=col, hue="device", dodge=True, legend=False,
                          palette="dark:black", size=4, ax=ax)
            ax.set_ylabel("J / epoch")
        ax.set_title(f"energy per epoch ({title})")
    return fig


def memory_breakdown(jobs: pd.DataFrame, modeled: pd.DataFrame) -> Figure:
    """Modeled memory per category (stacked) beside the measured peaks, per model and method."""
    fig, ax = plt.subplots(figsize=(11, 4), layout="constrained")
    rows = []
    for r in modeled.itertuples():
        for cat in ("model_mib", "optimizer_mib", "activations_mib"):
            rows.append({"bar": f"{r.model}/{r.method}\n{r.label}", "category":
                         cat.removesuffix("_mib"), "mib": getattr(r, cat)})
    measured = jobs.dropna(subset=["result_status"])
    for (model, method), frame in measured.groupby(["model", "method"]):
        for col, cat in (("peak_tensor_bytes", "measured tensor peak"),
                         ("peak_rss_delta_bytes", "measured RSS increase")):
            value = pd.to_numeric(frame[col], errors="coerce").mean()
            if pd.notna(value):
                rows.append({"bar": f"{model}/{method}\nmeasured", "category": cat,
                             "mib": value / MIB})
    if not rows:
        _empty(ax, "no modeled or measured memory")
        return fig
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index="bar", columns="category", values="mib", aggfunc="sum",
                             sort=False)
    stacked = [c for c in ("model", "optimizer", "activations") if c in wide]
    bottom = np.zeros(len(wide))
    x = np.arange(len(wide))
    for cat, colour in zip(stacked, sns.color_palette("muted", 3)):
        vals = wide[cat].fillna(0).to_numpy()
        ax.bar(x, vals, bottom=bottom, color=colour, label=f"modeled {cat}")
        bottom += vals
    for offset, cat, colour in ((-0.2, "measured tensor peak", "#333333"),
                                (0.2, "measured RSS increase", "#999999")):
        if cat in wide:
            ax.bar(x + offset, wide[cat].fillna(0).to_numpy(), width=0.35, color=colour,
                   label=cat)
    ax.set_xticks(x, wide.index, fontsize="small")
    ax.set_ylabel("MiB")
    ax.set_title("training memory: modeled (by category) vs measured")
    ax.legend(fontsize="small")
    return fig


def tradeoffs(jobs: pd.DataFrame) -> Figure:
    """Accuracy against energy per epoch and against peak memory, one point per job."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    data = jobs.dropna(subset=["test_accuracy"]).copy()
    data["peak RSS increase (MiB)"] = pd.to_numeric(data["peak_rss_delta_bytes"],
                                                    errors="coerce") / MIB
    for ax, col, xlabel in ((axes[0], "energy_per_epoch_j", "J / epoch (gross)"),
                            (axes[1], "peak RSS increase (MiB)", "peak RSS increase (MiB)")):
        sub = data.dropna(subset=[col])
        if sub.empty:
            _empty(ax, f"no jobs with both accuracy and {xlabel}")
        else:
            sns.scatterplot(sub, x=col, y="test_accuracy", hue="method", style="device", s=60,
                            ax=ax)
            ax.set_xlabel(xlabel)
        ax.set_title(f"accuracy vs {xlabel.split(' (')[0]}")
    return fig


def repeats_box(jobs: pd.DataFrame, metric: str = "epoch_s", label: str = "s / epoch") -> Figure:
    """Spread across repeats and seeds of one metric, per device and method."""
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    data = jobs.dropna(subset=[metric])
    if data.empty:
        _empty(ax, f"no jobs with {label}")
    else:
        sns.boxplot(data, x="device", y=metric, hue="method", ax=ax)
        sns.stripplot(data, x="device", y=metric, hue="method", dodge=True, legend=False,
                      palette="dark:black", size=3, ax=ax)
        ax.set_ylabel(label)
    ax.set_title(f"{label} across repeats and seeds")
    return fig


def png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes, closing it (for the report and for notebooks' `Image`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
