"""Running a plan on an inventory: one thread per device, one job at a time per device.

Every device thread opens its transport (an unreachable device is recorded and
skipped), deploys the data sets, runs its idle baseline, then takes the next
job it may run from a shared queue (jobs pinned to names or tags go only to
matching devices). Each job: clock offset before, the agent's event stream
into the store as it arrives (through `harness.recorder`: the workers write no rows
themselves), clock offset after, an outcome from the last event and the exit code. A
job whose device was lost goes back to the queue until the plan's `max_attempts`; its
partial events stay, under their attempt number. Meters are recorded for the whole run,
through `harness.meters`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.checksum import file_sha256
from contract.events import AgentExit
from contract.jobspec import FileRef, JobSpec
from harness.clock import estimate_offset
from harness.errors import DeviceLost, DeviceUnreachable, HarnessUsageError
from harness.plan import eligible
from harness.recorder import JobOutcome, Progress, Recorder
from harness.store import PlannedJob
from harness.transport import Transport, make_transport
from harness.watchdog import WatchedStream

# What `--resume` runs again: never started, cut short, or skipped (its device could not be
# reached, had no sftp, had a changed host key: fixable, so the job is not final).
RERUN_STATUSES = ("pending", "running", "incomplete", "interrupted", "skipped")
WAIT_AFTER_STREAM_S = 30.0
COOL_MARGIN_C = 2.0  # a job starts once the board is within this of its idle temperature
STOP_GRACE_S = 5.0


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


class DeviceWorker:
    """The thread of one device: open, deploy, idle baseline, jobs, close. It talks to the
    run only through the `Runner`'s methods and to the store only through its `Recorder`."""

    def __init__(self, device: Any, run: Runner) -> None:
        self.device = device
        self.run = run
        self.record = run.recorder
        self.progress = Progress(device.name)
        self.thread = threading.Thread(target=self._main, name=f"device {device.name}", daemon=True)
        self.idle_temp_c: float | None = None  # the board at rest (its idle baseline)

    def _main(self) -> None:
        run, name = self.run, self.device.name
        try:
            transport = run.transport_factory(self.device)
            transport.open()
        except (DeviceUnreachable, DeviceLost) as exc:
            self.progress.set_state("unreachable")
            self.record.device_status(name, "unreachable", str(exc))
            run.log(f"[{name}] unreachable, skipped: {exc}")
            return
        except Exception as exc:  # a bug or bad setting: recorded, the other devices go on
            self.progress.set_state("error")
            self.record.device_status(name, "error", f"{type(exc).__name__}: {exc}")
            run.log(f"[{name}] error, skipped: {type(exc).__name__}: {exc}")
            return
        try:
            self.record.device_status(name, "running")
            transport.ensure_deployed(run.files)
            first = True
            while not run.stopping:
                job = run.next_job(self.device)
                if job is None:
                    break
                if not first and run.cooldown_s > 0 and job.kind != "idle":
                    self.progress.set_state("cooling down")
                    run.pause(run.cooldown_s)
                first = False
                self._run_with_retries(transport, job)
            self.record.device_status(name, "done")
        except (DeviceUnreachable, DeviceLost) as exc:
            self.record.device_status(name, "lost", str(exc))
            run.log(f"[{name}] lost: {exc}")
        except Exception as exc:
            self.record.device_status(name, "error", f"{type(exc).__name__}: {exc}")
            run.log(f"[{name}] error: {type(exc).__name__}: {exc}")
        finally:
            self.progress.set_state("done" if not run.stopping else "stopped")
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
            if attempt < run.max_attempts and not run.stopping:
                run.retry(job)
                outcome.reason = f"{outcome.reason}; will retry"
            status = "incomplete"
        self.record.outcome(self.device.name, job, attempt, status, outcome)
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
        name = self.device.name
        progress = self.progress
        progress.job_id, progress.job_started_s = job.job_id, time.time()
        progress.set_state("clock")
        progress.epoch = progress.step = progress.loss = progress.steps_per_epoch = None
        progress.epochs, progress.max_steps = job.spec.get("epochs"), job.spec.get("max_steps")
        before = estimate_offset(transport)
        self.record.clock_offset(name, job.job_id, attempt, "before", before)
        cool = job.kind != "idle" and run.cooldown_s > 0 and self.idle_temp_c is not None
        spec = run.device_spec(job, self.device, self.idle_temp_c if cool else None)
        t_attempt = time.time()
        recorder = self.record.attempt(name, job, attempt, before, progress, t_attempt)
        progress.set_state("starting")
        remote = transport.start_job(spec)
        if not run.register_agent(name, remote):  # Runner.stop() took its list before this one
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
            run.unregister_agent(name)
        status, reason = classify(exit_code, recorder.last_kind, run.stopping)
        if stream.verdict is not None and not run.stopping:
            status, reason = stream.verdict
            progress.state = status
        if recorder.error and status != "completed":
            reason = f"{reason}: {recorder.error}"
        if recorder.malformed:
            reason = f"{reason}; {recorder.malformed} malformed event line(s)"
        try:
            self.record.clock_offset(name, job.job_id, attempt, "after",
                                     estimate_offset(transport))
        except DeviceLost:
            status, reason = (
                ("lost", "device lost after the job") if status == "completed" else (status, reason)
            )
        if job.kind == "idle" and recorder.temps_c and status == "completed":
            self.idle_temp_c = sum(recorder.temps_c) / len(recorder.temps_c)
        return JobOutcome(status, exit_code, reason, recorder.metrics)


