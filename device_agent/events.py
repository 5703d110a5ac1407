"""The agent's event stream: numbered JSON lines on stdout, mirrored to a file.

Each line is flushed as it is written so the host sees it at once. The same
lines go to `events.jsonl` in the job's output directory, so nothing depends on
the stream surviving. If stdout breaks (the host went away) the writer keeps
the file going and reports `host_gone`, so the job can stop itself.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TextIO

from contract.events import Event, EventPayload
from contract.events import Heartbeat as HeartbeatEvent


class EventWriter:
    """Thread-safe: the job thread and the samplers emit through one writer."""

    def __init__(self, stream: TextIO, mirror_path: Path | None = None) -> None:
        self._stream = stream
        self._mirror = mirror_path.open("a", encoding="utf-8") if mirror_path else None
        self._lock = threading.Lock()
        self._seq = 0
        self.job_id = "agent"
        self.host_gone = False

    def emit(self, payload: EventPayload) -> Event:
        """Number, time-stamp and write one event (a `contract.events` payload)."""
        with self._lock:
            event = Event.of(payload, self.job_id, self._seq, time.monotonic_ns(), time.time())
            self._seq += 1
            line = event.to_line() + "\n"
            if not self.host_gone:
                try:
                    self._stream.write(line)
                    self._stream.flush()
                except (BrokenPipeError, OSError, ValueError):
                    self.host_gone = True
            if self._mirror is not None:
                self._mirror.write(line)
                self._mirror.flush()
            return event

    def keep_stdout_for_events(self) -> None:
        """Events go on to a private copy of stdout, and file descriptor 1 (`print`, child
        processes) to stderr: code run in the agent (a user's script) cannot corrupt the
        stream. Nothing changes when the stream is not the process's stdout."""
        with self._lock:
            try:
                fd = self._stream.fileno()
            except (AttributeError, OSError, ValueError):
                return
            if fd != 1:
                return
            self._stream.flush()
            self._stream = os.fdopen(os.dup(fd), "w", encoding="utf-8")
            os.dup2(2, 1)

    def close(self) -> None:
        with self._lock:
            if self._mirror is not None:
                self._mirror.close()
                self._mirror = None


class Heartbeat:
    """A `heartbeat` event every `period_s` from its own thread, while the process lives.

    The host ends a job as `stalled` when no line at all arrives for the job's stall
    timeout: a frozen agent (SIGSTOP, a hung device) sends none of these.
    """

    def __init__(self, writer: EventWriter, period_s: float) -> None:
        self._writer = writer
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _beat(self) -> None:
        beats = 0
        while not self._stop.wait(self._period_s):
            beats += 1
            self._writer.emit(HeartbeatEvent(n=beats))

    def stop(self) -> None:
        """No heartbeat after this returns (the job's last event comes after it)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
