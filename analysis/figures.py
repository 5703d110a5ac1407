"""The run's figures (matplotlib + seaborn, Agg backend): each function returns a Figure.

Every figure has the theme and method colours of `analysis.style`, axis labels in words
with units, and the intervals of its figures drawn (energy: the 95 % interval of
`analysis.energy`, as error bars). Energy above idle can sit near zero with noise on both
sides: its axis turns symmetric-logarithmic when the figures cross zero or span orders of
magnitude. A low-confidence energy figure is drawn hollow and the legend says so. A
figure whose data is absent is still drawn, with a note saying what is missing, so that
a report or notebook of a broken run shows the hole instead of failing. `save` writes a
figure as PNG, SVG and PDF.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.load import Run
from analysis.style import PERCENT_COLUMNS, apply_theme, label, method_colours

apply_theme()

MIB = 2**20
MAX_PLOTTED_POINTS = 200_000
PHASE_COLOURS = {"idle": "#bbbbbb", "eval": "#ffd27f"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
FORMATS = ("png", "svg", "pdf")


def _empty(ax: plt.Axes, note: str) -> None:
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _values(frame: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    return values * 100 if column in PERCENT_COLUMNS else values


def _symlog_if_needed(ax: plt.Axes, low: np.ndarray, high: np.ndarray) -> bool:
    """Symmetric-log y when the figures cross zero or span more than two decades; the
    linear part is as wide as the typical interval (the noise)."""
    low, high = low[np.isfinite(low)], high[np.isfinite(high)]
    if not low.size:
        return False
    crosses = low.min() < 0 < high.max()
    positive = np.abs(np.concatenate([low, high]))
    positive = positive[positive > 0]
    wide = positive.size and positive.max() / positive.min() > 100
    if not (crosses or wide):
        return False
    half_widths = np.abs(high - low) / 2
    linthresh = float(np.median(half_widths[half_widths > 0])) if (half_widths > 0).any() else 1.0
    ax.set_yscale("symlog", linthresh=max(linthresh, 1e-6))
    ax.axhline(0, color="#555", lw=0.8)
    return True


def _low_confidence(frame: pd.DataFrame) -> np.ndarray:
    status = frame["energy_status"] if "energy_status" in frame else pd.Series("ok", frame.index)
    return (status == "low_confidence").to_numpy()


def _legend(ax: plt.Axes, colours: dict, methods: list[str], devices: list[str],
            hollow: bool) -> None:
    handles = [Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    if len(devices) > 1:
        handles += [Line2D([], [], color="#444", marker=MARKERS[i % len(MARKERS)], ls="",
                           label=f"device {d}") for i, d in enumerate(devices)]
    if hollow:
        handles.append(Line2D([], [], color="#444", marker="o", ls="", markerfacecolor="none",
                              label="low-confidence energy"))
    ax.legend(handles=handles, fontsize="small", loc="best")


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
    ax.plot(t[::stride], p[::stride], lw=0.7, color="#222222", label=f"meter {trace.meter}")
    methods = run.jobs.set_index("job_id")["method"].to_dict()
    colours = method_colours(methods.values())
    phases = run.phases[(run.phases["device"] == device)
                        & run.phases["kind"].isin(["idle", "epoch", "eval"])]
    seen: set[str] = set()
    for r in phases.itertuples():
        name = "idle" if r.kind == "idle" else str(methods.get(r.job_id, r.kind))
        if r.kind == "eval":
            name = "eval"
        colour = PHASE_COLOURS.get(r.kind) or colours.get(name, "#dddddd")
        ax.axvspan(r.t_start_host_s - t0, r.t_end_host_s - t0, color=colour, alpha=0.25, lw=0,
                   label=None if name in seen else name)
        seen.add(name)
    gaps = run.gaps[(run.gaps["device"] == device) & (run.gaps["meter"] == trace.meter)]
    for i, r in enumerate(gaps.itertuples()):
        end = r.t_end_s if pd.notna(r.t_end_s) else trace.t_host_s[-1]
        ax.axvspan(r.t_start_s - t0, end - t0, color="red", alpha=0.25, hatch="//",
                   label="meter gap (no samples)" if i == 0 else None)
    if t_range_s is not None:
        ax.set_xlim(*t_range_s)
    ax.set_xlabel("time since the first sample (s)")
    ax.set_ylabel(label("power_w"))
    note = f", every {stride}th sample drawn" if stride > 1 else ""
    ax.set_title(f"power trace — {device} / {trace.meter} ({trace.t_host_s.size} samples{note})")
    ax.legend(loc="upper right", fontsize="small", ncols=4)
    return fig


def _interval_points(ax: plt.Axes, data: pd.DataFrame, column: str, colours: dict,
                     methods: list[str], devices: list[str]) -> bool:
    """One point per job at x = its method, with its interval as an error bar; hollow when
    low-confidence. Returns whether any was."""
    lo_col, hi_col = column.replace("_j", "_lo_j"), column.replace("_j", "_hi_j")
    low = _low_confidence(data)
    seen: dict[tuple[str, str], int] = {}  # jobs of one method and device side by side
    for i, (_, r) in enumerate(data.iterrows()):
        x = methods.index(r["method"])
        k = seen[(r["method"], r["device"])] = seen.get((r["method"], r["device"]), -1) + 1
        offset = (devices.index(r["device"]) - (len(devices) - 1) / 2) * 0.2 + k * 0.05
        y, lo, hi = r[column], r.get(lo_col, np.nan), r.get(hi_col, np.nan)
        colour = colours[r["method"]]
        err = None
        if pd.notna(lo) and pd.notna(hi):
            err = [[max(y - lo, 0)], [max(hi - y, 0)]]
        ax.errorbar([x + offset], [y], yerr=err, fmt=MARKERS[devices.index(r["device"])
                                                            % len(MARKERS)],
                    color=colour, markerfacecolor="none" if low[i] else colour, capsize=3,
                    ms=6, lw=1)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    return bool(low.any())


def energy_per_epoch(jobs: pd.DataFrame) -> Figure:
    """Energy per epoch (gross and above idle) per job, by method, with 95 % intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    data = jobs.dropna(subset=["energy_per_epoch_j"])
    colours = method_colours(jobs["method"])
    for ax, col, title in ((axes[0], "energy_per_epoch_j", "gross"),
                           (axes[1], "energy_above_idle_per_epoch_j", "above idle")):
        sub = data.dropna(subset=[col])
        if sub.empty:
            _empty(ax, f"no {title} energy (no power samples or no idle baseline)")
            ax.set_title(f"energy per epoch ({title})")
            continue
        methods = [m for m in colours if m in set(sub["method"])]
        devices = sorted(sub["device"].astype(str).unique())
        hollow = _interval_points(ax, sub, col, colours, methods, devices)
        lo_col, hi_col = col.replace("_j", "_lo_j"), col.replace("_j", "_hi_j")
        symlog = _symlog_if_needed(ax, _values(sub, lo_col).to_numpy(dtype=float),
                                   _values(sub, hi_col).to_numpy(dtype=float))
        ax.set_ylabel(label(col) + (" — symmetric log scale" if symlog else ""))
        ax.set_xlabel("method")
        ax.set_title(f"energy per epoch ({title}), 95 % intervals")
        _legend(ax, colours, methods, devices, hollow)
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
    for cat, colour in zip(stacked, sns.color_palette("Greys", 4)[1:]):
        vals = wide[cat].fillna(0).to_numpy()
        ax.bar(x, vals, bottom=bottom, color=colour, label=f"modeled: {cat}")
        bottom += vals
    for offset, cat, colour in ((-0.2, "measured tensor peak", "#1f4e79"),
                                (0.2, "measured RSS increase", "#7fa7d0")):
        if cat in wide:
            ax.bar(x + offset, wide[cat].fillna(0).to_numpy(), width=0.35, color=colour,
                   label=cat)
    ax.set_xticks(x, wide.index, fontsize="small")
    ax.set_ylabel("training memory (MiB)")
    ax.set_xlabel("model / method")
    ax.set_title("training memory: modeled (by category) vs measured")
    ax.legend(fontsize="small")
    return fig


