"""Running a plan on an inventory: one thread per device, one job at a time per device.

Every device thread opens its transport (an unreachable device is recorded and
skipped), deploys the data sets, runs its idle baseline, then takes the next
job it may run from a shared queue (jobs pinned to names or tags go only to
matching devices). Each job: clock offset before, the agent's event stream
into the store as it arrives, clock offset after, an outcome from the last
event and the exit code. A job whose device was lost goes back to the queue
until the plan's `max_attempts`; its partial events stay, under their attempt
number. Meters are recorded for the whole run, through `harness.meters`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.checksum import file_sha256
from contract.events import (
    FINAL_KINDS,
    AgentExit,
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
from contract.jobspec import JobSpec
from harness.clock import ClockEstimate, estimate_offset
from harness.errors import DeviceLost, DeviceUnreachable, HarnessUsageError
from harness.plan import eligible
from harness.store import EventRecord, MemorySample, PlannedJob, RunStore
from harness.transport import Transport, make_transport
from harness.watchdog import WatchedStream

FINAL_STATUSES = ("completed", "failed", "oom", "stalled", "timed_out")
# Setup stages long enough to deserve a line of their own in the run's output.
LOGGED_STAGES = ("building kernels",)
# What `--resume` runs again: never started, cut short, or skipped (its device could not be
# reached, had no sftp, had a changed host key: fixable, so the job is not final).
RERUN_STATUSES = ("pending", "running", "incomplete", "interrupted", "skipped")
WAIT_AFTER_STREAM_S = 30.0
COOL_MARGIN_C = 2.0  # a job starts once the board is within this of its idle temperature
STOP_GRACE_S = 5.0


@dataclass
class JobOutcome:
    status: str  # completed | failed | oom | interrupted | lost
    exit_code: int | None
    reason: str | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Progress:
    """What the terminal shows for one device; updated by its thread."""

    device: str
    job_id: str | None = None
    state: str = "waiting"  # waiting, clock, starting, setup: <stage>, running, window <name>
    state_since_s: float | None = None  # host time the state began (for "elapsed")
    epoch: int | None = None
    step: int | None = None  # global step
    loss: float | None = None
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


def classify(exit_code: int | None, last_kind: str | None, stop_requested: bool) -> tuple[str, str]:
    """The job's outcome from the agent's exit code and its last event (status, reason)."""
    if exit_code is None:
        return "lost", "the agent did not exit"
    if exit_code == AgentExit.OK and last_kind == "job_end":
        return "completed", "ok"
    if exit_code == AgentExit.OUT_OF_MEMORY:
        return "oom", "out of memory (MemoryError in the agent)"
    if exit_code == AgentExit.INTERRUPTED or stop_requested:
        return "interrupted", "stopped by a signal"
    if exit_code < 0:
        name = _signal_name(-exit_code)
        if -exit_code == signal.SIGKILL:
            return "oom", f"killed by {name} (likely the out-of-memory killer)"
        return "failed", f"killed by signal {name}"
    if exit_code == AgentExit.BAD_SPEC:
        return "failed", "the agent refused the job spec"
    if exit_code == AgentExit.OK:
        return "lost", "the event stream ended before job_end"
    return "failed", f"the job crashed (exit code {exit_code})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def agent_power_model(device: Any) -> dict[str, Any] | None:
    """A remote device's `modeled` power source runs in its agent, from its own load (a
    host-side model would measure the host); the local device's is read on the host."""
    meter = getattr(device, "meter", None) or {}
    if meter.get("type") != "modeled" or getattr(device, "transport", "local") == "local":
        return None
    from harness.meters import power_profile

    profile = power_profile(meter, device.name)
    return {"profile": profile.name, "idle_w": profile.idle_w, "busy_w": profile.busy_w}


class JobQueue:
    """Jobs waiting for a device; a device takes the first one it may run."""

    def __init__(self, jobs: list[PlannedJob]) -> None:
        self._jobs = list(jobs)
        self._lock = threading.Lock()

    def take(self, device: Any) -> PlannedJob | None:
        with self._lock:
            for index, job in enumerate(self._jobs):
                if eligible(job, device.name, device.tags):
                    return self._jobs.pop(index)
        return None

    def put_back(self, job: PlannedJob) -> None:
        with self._lock:
            self._jobs.insert(0, job)

    def remaining(self) -> list[PlannedJob]:
        with self._lock:
            return list(self._jobs)


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


