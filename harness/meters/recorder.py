"""The recorder: one reader thread per meter, samples on disk within a second.

A meter that disappears (unplugged, Bluetooth dropped) is reconnected with backoff; the
time without samples is stored as a gap, never filled in. A silence longer than
`gap_s` while connected (a stalled meter) is a gap too. Achieved rate, rejected records
and gaps are counted and stored per meter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from harness.meters.base import Meter, MeterDisconnected, MeterError, PowerSample

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.25
STATS_INTERVAL_S = 5.0
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


class SampleStore(Protocol):
    """What the recorder needs from the run store (harness.store.RunStore)."""

    def add_power_samples(
        self, device: str, meter: str, samples: Sequence[PowerSample]
    ) -> None: ...

    def add_meter_gap(
        self, device: str, meter: str, t_start_s: float, t_end_s: float, reason: str
    ) -> None: ...

    def set_meter_stats(
        self,
        device: str,
        meter: str,
        samples: int,
        achieved_hz: float,
        rejected_records: int,
        gaps: int,
    ) -> None: ...


@dataclass
class RecorderStats:
    samples: int = 0
    gaps: int = 0
    reconnects: int = 0
    first_t_s: float | None = None
    last_t_s: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def achieved_hz(self) -> float:
        if self.first_t_s is None or self.last_t_s is None or self.last_t_s <= self.first_t_s:
            return 0.0
        return (self.samples - 1) / (self.last_t_s - self.first_t_s)


class Recorder:
    """Reads one meter in its own thread and hands every sample to the store."""

    def __init__(
        self, meter: Meter, store: SampleStore, device: str, gap_s: float | None = None
    ) -> None:
        self.meter = meter
        self.store = store
        self.device = device
        self.meter_name = meter.name
        self.gap_s = gap_s if gap_s is not None else max(0.5, 3.0 / meter.nominal_hz)
        self.stats = RecorderStats()
        self._stop = threading.Event()
        self._pending: list[PowerSample] = []
        self._last_flush = 0.0
        self._last_stats = 0.0
        self._gap_start: tuple[float, str] | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"meter {device}/{meter.name}", daemon=True
        )

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> RecorderStats:
        """Stop reading, flush what is left, store the statistics; idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning(
                "meter %s/%s did not stop within %.1f s", self.device, self.meter_name, timeout_s
            )
        return self.stats

    @property
    def rejected_records(self) -> int:
        return self.meter.rejected_records

    def _run(self) -> None:
        try:
            self._connect_with_backoff(initial=True)
            while not self._stop.is_set():
                try:
                    samples = self.meter.read()
                except MeterDisconnected as exc:
                    self._lost(str(exc))
                    continue
                except MeterError as exc:
                    self._lost(f"meter error: {exc}")
                    continue
                self._take(samples)
                self._flush_if_due()
        except Exception:
            log.exception("meter %s/%s: recorder failed", self.device, self.meter_name)
            raise
        finally:
            self.meter.close()
            if self._gap_start is not None:
                start, reason = self._gap_start
                self._store_gap(start, time.time(), f"{reason}; not back before stop")
            self._flush()
            self._store_stats()

    def _lost(self, reason: str) -> None:
        log.info("meter %s/%s lost: %s", self.device, self.meter_name, reason)
        self.meter.close()
        start = self.stats.last_t_s if self.stats.last_t_s is not None else time.time()
        if self._gap_start is None:
            self._gap_start = (start, reason)
        self._flush()
        self._connect_with_backoff(initial=False)

    def _connect_with_backoff(self, initial: bool) -> None:
        delay = BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                self.meter.connect()
            except MeterError as exc:
                if initial and self._gap_start is None:
                    self._gap_start = (time.time(), f"not connected: {exc}")
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(str(exc))
                self._flush_if_due()
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if not initial:
                self.stats.reconnects += 1
            return

    def _take(self, samples: list[PowerSample]) -> None:
        for sample in samples:
            previous = self.stats.last_t_s
            if self._gap_start is not None:
                start, reason = self._gap_start
                self._gap_start = None
                self._store_gap(start, sample.t_host_s, reason)
            elif previous is not None and sample.t_host_s - previous > self.gap_s:
                silence = sample.t_host_s - previous
                self._store_gap(previous, sample.t_host_s, f"no samples for {silence:.2f} s")
            if self.stats.first_t_s is None:
                self.stats.first_t_s = sample.t_host_s
            self.stats.last_t_s = sample.t_host_s
            self.stats.samples += 1
            self._pending.append(sample)

    def _store_gap(self, t_start_s: float, t_end_s: float, reason: str) -> None:
        self.stats.gaps += 1
        self._flush()
        self.store.add_meter_gap(self.device, self.meter_name, t_start_s, t_end_s, reason)

    def _flush_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_INTERVAL_S:
            self._flush()
        if now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            self._store_stats()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._pending:
            batch, self._pending = self._pending, []
            self.store.add_power_samples(self.device, self.meter_name, batch)

    def _store_stats(self) -> None:
        self.store.set_meter_stats(
            self.device,
            self.meter_name,
            samples=self.stats.samples,
            achieved_hz=self.stats.achieved_hz,
            rejected_records=self.meter.rejected_records,
            gaps=self.stats.gaps,
        )
