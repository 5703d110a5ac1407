"""What `harness run` shows while it runs: a rich progress bar per device.

Each device's row says what it is doing now — "setup: building kernels 0:00:41",
"setup: loading data", "running", "window eval", "cooling down" — with the current
job's bar (epochs and steps done of the job's total), its elapsed time and the time left
(rich's estimate from the job's own pace), and how many of the device's jobs are done.
Rendered from the devices' `Progress` records (`harness.recorder`), which the device threads update.
"""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness.recorder import Progress as DeviceProgress

STEPS_UNKNOWN = 100  # bar resolution while the steps per epoch are not known yet


def job_fraction(p: DeviceProgress) -> tuple[float | None, float | None]:
    """(completed, total) in steps for the current job, or (None, None) when unknown."""
    if p.step is None and p.epoch is None:
        return None, None
    per_epoch = p.steps_per_epoch
    total = None
    if per_epoch and p.epochs:
        total = per_epoch * p.epochs
    if p.max_steps:
        total = min(total, p.max_steps) if total else p.max_steps
    if total is None:  # steps per epoch unknown: epochs only
        if not p.epochs or p.epoch is None:
            return None, None
        return float(max(p.epoch - 1, 0)) * STEPS_UNKNOWN, float(p.epochs * STEPS_UNKNOWN)
    return float(min(p.step or 0, total)), float(total)


def describe(p: DeviceProgress, now: float | None = None) -> str:
    """The row's words: state, with how long it has lasted when it is a setup stage."""
    now = time.time() if now is None else now
    state = p.state
    if state.startswith(("setup", "window", "cooling", "starting", "clock")) and p.state_since_s:
        state = f"{state} {_clock(now - p.state_since_s)}"
    if p.state == "running" and p.epoch is not None:
        epochs = f"/{p.epochs}" if p.epochs else ""
        state = f"epoch {p.epoch}{epochs}" + (f" loss {p.loss:.3f}" if p.loss is not None else "")
    return state


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class FleetProgress:
    """A rich `Progress` with one task per device, refreshed from the runner's records."""

    def __init__(self, devices: list[DeviceProgress], console=None, get_time=None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[device]}"),
            TextColumn("{task.fields[jobs]}"),
            TextColumn("{task.fields[job]}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            refresh_per_second=4,
            expand=False,
            get_time=get_time,
        )
        self.devices = devices
        self.tasks: dict[str, TaskID] = {}
        self.jobs: dict[str, str | None] = {}
        for p in devices:
            self.tasks[p.device] = self.progress.add_task(
                "waiting", total=None, device=p.device, jobs="", job="-", start=False)

    def update(self, now: float | None = None) -> None:
        for p in self.devices:
            task = self.tasks[p.device]
            if self.jobs.get(p.device) != p.job_id:  # a new job: its own clock and pace
                self.jobs[p.device] = p.job_id
                self.progress.reset(task, total=None, start=p.job_id is not None)
            completed, total = job_fraction(p)
            finished = p.done + p.failed
            self.progress.update(
                task,
                description=describe(p, now),
                completed=completed or 0,
                total=total,
                jobs=f"{finished}/{p.jobs_total} jobs" + (f" ({p.failed} failed)" if p.failed
                                                         else ""),
                job=p.job_id or "-",
            )
            if p.job_id is None and p.state in ("done", "stopped", "unreachable", "error"):
                self.progress.stop_task(task)
