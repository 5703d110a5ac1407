"""A job's event stream under its limits: a stall timeout and a wall-clock limit.

The agent sends a `heartbeat` event every few seconds besides its other events, so a
live agent is never silent for long. `WatchedStream` reads the remote job's lines on
a thread of its own; when no line has come for the job's `stall_timeout_s` (a frozen
agent, a hung device) or the job has run for its `wall_clock_s`, it stops the agent
(SIGTERM, SIGCONT, SIGKILL after the grace period) and records why, so the device's
thread goes on with its next job instead of waiting forever.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

# After stopping a stalled job, how long its stream may take to end before it is left.
DRAIN_AFTER_STOP_S = 30.0
_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class WatchedStream:
    """`lines()` of `remote`, numbered; `verdict` is set if a limit ended the job."""

    def __init__(
        self,
        remote: Any,
        stall_timeout_s: float | None,
        wall_clock_s: float | None,
        stop_grace_s: float,
    ) -> None:
        self.remote = remote
        self.stall_timeout_s = stall_timeout_s
        self.wall_clock_s = wall_clock_s
        self.stop_grace_s = stop_grace_s
        self.verdict: tuple[str, str] | None = None  # (status, reason)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, name="event-stream", daemon=True)

    def _pump(self) -> None:
        try:
            for line in self.remote.lines():
                self._queue.put(line)
        except BaseException as exc:  # DeviceLost and the like: raised in the caller's thread
            self._queue.put(_Failure(exc))
        finally:
            self._queue.put(_END)

    def lines(self) -> Iterator[tuple[int, str]]:
        self._thread.start()
        started = last = time.monotonic()
        give_up_at: float | None = None
        line_no = 0
        while True:
            now = time.monotonic()
            if self.verdict is None:
                if self.stall_timeout_s is not None and now - last >= self.stall_timeout_s:
                    self._stop("stalled", f"no event from the agent for {self.stall_timeout_s:g} s"
                               " (stall_timeout_s); the agent was stopped")
                elif self.wall_clock_s is not None and now - started >= self.wall_clock_s:
                    self._stop("timed_out", f"still running after {self.wall_clock_s:g} s "
                               "(wall_clock_s); the agent was stopped")
                if self.verdict is not None:
                    give_up_at = time.monotonic() + DRAIN_AFTER_STOP_S
            if give_up_at is not None and time.monotonic() > give_up_at:
                return  # the stream did not end after the stop; the job is over for us
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                if self.verdict is not None:
                    return  # the connection went with the stopped agent
                raise item.exc
            last = time.monotonic()
            yield line_no, item
            line_no += 1

    def _stop(self, status: str, reason: str) -> None:
        self.verdict = (status, reason)
        self.remote.stop(self.stop_grace_s)
