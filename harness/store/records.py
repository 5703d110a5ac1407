"""The records producers hand to the run store (one dataclass per row kind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EventRecord:
    """One line of a device's event stream as stored (parsed, or malformed with the reason)."""

    device: str
    job_id: str
    attempt: int
    line_no: int
    raw_json: str
    t_received_host_s: float
    seq: int | None = None
    kind: str | None = None
    t_mono_ns: int | None = None
    t_wall_s: float | None = None
    t_host_s: float | None = None
    malformed_reason: str | None = None


@dataclass(frozen=True)
class MemorySample:
    device: str
    job_id: str
    attempt: int
    seq: int
    t_host_s: float | None
    t_wall_s: float
    t_mono_ns: int
    rss_bytes: int | None
    hwm_bytes: int | None
    vm_bytes: int | None
    peak_tensor_bytes: int | None
    step: int | None


@dataclass(frozen=True)
class PlannedJob:
    """A job as the plan expands it, before any device runs it. `spec` is its description
    (`contract.jobspec.JobSpec.describe`): its files named, not located; the job's spec is
    built from it once, when a device runs it (`JobSpec.from_description`)."""

    job_id: str
    plan_index: int
    kind: str  # "train", "idle" or "script"
    method: str
    model: str | None
    dataset: str | None
    batch_size: int | None
    epochs: int | None
    max_steps: int | None
    seed: int | None
    repeat: int | None
    pinned: tuple[str, ...]
    spec: dict[str, Any]
