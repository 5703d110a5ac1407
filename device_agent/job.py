"""Running one job on the device: check the data, run the engine, stream what happens.

The engine (`trainers`) is imported only here and only for training methods, so
an idle baseline, `clock` and `facts` never load torch. The outcome is an
`AgentExit` code plus a last event (`job_end`, `error` or `interrupted`) and a
`result.json` in the output directory.
"""

from __future__ import annotations

import json
import math
import resource
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from contract.checksum import file_sha256
from contract.events import (
    AgentExit,
    EpochEnd,
    EpochStart,
    Error,
    Interrupted,
    JobEnd,
    JobStart,
    Setup,
    Step,
)
from contract.jobspec import JobSpec
from device_agent import windows
from device_agent.conditions import (
    cool_down,
    cpu_mhz,
    end_conditions,
    start_conditions,
    temperature_c,
)
from device_agent.events import EventWriter, Heartbeat
from device_agent.facts import pi_model
from device_agent.sampler import (
    BoardStateSampler,
    MemorySampler,
    ModeledPowerSampler,
    PeriodicSampler,
    PmicSampler,
)
from trainers.procmem import MemoryReading, read_memory, reset_peak_rss

UNBOUNDED_EPOCHS = 1_000_000
OOM_MESSAGES = ("can't allocate memory", "out of memory", "cannot allocate memory")


class JobInterrupted(BaseException):
    """Raised in the job thread by a stop signal or when the host has gone."""


class ScriptFailed(RuntimeError):
    """The user's script exited with a non-zero status."""


class DatasetMismatch(RuntimeError):
    """The data set file on the device is missing or its checksum differs from the spec."""


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or the allocator's refusal that torch reports as a RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such a value is sent as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _epoch_end(record: Any) -> EpochEnd:
    """The engine's epoch record (training: `EpochRecord`; continual: `ExperienceRecord`)."""
    return EpochEnd(
        epoch=record.epoch,
        steps=record.steps,
        train_loss=record.train_loss,
        test_loss=record.test_loss,
        test_accuracy=record.test_accuracy,
        seconds=record.seconds,
        train_accuracy=getattr(record, "train_accuracy", None),
        lr=_finite_or_none(getattr(record, "lr", None)),  # Bop has no lr: the engine says NaN
        experience=getattr(record, "experience", None),
        train_samples=getattr(record, "train_samples", None),
        replay_entries=getattr(record, "replay_entries", None),
        buffer_bytes=getattr(record, "buffer_bytes", None),
        trainable_bytes=getattr(record, "trainable_bytes", None),
    )


class StreamingCallbacks:
    """The engine's training callbacks, turned into events; also where a stop lands."""

    def __init__(self, writer: EventWriter, sampler: MemorySampler, step_every: int) -> None:
        self._writer = writer
        self._sampler = sampler
        self._step_every = step_every
        self.steps = 0
        self.epoch_records: list[EpochEnd] = []
        self.peak_tensor_bytes: int | None = None
        self.mhz_seen: list[float] = []

    def _check_host(self) -> None:
        if self._writer.host_gone:
            raise JobInterrupted("host gone (stdout closed)")

    def on_setup(self, stage: str, **info: Any) -> None:
        """A setup stage begins (loading data, building model): the host shows it."""
        self._check_host()
        self._writer.emit(Setup(stage=stage, **info))

    def on_epoch_start(self, epoch: int) -> None:
        self._check_host()
        self._writer.emit(EpochStart(epoch=epoch))

    def on_step(self, record: Any) -> None:
        """The engine's step record (`StepRecord`, or continual learning's `ContinualStep`)."""
        self.steps += 1
        peak = getattr(record, "peak_tensor_bytes", None)
        if peak is not None:
            self._sampler.peak_tensor_bytes = peak
            self.peak_tensor_bytes = max(self.peak_tensor_bytes or 0, peak)
        self._sampler.step = self.steps
        if self.steps % self._step_every == 0:
            self._writer.emit(Step(
                global_step=self.steps,
                epoch=record.epoch,
                step=record.step,
                loss=record.loss,
                step_time_s=record.step_time_s,
                peak_tensor_bytes=peak,
            ))
        self._check_host()

    def on_epoch_end(self, record: Any) -> None:
        self.mhz_seen.append(cpu_mhz())  # the CPU's frequency over the job, once an epoch
        payload = _epoch_end(record)
        self.epoch_records.append(payload)
        self._writer.emit(payload)
        self._check_host()