class DeviceWorker:
    """The thread of one device: open, deploy, idle baseline, jobs, close."""

    def __init__(self, device: Any, run: Runner) -> None:
        self.device = device
        self.run = run
        self.progress = Progress(device.name)
        self.thread = threading.Thread(target=self._main, name=f"device {device.name}", daemon=True)
        self.current = None
        self.idle_temp_c: float | None = None  # the board at rest (its idle baseline)

    def _main(self) -> None:
        run = self.run
        store = run.store
        try:
            transport = run.transport_factory(self.device)
            transport.open()
        except (DeviceUnreachable, DeviceLost) as exc:
            self.progress.set_state("unreachable")
            store.set_device_status(self.device.name, "unreachable", str(exc))
            run.log(f"[{self.device.name}] unreachable, skipped: {exc}")
            return
        except Exception as exc:  # a bug or bad setting: recorded, the other devices go on
            self.progress.set_state("error")
            store.set_device_status(self.device.name, "error", f"{type(exc).__name__}: {exc}")
            run.log(f"[{self.device.name}] error, skipped: {type(exc).__name__}: {exc}")
            return
        try:
            store.set_device_status(self.device.name, "running")
            transport.ensure_deployed(run.dataset_files)
            first = True
            while not run.stop_requested.is_set():
                job = run.next_job(self.device)
                if job is None:
                    break
                if not first and run.cooldown_s > 0 and job.kind != "idle":
                    self.progress.set_state("cooling down")
                    run.stop_requested.wait(run.cooldown_s)
                first = False
                self._run_with_retries(transport, job)
            store.set_device_status(self.device.name, "done")
        except (DeviceUnreachable, DeviceLost) as exc:
            store.set_device_status(self.device.name, "lost", str(exc))
            run.log(f"[{self.device.name}] lost: {exc}")
        except Exception as exc:
            store.set_device_status(self.device.name, "error", f"{type(exc).__name__}: {exc}")
            run.log(f"[{self.device.name}] error: {type(exc).__name__}: {exc}")
        finally:
            self.progress.set_state("done" if not run.stop_requested.is_set() else "stopped")
            self.progress.job_id = None
            transport.close()

    def _run_with_retries(self, transport: Transport, job: PlannedJob) -> None:
        run = self.run
        attempt = run.next_attempt(job.job_id)
        try:
            outcome = self._run_job(transport, job, attempt)
        except DeviceLost as exc:
            outcome = JobOutcome("lost", None, str(exc))
        status = outcome.status
        if status == "lost":
            if attempt < run.max_attempts and not run.stop_requested.is_set():
                run.queue.put_back(job)
                status = "incomplete"
                outcome.reason = f"{outcome.reason}; will retry"
            else:
                status = "incomplete"
        run.store.finish_job(job.job_id, status, outcome.exit_code, outcome.reason, time.time())
        run.store.set_result(
            job.job_id, self.device.name, attempt, status, job.method, outcome.metrics
        )
        if status == "completed":
            self.progress.done += 1
        else:
            self.progress.failed += 1
        run.log(
            f"[{self.device.name}] {job.job_id} (attempt {attempt}): {status}"
            + ("" if status == "completed" else f" - {outcome.reason}")
        )
        if outcome.status == "lost":
            estimate_offset(transport, samples=1)  # DeviceLost here ends this device's thread

    def _run_job(self, transport: Transport, job: PlannedJob, attempt: int) -> JobOutcome:
        run = self.run
        store = run.store
        name = self.device.name
        progress = self.progress
        progress.job_id, progress.job_started_s = job.job_id, time.time()
        progress.set_state("clock")
        progress.epoch = progress.step = progress.loss = progress.steps_per_epoch = None
        progress.epochs, progress.max_steps = job.spec.get("epochs"), job.spec.get("max_steps")
        before = estimate_offset(transport)
        store.add_clock_offset(
            name,
            job.job_id,
            attempt,
            "before",
            before.t_host_s,
            before.offset_s,
            before.rtt_s,
            before.error_s,
            before.samples,
        )
        cool_to_c = None
        if job.kind != "idle" and run.cooldown_s > 0 and self.idle_temp_c is not None:
            cool_to_c = round(self.idle_temp_c + COOL_MARGIN_C, 1)
        spec = run.device_spec(job, self.device, cool_to_c)
        t_attempt = time.time()
        store.start_job(job.job_id, name, attempt, t_attempt)
        self.progress.set_state("starting")
        remote = transport.start_job(spec)
        recorder = StreamRecorder(store, name, job, attempt, before, self.progress, t_attempt,
                                  log=run.log)
        with run.lock:
            run.running[name] = remote
            stopped_before_registered = run.stop_requested.is_set()
        if stopped_before_registered:  # Runner.stop() took its list of agents before this one
            remote.stop(STOP_GRACE_S)
        stream = WatchedStream(
            remote, spec.limits.stall_timeout_s, spec.limits.wall_clock_s, STOP_GRACE_S
        )
        try:
            for line_no, line in stream.lines():
                recorder.line(line_no, line)
            exit_code = remote.wait(WAIT_AFTER_STREAM_S)
            if exit_code is None:
                remote.stop(STOP_GRACE_S)
                exit_code = remote.wait(STOP_GRACE_S)
        finally:
            with run.lock:
                run.running.pop(name, None)
        status, reason = classify(exit_code, recorder.last_kind, run.stop_requested.is_set())
        if stream.verdict is not None and not run.stop_requested.is_set():
            status, reason = stream.verdict
            self.progress.state = status
        if recorder.error and status != "completed":
            reason = f"{reason}: {recorder.error}"
        if recorder.malformed:
            reason = f"{reason}; {recorder.malformed} malformed event line(s)"
        try:
            after = estimate_offset(transport)
            store.add_clock_offset(
                name,
                job.job_id,
                attempt,
                "after",
                after.t_host_s,
                after.offset_s,
                after.rtt_s,
                after.error_s,
                after.samples,
            )
        except DeviceLost:
            status, reason = (
                ("lost", "device lost after the job") if status == "completed" else (status, reason)
            )
        if job.kind == "idle" and recorder.temps_c and status == "completed":
            self.idle_temp_c = sum(recorder.temps_c) / len(recorder.temps_c)
        return JobOutcome(status, exit_code, reason, recorder.metrics)


