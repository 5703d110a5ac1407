"""Recording a run: everything a device's thread tells the store, through one narrow door.

The runner's device threads write no store rows themselves. They tell the `Recorder` what
happened to a device or a job (a status, a clock estimate, an attempt's start and outcome)
and hand each line of an attempt's event stream to that attempt's `StreamRecorder`, which
turns it into rows (events, memory samples, phases, agent power) and keeps the device's
`Progress`: the one record of what a device is doing, which the terminal's bars and the
dashboard's fleet table both show. (Meters have their own recorders: `harness.meters`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract.events import (
    FINAL_KINDS,
    Board,
    EpochEnd,
    EpochStart,
    Error,
    Event,
    Hello,
    JobEnd,
    JobStart,
    MalformedLine,
    Memory,
    Power,
    Setup,
    Step,
    WindowEnd,
    WindowStart,
    parse_event_line,
)
from harness.clock import ClockEstimate
from harness.store import EventRecord, MemorySample, PlannedJob, RunStore

# Setup stages long enough to deserve a line of their own in the run's output.
LOGGED_STAGES = ("building kernels",)


@dataclass
class Progress:
    """What a device is doing now: updated by its thread in `harness run` (the terminal's
    bars), or from the stored progress events by the dashboard's follower."""

    device: str
    job_id: str | None = None
    # waiting, clock, starting, setup: <stage>, running, window <name>, cooling down, done,
    # stopped, unreachable, error; the dashboard's: running, finished, error
    state: str = "waiting"
    state_since_s: float | None = None  # host time the state began (for "elapsed")
    epoch: int | None = None
    step: int | None = None  # global step
    loss: float | None = None
    train_accuracy: float | None = None  # the last epoch's (the dashboard shows them)
    test_accuracy: float | None = None
    done: int = 0
    failed: int = 0
    jobs_total: int = 0  # jobs this device may run (its share of the queue at the start)
    epochs: int | None = None  # the current job's epochs and max steps (from its spec)
    max_steps: int | None = None
    steps_per_epoch: int | None = None  # told by the agent once the data is loaded
    job_started_s: float | None = None

    def set_state(self, state: str, now: float | None = None) -> None:
        if state != self.state:
            self.state, self.state_since_s = state, time.time() if now is None else now


@dataclass
class JobOutcome:
    """How one attempt of a job ended, as the store records it."""

    status: str  # completed | failed | oom | interrupted | lost | stalled | timed_out
    exit_code: int | None
    reason: str | None
    metrics: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """The runner's one door to the store: device statuses, clock estimates, attempts."""

    def __init__(self, store: RunStore, log: Callable[[str], None] | None = None) -> None:
        self._store = store
        self._log = log

    def device_status(self, device: str, status: str, reason: str | None = None) -> None:
        self._store.set_device_status(device, status, reason)

    def clock_offset(self, device: str, job_id: str | None, attempt: int | None, phase: str,
                     estimate: ClockEstimate) -> None:
        self._store.add_clock_offset(device, job_id, attempt, phase, estimate.t_host_s,
                                     estimate.offset_s, estimate.rtt_s, estimate.error_s,
                                     estimate.samples)

    def attempt(self, device: str, job: PlannedJob, attempt: int, clock: ClockEstimate,
                progress: Progress, t_attempt_host_s: float) -> StreamRecorder:
        """The job is running on `device`: its row says so; the returned recorder takes
        the attempt's event lines."""
        self._store.start_job(job.job_id, device, attempt, t_attempt_host_s)
        return StreamRecorder(self._store, device, job, attempt, clock, progress,
                              t_attempt_host_s, log=self._log)

    def outcome(self, device: str, job: PlannedJob, attempt: int, status: str,
                outcome: JobOutcome) -> None:
        """The attempt's end: the job's status (`status`: as the runner decided, e.g. a lost
        job is `incomplete`) and its result row."""
        self._store.finish_job(job.job_id, status, outcome.exit_code, outcome.reason,
                               time.time())
        self._store.set_result(job.job_id, device, attempt, status, job.method, outcome.metrics)

    def skipped(self, job: PlannedJob, reason: str) -> None:
        self._store.finish_job(job.job_id, "skipped", None, reason, time.time())