class Runner:
    """One run of a plan's jobs over devices, into one store (through its `Recorder`)."""

    def __init__(
        self,
        recorder: Recorder,
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
        self.recorder = recorder
        self.devices = devices
        self._queue = JobQueue(jobs)
        self.datasets = dataset_files
        self.script_files = dict(script_files or {})  # script name -> the run's copy
        # deployed to every device by checksum (into data/, beside the data sets): each file
        # hashed once per run (`checksums`, as the manifest recorded them)
        files = sorted(set(dataset_files.values()) | set(self.script_files.values()))
        known = checksums or {}
        self.files = {path: known.get(path) or file_sha256(path) for path in files}
        self.max_attempts = max_attempts
        self.cooldown_s = cooldown_s
        self._attempts = dict(attempts)
        self.log = log
        self.transport_factory = transport_factory
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, Any] = {}  # device -> its running agent (what stop() stops)
        self.workers = [DeviceWorker(device, self) for device in devices]
        for worker in self.workers:
            worker.progress.jobs_total = sum(
                eligible(job, worker.device.name, worker.device.tags) for job in jobs)

    # ------------------------------------------------------------ what the workers call

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, seconds: float) -> None:
        """Wait `seconds` (a cooldown), or less if the run is stopped meanwhile."""
        self._stop.wait(seconds)

    def next_job(self, device: Any) -> PlannedJob | None:
        return self._queue.take(device)

    def retry(self, job: PlannedJob) -> None:
        """A job whose device was lost goes back to the front of the queue."""
        self._queue.put_back(job)

    def next_attempt(self, job_id: str) -> int:
        with self._lock:
            self._attempts[job_id] = self._attempts.get(job_id, 0) + 1
            return self._attempts[job_id]

    def register_agent(self, device: str, remote: Any) -> bool:
        """The device's agent is running (stop() stops it); False: the run is already
        stopping, and stop() did not see this agent."""
        with self._lock:
            self._running[device] = remote
            return not self._stop.is_set()

    def unregister_agent(self, device: str) -> None:
        with self._lock:
            self._running.pop(device, None)

    def device_spec(
        self, job: PlannedJob, device: Any = None, idle_temp_c: float | None = None
    ) -> JobSpec:
        """The attempt's spec, built once from the job's description: the data set's (a
        script's) host path and checksum, the device's `modeled` power source when the agent
        computes it, and after a cooldown the temperature to wait for (the device's idle
        baseline's plus a margin); validated."""
        telemetry = dict(job.spec.get("telemetry") or {})
        model = agent_power_model(device) if device is not None else None
        if model is not None:
            telemetry["power_model"] = model
        if idle_temp_c is not None:  # the agent waits (in setup) for the board to cool
            telemetry["cool_to_c"] = round(idle_temp_c + COOL_MARGIN_C, 1)
        dataset = self._located(self.datasets[job.dataset]) if job.dataset is not None else None
        script = (self._located(self.script_files[job.spec["script"]["name"]])
                  if job.kind == "script" else None)
        return JobSpec.from_description({**job.spec, "telemetry": telemetry},
                                        dataset=dataset, script=script)

    def _located(self, path: Path) -> FileRef:
        return FileRef(str(path), self.files[path])

    # ------------------------------------------------------------ what the service calls

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def alive(self) -> bool:
        return any(worker.thread.is_alive() for worker in self.workers)

    def finish(self) -> None:
        """After the threads: jobs no device took are recorded as skipped (unless stopped)."""
        if self.stopping:
            return
        for job in self._queue.remaining():
            self.recorder.skipped(job, "no reachable device may run it")

    def stop(self) -> None:
        """Stop every running agent (SIGTERM, then SIGKILL) and let the threads finish."""
        with self._lock:
            self._stop.set()
            running = list(self._running.values())
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