class Runner:
    """One run of a plan's jobs over devices, into one store."""

    def __init__(
        self,
        store: RunStore,
        devices: list[Any],
        jobs: list[PlannedJob],
        dataset_files: dict[str, Path],
        *,
        max_attempts: int,
        cooldown_s: float,
        attempts: dict[str, int],
        log: Callable[[str], None],
        transport_factory: Callable[[Any], Transport] = make_transport,
        script_files: dict[str, Path] | None = None,
        checksums: dict[Path, str] | None = None,
    ) -> None:
        self.store = store
        self.devices = devices
        self.queue = JobQueue(jobs)
        self.datasets = dataset_files
        self.script_files = dict(script_files or {})  # script name -> the run's copy
        # deployed to every device by checksum (into data/, beside the data sets): each file
        # hashed once per run (`checksums`, as the manifest recorded them)
        files = sorted(set(dataset_files.values()) | set(self.script_files.values()))
        known = checksums or {}
        self.dataset_files = {path: known.get(path) or file_sha256(path) for path in files}
        self.max_attempts = max_attempts
        self.cooldown_s = cooldown_s
        self._attempts = dict(attempts)
        self.log = log
        self.transport_factory = transport_factory
        self.stop_requested = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, Any] = {}
        self.workers = [DeviceWorker(device, self) for device in devices]
        for worker in self.workers:
            worker.progress.jobs_total = sum(
                eligible(job, worker.device.name, worker.device.tags) for job in jobs)

    def next_job(self, device: Any) -> PlannedJob | None:
        return self.queue.take(device)

    def next_attempt(self, job_id: str) -> int:
        with self.lock:
            self._attempts[job_id] = self._attempts.get(job_id, 0) + 1
            return self._attempts[job_id]

    def device_spec(self, job: PlannedJob, device: Any = None,
                    cool_to_c: float | None = None) -> JobSpec:
        """The job's spec with the data set's (a script's) host path and checksum filled in,
        the device's `modeled` power source when the agent computes it, and `cool_to_c`:
        the temperature the agent waits for in setup (up to the plan's
        `telemetry.cool_max_s`) after the cooldown; validated."""
        spec = dict(job.spec)
        model = agent_power_model(device) if device is not None else None
        if model is not None:
            spec["telemetry"] = {**spec.get("telemetry", {}), "power_model": model}
        if cool_to_c is not None:
            spec["telemetry"] = {**spec.get("telemetry", {}), "cool_to_c": cool_to_c}
        if job.dataset is not None:
            path = self.datasets[job.dataset]
            spec["dataset"] = {"name": job.dataset, "path": str(path),
                               "sha256": self.dataset_files[path]}
        if job.kind == "script":
            path = self.script_files[spec["script"]["name"]]
            spec["script"] = {**spec["script"], "path": str(path),
                              "sha256": self.dataset_files[path]}
        return JobSpec.from_dict(spec)

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def alive(self) -> bool:
        return any(worker.thread.is_alive() for worker in self.workers)

    def finish(self) -> None:
        """After the threads: jobs no device took are recorded as skipped (unless stopped)."""
        if self.stop_requested.is_set():
            return
        for job in self.queue.remaining():
            self.store.finish_job(
                job.job_id, "skipped", None, "no reachable device may run it", time.time()
            )

    def stop(self) -> None:
        """Stop every running agent (SIGTERM, then SIGKILL) and let the threads finish."""
        with self.lock:
            self.stop_requested.set()
            running = list(self.running.values())
        for remote in running:
            remote.stop(STOP_GRACE_S)
        for worker in self.workers:
            worker.thread.join(STOP_GRACE_S + 10)


def check_pins(jobs: list[PlannedJob], devices: list[Any], plan_path: Path) -> None:
    """Refuse a job pinned to names or tags that no inventory device has."""
    for job in jobs:
        if job.pinned and not any(eligible(job, d.name, d.tags) for d in devices):
            raise HarnessUsageError(
                f"{plan_path}: job {job.job_id!r} is pinned to {', '.join(job.pinned)}, "
                "which no inventory device has (names or tags)"
            )