def _power_sampler(spec: JobSpec, writer: EventWriter) -> PeriodicSampler | None:
    """The agent's own power source: the host's `modeled` source for this device (computed
    here, from this device's load), else a Pi 5's PMIC, else none (a host-read meter)."""
    model = spec.telemetry.power_model
    if model is not None:
        return ModeledPowerSampler(writer, spec.telemetry.power_hz, model.idle_w, model.busy_w,
                                   model.profile)
    pmic_path = PmicSampler.available(pi_model())
    return PmicSampler(writer, spec.telemetry.power_hz, pmic_path) if pmic_path else None


def _apply_limits(spec: JobSpec) -> int | None:
    extra = spec.limits.extra_address_space_bytes
    if extra is None:
        return None
    limit = (read_memory().vm_bytes or 0) + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return limit


def _run_idle(spec: JobSpec, writer: EventWriter) -> dict[str, Any]:
    deadline = time.monotonic() + (spec.method.duration_s or 0.0)
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))
        if writer.host_gone:
            raise JobInterrupted("host gone (stdout closed)")
    return {"duration_s": spec.method.duration_s}


def _engine_stage() -> str:
    """'building kernels' when the engine's fused kernels are not in the cache yet (a minute
    or more on a Pi), else 'loading engine'."""
    try:
        from trainers import kernel_cache

        return "loading engine" if kernel_cache.current_build().built else "building kernels"
    except Exception:  # no compiler, odd cache: loading says the rest
        return "loading engine"


def _check_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise DatasetMismatch(f"{what} file {path} not found")
    actual = file_sha256(path)
    if actual != sha256:
        raise DatasetMismatch(f"{what} file {path} has sha256 {actual}, the job expects {sha256}")


def _run_script(spec: JobSpec, writer: EventWriter) -> dict[str, Any]:
    """Run the user's script in this process as `__main__` (so the samplers measure it and
    its `device_agent.window` calls stream through `writer`), with its arguments in argv.
    Its prints go to stderr: stdout carries the events alone."""
    assert spec.script is not None
    path = Path(spec.script.path).resolve()
    writer.keep_stdout_for_events()
    windows.attach(writer)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *spec.script.args]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise ScriptFailed(f"script {spec.script.name} exited with status {exc.code}") from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        unclosed = windows.open_windows()
        windows.attach(None)
    return {"script": spec.script.name, "unclosed_windows": ",".join(unclosed) or None}


def _run_training(spec: JobSpec, callbacks: StreamingCallbacks) -> dict[str, Any]:
    assert spec.dataset is not None  # validated: only idle has no dataset
    if spec.method.name == "cwr":
        from trainers.continual.runner import ContinualConfig, run_continual

        continual = ContinualConfig(
            model=spec.model,
            dataset=spec.dataset.name,
            data_dir=spec.dataset.path,
            epochs_per_experience=spec.epochs or 1,
            batch_size=spec.batch_size,
            seed=spec.seed,
            lr=spec.method.lr,
        )
        result = run_continual(continual, callbacks)
        return {"seconds": result.seconds, "latent_layer": result.latent_layer}
    from trainers.methods import make_recipe
    from trainers.train import TrainConfig, train

    recipe = make_recipe(
        spec.method.name,
        optimizer=spec.method.optimizer,
        enable=spec.method.enable,
        disable=spec.method.disable,
        lr=spec.method.lr,
        momentum_format=spec.method.momentum_format,
    )
    config = TrainConfig(
        model=spec.model,
        dataset=spec.dataset.name,
        data_dir=spec.dataset.path,
        recipe=recipe,
        epochs=spec.epochs or UNBOUNDED_EPOCHS,  # steps-only job: max_steps ends it
        batch_size=spec.batch_size,
        seed=spec.seed,
        max_steps=spec.max_steps,
        lr_plateau=spec.method.lr_plateau,
        tensor_peak_steps=spec.telemetry.tensor_peak_steps,
    )
    result = train(config, callbacks)
    return {"seconds": result.seconds}


def _job_end(
    callbacks: StreamingCallbacks, result: dict[str, Any], seconds_total: float,
    baseline: MemoryReading, end: MemoryReading,
) -> JobEnd:
    """The job's figures: the last epoch's, the run's, and the process memory's."""
    epochs = callbacks.epoch_records
    last = epochs[-1] if epochs else None
    return JobEnd(
        epochs=len(epochs),
        steps=callbacks.steps,
        seconds_total=seconds_total,
        train_loss=last.train_loss if last else None,
        train_accuracy=last.train_accuracy if last else None,
        test_loss=last.test_loss if last else None,
        test_accuracy=last.test_accuracy if last else None,
        mean_epoch_s=sum(e.seconds for e in epochs) / len(epochs) if epochs else None,
        peak_tensor_bytes=callbacks.peak_tensor_bytes,
        peak_hwm_bytes=end.hwm_bytes,
        peak_rss_delta_bytes=(
            end.hwm_bytes - baseline.rss_bytes
            if end.hwm_bytes is not None and baseline.rss_bytes is not None
            else None
        ),
        **result,
    )