class StreamRecorder:
    """Turns one attempt's stdout lines into store rows; keeps what the runner needs."""

    def __init__(
        self,
        store: RunStore,
        device: str,
        job: PlannedJob,
        attempt: int,
        clock: ClockEstimate,
        progress: Progress,
        t_attempt_host_s: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.log = log  # long setup stages are also said as a line (logs without a terminal)
        self.t_attempt_host_s = t_attempt_host_s  # when the host started the agent
        self.device = device
        self.job = job
        self.attempt = attempt
        self.clock = clock
        self.progress = progress
        self.last_kind: str | None = None  # the final event: job_end, error or interrupted
        self.metrics: dict[str, Any] = {}
        self.error: str | None = None
        self.t_start_host_s: float | None = None
        self.t_end_host_s: float | None = None
        self._epoch_start_host_s: dict[int, float] = {}
        self.t_work_host_s: float | None = None  # where setup ends and the job's work begins
        self.malformed = 0
        self.temps_c: list[float] = []  # the board's temperature readings (`board` events)

    def line(self, line_no: int, line: str) -> None:
        received = time.time()
        parsed = parse_event_line(line)
        if isinstance(parsed, MalformedLine):
            self.malformed += 1
            self.store.add_events(
                [
                    EventRecord(
                        self.device,
                        self.job.job_id,
                        self.attempt,
                        line_no,
                        parsed.raw,
                        received,
                        malformed_reason=parsed.reason,
                    )
                ]
            )
            return
        t_host = self.clock.to_host(parsed.t_wall_s)
        self.store.add_events(
            [
                EventRecord(
                    self.device,
                    self.job.job_id,
                    self.attempt,
                    line_no,
                    line[:1_000_000],
                    received,
                    seq=parsed.seq,
                    kind=parsed.kind,
                    t_mono_ns=parsed.t_mono_ns,
                    t_wall_s=parsed.t_wall_s,
                    t_host_s=t_host,
                )
            ]
        )
        if parsed.kind in FINAL_KINDS:
            self.last_kind = parsed.kind
        if parsed.payload is not None:
            self._handle(parsed, t_host)

    def _log_cooldown(self, conditions: dict[str, Any] | None) -> None:
        """Say when a job started before its board was back to idle temperature: the agent
        gave up after the configured maximum (recorded in the job's conditions)."""
        cooled = (conditions or {}).get("cooldown")
        if self.log is None or not isinstance(cooled, dict) or cooled.get("reached", True):
            return
        at_c = cooled.get("at_c")
        self.log(f"[{self.device}] {self.job.job_id}: not cooled to {cooled.get('to_c')} °C "
                 f"after {cooled.get('waited_s')} s (the maximum): started at "
                 f"{'?' if at_c is None else at_c} °C")

    def _handle(self, event: Event, t_host: float) -> None:
        payload = event.payload
        if isinstance(payload, Hello):
            self.store.set_device_facts(self.device, payload.to_data())
        elif isinstance(payload, Setup):
            self.progress.set_state(f"setup: {payload.stage[:40]}")
            if self.log is not None and payload.stage in LOGGED_STAGES:
                self.log(f"[{self.device}] {self.job.job_id}: {payload.stage} ...")
            if payload.steps_per_epoch is not None and payload.steps_per_epoch > 0:
                self.progress.steps_per_epoch = payload.steps_per_epoch
        elif isinstance(payload, JobStart):
            self.t_start_host_s = t_host
            self._log_cooldown(payload.conditions)
            if not self.progress.state.startswith("setup"):
                self.progress.set_state("running")
            if self.job.kind in ("idle", "script"):  # no epochs: the work starts here
                self._end_setup(t_host)
        elif isinstance(payload, EpochStart):
            self._epoch_start_host_s[payload.epoch] = t_host
            self._end_setup(t_host)
            self.progress.epoch = payload.epoch
            self.progress.set_state("running")
        elif isinstance(payload, Step):
            self.progress.step = payload.global_step
            self.progress.loss = payload.loss
        elif isinstance(payload, EpochEnd):
            start = self._epoch_start_host_s.get(payload.epoch)
            if start is not None:
                self.store.add_phase(
                    self.device,
                    self.job.job_id,
                    self.attempt,
                    "epoch",
                    payload.epoch,
                    start,
                    t_host,
                )
        elif isinstance(payload, Memory):
            self.store.add_memory_samples(
                [
                    MemorySample(
                        self.device,
                        self.job.job_id,
                        self.attempt,
                        event.seq,
                        t_host,
                        event.t_wall_s,
                        event.t_mono_ns,
                        payload.rss_bytes,
                        payload.hwm_bytes,
                        payload.vm_bytes,
                        payload.peak_tensor_bytes,
                        payload.step,
                    )
                ]
            )
        elif isinstance(payload, WindowStart):
            self.progress.set_state(f"window {payload.name[:40]}")
        elif isinstance(payload, WindowEnd):
            start = self.clock.to_host(payload.t_start_wall_s)
            if t_host >= start:  # the name stays in the event (analysis.windows reads it)
                self.store.add_phase(self.device, self.job.job_id, self.attempt, "window",
                                     payload.index, start, t_host)
            self.progress.set_state("running")
        elif isinstance(payload, Board):
            if payload.temp_c is not None:
                self.temps_c.append(payload.temp_c)
        elif isinstance(payload, Power):
            # a reading that is a mean over the period before it is stamped at its middle
            half_s = payload.interval_s / 2 if payload.interval_s is not None else 0.0
            self.store.add_power_samples(
                self.device,
                payload.source,
                [_AgentPower(t_host - half_s, payload.power_w, event.t_wall_s)],
            )
        if event.kind in FINAL_KINDS:
            self.t_end_host_s = t_host
            self.metrics = dict(event.data)
            if isinstance(payload, Error):
                self.error = f"{payload.type}: {payload.message}"
        if isinstance(payload, JobEnd):
            self._end_setup(self.t_start_host_s or t_host)
            start = self.t_work_host_s if self.job.kind != "idle" else self.t_start_host_s
            if start is not None and t_host > start:
                phase = "idle" if self.job.kind == "idle" else "job"
                self.store.add_phase(
                    self.device, self.job.job_id, self.attempt, phase, 0, start, t_host
                )

    def _end_setup(self, t_host: float) -> None:
        """The setup phase (agent start-up, engine, data and kernel loading) ends where the
        job's work starts: its first epoch (an idle baseline: its job_start)."""
        if self.t_work_host_s is not None:
            return
        self.t_work_host_s = t_host
        if self.t_attempt_host_s is not None and t_host > self.t_attempt_host_s:
            self.store.add_phase(self.device, self.job.job_id, self.attempt, "setup", 0,
                                 self.t_attempt_host_s, t_host)


@dataclass(frozen=True)
class _AgentPower:
    """A power reading the agent streamed (Pi 5 PMIC), in the recorder's sample shape."""

    t_host_s: float
    power_w: float
    t_meter_s: float
    volts: float | None = None
    amps: float | None = None
