"""The end-of-run summary `harness run` prints: the comparison per method, from `analysis`
(the figures the report and export show), read from the run's committed store."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

MIB = 1024 * 1024


def print_comparison(run_dir: Path) -> None:
    """Per device, meter, method, model and data set: jobs, peak memory, time and energy per
    epoch (with its interval, from `analysis`: the figures the report and export show),
    accuracy; then how many energy figures are ok, low-confidence or withheld, and why."""
    from analysis.compare import ENERGY_PER_EPOCH, t_interval, with_measurement
    from analysis.jobs import job_table
    from analysis.load import load_run
    from analysis.run_energy import energy_table, meter_infos

    run = load_run(run_dir)
    energy = energy_table(run)
    meters = meter_infos(run.info, run.devices)
    assumed: dict[str, str] = {}  # meter type -> why its class is an assumption
    jobs = job_table(run, energy)
    # A terminal's own width; in a log or a pipe wide enough that no figure wraps away
    # from its interval and its 'modeled' label.
    console = Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="comparison per method (within a device and meter)")
    for column in ("device", "meter", "method", "model", "data", "jobs ok", "peak tensor MiB",
                   "peak RSS+ MiB", "peak RSS MiB", "s / epoch", "J / epoch [95 %]",
                   "test accuracy"):
        table.add_column(column, justify="right")
    keys = ["device", "meter", "meter_kind", "method", "model", "dataset"]
    emulated = _emulated_devices(run)
    for key, frame in jobs.groupby(keys, dropna=False, sort=False):
        device, meter, kind, method, model, dataset = key
        done = frame[frame["result_status"] == "completed"]
        figure = with_measurement(t_interval(done[ENERGY_PER_EPOCH.column]), done,
                                  ENERGY_PER_EPOCH)
        withheld = int((done["energy_status"] == "withheld").sum())
        if figure.n:
            text = f"{figure.mean:.3g} [{figure.low:.3g}, {figure.high:.3g}]"
            text += " modeled" if kind == "modeled" else ""
            text += f" ({withheld} withheld)" if withheld else ""
        else:
            text = "withheld" if withheld else "n/a"
        throttled = int(done["throttled"].fillna(False).astype(bool).sum())
        shown = f"{method} ({throttled} throttled)" if throttled else str(method)
        name = f"{device} (emulated)" if device in emulated else str(device)
        info = meters.get((device, meter))
        shown_meter = meter if isinstance(meter, str) else "-"
        if info is not None and info.accuracy.assumed:
            shown_meter += " (class assumed)"
            assumed[info.type] = info.accuracy.source
        table.add_row(name, shown_meter, shown,
                      str(model), str(dataset), f"{len(done)}/{len(frame)}",
                      _mean(done["peak_tensor_bytes"], MIB),
                      _mean(done["peak_rss_delta_bytes"], MIB),
                      _mean(done["peak_hwm_bytes"], MIB), _mean(done["epoch_s"]), text,
                      _mean(done["test_accuracy"]))
    console.print(table)
    for device, how in emulated.items():
        console.print(f"{device}: emulated ({how}): its times and energy are not the target's")
    for kind, source in sorted(assumed.items()):
        console.print(f"{kind}: its accuracy class (in every interval above) is {source}")
    console.print("memory: 'peak tensor' is the engine's tensor ledger over the first steps; "
                  "'peak RSS+' the process's resident-set growth over the job, 'peak RSS' its "
                  "high-water mark: RSS also counts the allocator's retained pages, torch's "
                  "scratch and the interpreter, torch and the engine themselves")
    if energy.empty:
        console.print("energy: no figures (no power samples or no recorded phases)")
    else:
        counts = energy["status"].value_counts()
        console.print(
            f"energy figures: {counts.get('ok', 0)} ok, {counts.get('low_confidence', 0)} "
            f"low-confidence, {counts.get('withheld', 0)} withheld (of {len(energy)} windows; "
            "`harness export` writes them all to energy.csv)"
        )
        for r in energy[energy["status"] != "ok"].head(10).itertuples():
            where = f"epoch {r.epoch}" if r.phase == "epoch" else r.phase
            console.print(f"  {r.status}: {r.device}/{r.meter} {r.job} {where}: {r.reason}")
    print(f"run directory: {run_dir}")


def _emulated_devices(run) -> dict[str, str]:
    """Devices whose `hello` facts say they run emulated (the lab's arm64 devices)."""
    from analysis.conditions import device_table

    table = device_table(run)
    return {str(d): str(e) for d, e in zip(table["device"], table["emulation"]) if e == e and e}


def _mean(values, scale: float = 1.0) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    return f"{sum(values) / len(values) / scale:.3f}"