def run_job(spec: JobSpec, writer: EventWriter, out_dir: Path) -> AgentExit:
    """Run `spec` to an outcome. Signals SIGTERM/SIGINT end it as interrupted."""
    writer.job_id = spec.job_id
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise JobInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sampler = MemorySampler(writer, spec.telemetry.memory_hz)
    power = _power_sampler(spec, writer)
    board = BoardStateSampler.for_this_board(writer)  # temperature, throttling: <= 1 Hz
    callbacks = StreamingCallbacks(writer, sampler, spec.telemetry.step_every)
    heartbeat = Heartbeat(writer, spec.telemetry.heartbeat_s).start()  # also through builds

    def stop_samplers() -> None:  # before the last event, so it is the last line
        heartbeat.stop()
        sampler.stop()
        if power:
            power.stop()
        if board:
            board.stop()

    outcome: dict[str, Any]
    started = time.monotonic()
    try:
        if spec.script is not None:
            _check_file(Path(spec.script.path), spec.script.sha256, "script")
        if spec.dataset is not None:
            writer.emit(Setup(stage="checking data"))
            _check_file(Path(spec.dataset.path), spec.dataset.sha256, "data set")
        setup_s = 0.0
        if spec.method.name not in ("idle", "script"):  # the engine before the baseline
            writer.emit(Setup(stage=_engine_stage()))
            from trainers import native
            from trainers.train import load_engine

            load_engine()  # builds the kernels if `devices setup` did not: setup, not the job
            setup_s = native.build_seconds
            started = time.monotonic()  # the job's figures start here, after any build
        baseline = read_memory()
        hwm_reset = reset_peak_rss()
        sampler.start()  # threads first: their stacks must not count against the limit
        if power:
            power.start()
        if board:
            board.start()
        cooled = None
        if spec.telemetry.cool_to_c is not None:  # setup: the board back to idle temperature
            cooled = cool_down(spec.telemetry.cool_to_c, spec.telemetry.cool_max_s)
        limit = _apply_limits(spec)
        conditions = {**start_conditions(spec), "cooldown": cooled,
                      "temp_c_start": temperature_c()}
        writer.emit(JobStart(
            spec=spec,
            rss_start_bytes=baseline.rss_bytes,
            hwm_reset=hwm_reset,
            address_space_limit_bytes=limit,
            power_source=power.source if power else None,
            kernel_build_s=round(setup_s, 1),
            conditions=conditions,
        ))
        sampler.begin()
        if power:
            power.begin()
        if board:
            board.begin()
        if spec.method.name == "idle":
            result = _run_idle(spec, writer)
        elif spec.script is not None:
            result = _run_script(spec, writer)
        else:
            result = _run_training(spec, callbacks)
        stop_samplers()
        extra = dict(result)
        if board:
            extra.update(board.state.to_metrics())
        extra["conditions"] = end_conditions(
            conditions, board.state.to_metrics() if board else None, callbacks.mhz_seen)
        if isinstance(power, PmicSampler):
            extra.update(pmic_reads=power.reads, pmic_cpu_share=power.cpu_share)
        job_end = _job_end(callbacks, extra, time.monotonic() - started, baseline, read_memory())
        outcome = {"status": "completed", "exit_code": int(AgentExit.OK),
                   "metrics": job_end.to_data()}
        writer.emit(job_end)
    except JobInterrupted as exc:
        stopping = True
        stop_samplers()
        outcome = {"status": "interrupted", "exit_code": int(AgentExit.INTERRUPTED)}
        writer.emit(Interrupted(reason=str(exc), steps=callbacks.steps))
    except BaseException as exc:  # every failure becomes an error event
        stopping = True
        stop_samplers()
        oom = is_out_of_memory(exc)
        code = AgentExit.OUT_OF_MEMORY if oom else AgentExit.CRASHED
        outcome = {"status": "oom" if oom else "failed", "exit_code": int(code)}
        writer.emit(Error(
            type=type(exc).__name__,
            message=str(exc)[:2000],
            traceback=traceback.format_exc()[-8000:],
            oom=oom,
            steps=callbacks.steps,
        ))
    finally:
        stopping = True
        stop_samplers()
    outcome["job_id"] = spec.job_id
    (out_dir / "result.json").write_text(json.dumps(outcome, indent=1, default=str))
    return AgentExit(outcome["exit_code"])
