"""Windows: named phases a user's script marks, recorded with their own energy.

Inside a script the agent runs (a plan's `scripts:`)::

    import device_agent

    with device_agent.window("forward+backward"):
        ...
    device_agent.begin_window("eval")        # or Zeus's begin/end pair
    ...
    record = device_agent.end_window("eval")  # name, index, times, elapsed_s

Each window is streamed as `window_start` and `window_end` events; the host stores it as
a phase `window` of the job, so its energy is computed like every other phase's (with
its interval, from the device's meter) and appears in `energy.csv` (phase `window`,
column `window` = its name) and in `harness.api`. Windows may nest and overlap, each
by its own name; the same name may be used again once ended. Outside the agent (the
script run by hand) the calls still time the windows and return their records, and
stream nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from contract.events import WindowEnd, WindowStart

WINDOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/+-]{0,99}$")


@dataclass(frozen=True)
class WindowRecord:
    """One ended window (energy comes from the host's meters, after the run)."""

    name: str
    index: int  # the job's windows are numbered 0, 1, ... in the order they began
    t_start_wall_s: float
    t_end_wall_s: float
    elapsed_s: float  # monotonic clock


class _Windows:
    """The open windows of this process and where their events go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writer: Any = None  # the agent's EventWriter while it runs a script job
        self.open: dict[str, tuple[int, float, int]] = {}  # name -> (index, wall, mono_ns)
        self.count = 0

    def reset(self, writer: Any) -> None:
        with self.lock:
            self.writer, self.open, self.count = writer, {}, 0


_WINDOWS = _Windows()


def attach(writer: Any) -> None:
    """The agent: stream this job's windows through `writer` (None: stop streaming)."""
    _WINDOWS.reset(writer)


def begin_window(name: str) -> None:
    """Start the window `name` (refused if a window of that name is open)."""
    if not isinstance(name, str) or not WINDOW_NAME.match(name):
        raise ValueError(f"window name: expected letters, digits, ' ._:/+-' (max 100), got "
                         f"{name!r}")
    with _WINDOWS.lock:
        if name in _WINDOWS.open:
            raise ValueError(f"window {name!r} is already open; end it first")
        index = _WINDOWS.count
        _WINDOWS.count += 1
        wall, mono = time.time(), time.monotonic_ns()
        _WINDOWS.open[name] = (index, wall, mono)
        writer = _WINDOWS.writer
    if writer is not None:
        writer.emit(WindowStart(name=name, index=index))


def end_window(name: str) -> WindowRecord:
    """End the window `name` and return what it measured on the device (its times)."""
    with _WINDOWS.lock:
        if name not in _WINDOWS.open:
            raise ValueError(f"window {name!r} is not open (begin_window first)")
        index, wall, mono = _WINDOWS.open.pop(name)
        writer = _WINDOWS.writer
    record = WindowRecord(name, index, wall, time.time(), (time.monotonic_ns() - mono) / 1e9)
    if writer is not None:
        writer.emit(WindowEnd(name=name, index=index, t_start_wall_s=wall,
                              t_start_mono_ns=mono, elapsed_s=record.elapsed_s))
    return record


@contextmanager
def window(name: str) -> Iterator[None]:
    """`with device_agent.window("NAME"):` marks the block as a window (ended on errors too)."""
    begin_window(name)
    try:
        yield
    finally:
        end_window(name)


def open_windows() -> list[str]:
    """Names of the windows begun and not ended (the agent reports them at the job's end)."""
    with _WINDOWS.lock:
        return list(_WINDOWS.open)
