"""Clock alignment: the device's offset from the host by request/response.

Power samples are stamped by the host, job phases by the device. Before and
after each job the runner takes a handful of `clock_sample()`s and keeps the
one with the smallest round trip: the device answered somewhere inside that
round trip, so its offset is known to within half of it (the error bound).
A device time maps to host time as `t_device - offset_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SAMPLES = 8


class ClockSource(Protocol):
    def clock_sample(self) -> tuple[float, float, float]: ...


@dataclass(frozen=True)
class ClockEstimate:
    t_host_s: float  # host wall time of the chosen sample's midpoint
    offset_s: float  # device wall time minus host wall time
    rtt_s: float
    error_s: float  # half the round trip
    samples: int

    def to_host(self, t_device_s: float) -> float:
        return t_device_s - self.offset_s


def offset_from_sample(sent_s: float, device_s: float, received_s: float) -> tuple[float, float]:
    """(offset, round trip) of one request/response, assuming the answer came mid-way."""
    return device_s - (sent_s + received_s) / 2.0, received_s - sent_s


def estimate_offset(source: ClockSource, samples: int = DEFAULT_SAMPLES) -> ClockEstimate:
    """Take `samples` round trips and keep the one with the smallest round trip."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    best: tuple[float, float, float] | None = None  # (rtt, offset, midpoint)
    for _ in range(samples):
        sent, device, received = source.clock_sample()
        offset, rtt = offset_from_sample(sent, device, received)
        if rtt < 0:
            continue  # the host clock stepped during the round trip
        if best is None or rtt < best[0]:
            best = (rtt, offset, (sent + received) / 2.0)
    if best is None:
        now = time.time()
        raise ValueError(f"no usable clock sample at host time {now:.3f} (host clock stepping)")
    rtt, offset, midpoint = best
    return ClockEstimate(midpoint, offset, rtt, rtt / 2.0, samples)