def tradeoffs(jobs: pd.DataFrame) -> Figure:
    """Accuracy against energy per epoch (with its interval) and against peak memory."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    data = jobs.dropna(subset=["test_accuracy"]).copy()
    data["peak_rss_delta_mib"] = pd.to_numeric(data["peak_rss_delta_bytes"], errors="coerce") / MIB
    colours = method_colours(jobs["method"])
    for ax, col in ((axes[0], "energy_per_epoch_j"), (axes[1], "peak_rss_delta_mib")):
        sub = data.dropna(subset=[col])
        if sub.empty:
            _empty(ax, f"no jobs with both accuracy and {label(col)}")
            ax.set_title(f"accuracy vs {label(col).split(' (')[0]}")
            continue
        methods = [m for m in colours if m in set(sub["method"])]
        devices = sorted(sub["device"].astype(str).unique())
        low = _low_confidence(sub) if col == "energy_per_epoch_j" else np.zeros(len(sub), bool)
        for i, (_, r) in enumerate(sub.iterrows()):
            xerr = None
            if col == "energy_per_epoch_j" and pd.notna(r.get("energy_per_epoch_lo_j")):
                xerr = [[max(r[col] - r["energy_per_epoch_lo_j"], 0)],
                        [max(r["energy_per_epoch_hi_j"] - r[col], 0)]]
            colour = colours[r["method"]]
            ax.errorbar([r[col]], [r["test_accuracy"] * 100], xerr=xerr,
                        fmt=MARKERS[devices.index(str(r["device"])) % len(MARKERS)],
                        color=colour, markerfacecolor="none" if low[i] else colour,
                        capsize=3, ms=7, lw=1)
        ax.set_xlabel(label(col))
        ax.set_ylabel(label("test_accuracy"))
        ax.set_title(f"accuracy vs {label(col).split(' (')[0]}")
        _legend(ax, colours, methods, devices, bool(low.any()))
    return fig


def repeats_box(jobs: pd.DataFrame, metric: str = "epoch_s", ylabel: str | None = None) -> Figure:
    """Spread across repeats and seeds of one metric, per device and method."""
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    text = ylabel or label(metric)
    data = jobs.dropna(subset=[metric]).copy()
    if data.empty:
        _empty(ax, f"no jobs with {text}")
    else:
        data[metric] = _values(data, metric)
        colours = method_colours(jobs["method"])
        order = [m for m in colours if m in set(data["method"])]
        sns.boxplot(data, x="device", y=metric, hue="method", hue_order=order,
                    palette=colours, ax=ax, fill=False)
        sns.stripplot(data, x="device", y=metric, hue="method", hue_order=order, dodge=True,
                      legend=False, palette=colours, size=4, ax=ax)
        ax.set_ylabel(text)
        ax.set_xlabel("device")
    ax.set_title(f"{text} across repeats and seeds")
    return fig


def png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes, closing it (for the report and for notebooks' `Image`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save(fig: Figure, stem: Path, dpi: int = 150) -> dict[str, Path]:
    """Write the figure as `stem.png`, `stem.svg` (text kept as text) and `stem.pdf`
    (fonts embedded), closing it; returns the paths by format."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, format=fmt, dpi=dpi)
        paths[fmt] = path
    plt.close(fig)
    return paths
