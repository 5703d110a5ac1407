"""Torch's thread count when the cores are not ours alone: one thread under contention.

With two threads on two cores and other busy processes (a Raspberry Pi running the agent,
its sampler and the OS is never idle), every OpenMP parallel region ends at a barrier that
waits for the thread the scheduler has just put aside: the thread that arrived spins, the
other waits in the run queue, and a region costs a scheduler time slice instead of its
work. `lowmem` runs many short regions (its products go chunk by chunk to bound memory, and
its elementwise passes switch torch to one thread and back, `kernels.elementwise_threads`),
so it collapsed first: cnv 0.175 -> 2.03 s a step with two busy competitors (11.6x, against
3.2x for `standard`), while one thread took 0.32 s in the same minute.

`ThreadGovernor` watches, between training steps, how long this process's threads wait in
the run queue (`/proc/self/task/*/schedstat`: time on the CPU, time runnable but waiting).
When more than `HIGH_WAIT_SHARE` of their time over a window is waiting, torch runs one
thread; after a number of windows (doubling each time contention is found again) it tries
the full count again if the waiting has dropped below `LOW_WAIT_SHARE`. On a quiet machine it
never acts. `BNN_ADAPTIVE_THREADS=0` turns it off; where schedstat is missing it does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TASKS = Path("/proc/self/task")
WINDOW_S = 0.25  # wall time over which the waiting share is judged
HIGH_WAIT_SHARE = 0.25  # above: contended, run one thread
LOW_WAIT_SHARE = 0.10  # below (at one thread): try the full count again
FIRST_BACKOFF = 4  # windows at one thread before the first retry; doubles, up to MAX
MAX_BACKOFF = 64


def read_schedstat(tasks: Path = TASKS) -> dict[str, tuple[int, int]]:
    """Per thread id: (ns on the CPU, ns runnable but waiting); {} where unavailable."""
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            run, wait, _ = (entry / "schedstat").read_text().split()
            out[entry.name] = (int(run), int(wait))
        except (OSError, ValueError):
            continue
    return out


@dataclass
class ThreadGovernor:
    """Drops torch to one thread while the process waits for CPU; see the module doc."""

    enabled: bool = field(default_factory=lambda: os.environ.get("BNN_ADAPTIVE_THREADS",
                                                                 "1") != "0")
    full_threads: int | None = None  # the count to return to (torch's at the first step)
    reduced: bool = False
    reductions: int = 0  # times it went to one thread
    last_wait_share: float | None = None
    _backoff: int = FIRST_BACKOFF
    _windows_left: int = 0
    _window_start: float | None = None
    _stats: dict[str, tuple[int, int]] = field(default_factory=dict)

    def after_step(self, now: float | None = None,
                   stats: dict[str, tuple[int, int]] | None = None) -> None:
        """Call after each training step; judges once per `WINDOW_S`."""
        if not self.enabled:
            return
        now = time.monotonic() if now is None else now
        if self._window_start is None:
            self.full_threads = self.full_threads or torch.get_num_threads()
            self._window_start, self._stats = now, read_schedstat() if stats is None else stats
            return
        if now - self._window_start < WINDOW_S:
            return
        current = read_schedstat() if stats is None else stats
        run = wait = 0
        for tid, (r, w) in current.items():
            r0, w0 = self._stats.get(tid, (0, 0))
            run, wait = run + max(0, r - r0), wait + max(0, w - w0)
        self._window_start, self._stats = now, current
        if run + wait == 0:
            return
        share = wait / (run + wait)
        self.last_wait_share = share
        self._judge(share)

    def _judge(self, share: float) -> None:
        if not self.reduced:
            if share > HIGH_WAIT_SHARE and (self.full_threads or 1) > 1:
                torch.set_num_threads(1)
                self.reduced, self._windows_left = True, self._backoff
                self.reductions += 1
                self._backoff = min(MAX_BACKOFF, self._backoff * 2)
            elif share < LOW_WAIT_SHARE:
                self._backoff = max(FIRST_BACKOFF, self._backoff // 2)
            return
        self._windows_left -= 1
        if self._windows_left <= 0 and share < LOW_WAIT_SHARE:
            torch.set_num_threads(self.full_threads or 1)
            self.reduced = False

    def describe(self) -> str:
        if not self.enabled:
            return "off (BNN_ADAPTIVE_THREADS=0)"
        state = "1 thread (contended)" if self.reduced else f"{torch.get_num_threads()} threads"
        return f"on: {state}, {self.reductions} reduction(s)"


governor = ThreadGovernor()
