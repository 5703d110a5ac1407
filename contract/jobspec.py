"""The job spec: everything one device needs to run one job, nothing host-specific.

Both sides import this module, so it uses the standard library only (no torch,
no pydantic: a Pi 3B+ has 1 GiB). Every record is a frozen dataclass with explicit
validation against the engine's vocabulary (`contract.vocabulary`); a bad value
raises `SpecError`, whose message names the field and the value. Example
(`schema_version` 1)::

    {"schema_version": 1, "job_id": "mlp-digits-lowmem-b100-s0-r0",
     "method": {"name": "lowmem", "optimizer": "adam", "lr": 0.001,
                "enable": [], "disable": [], "momentum_format": null,
                "lr_plateau": false, "duration_s": null},
     "model": "mlp",
     "dataset": {"name": "digits", "path": "data/digits.npz", "sha256": "..."},
     "batch_size": 100, "epochs": 3, "max_steps": null, "seed": 0,
     "eval_every_epochs": 1,
     "telemetry": {"memory_hz": 10.0, "power_hz": 5.0, "step_every": 1,
                   "tensor_peak_steps": 2},
     "limits": {"extra_address_space_bytes": null}}

Method `script` runs the user's script named in `script` ({"name", "path", "sha256",
"args"}) in the agent, like a built-in job (`model` and `dataset` null); inside it,
`device_agent.window("NAME")` marks phases, streamed as `window_start` / `window_end`.

Method `idle` runs no training: the agent rests `method.duration_s` seconds
while its samplers run (the idle baseline); `model` and `dataset` are null.
`dataset.path` is where the file is on the device (`contract.layout.device_data_path`).

A job as a plan describes it names its files but does not locate them: `dataset` is
`{"name"}` and `script` `{"name", "args"}`, without path or checksum, because the host
prepares the data set (and copies the script) only when a run starts. `JobSpec.describe`
checks such a description field by field, and `JobSpec.from_description` builds the job's
one spec from it once the files' paths and checksums are known (`FileRef`): no spec with a
made-up checksum ever exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract.fields import (
    SpecError,
    bool_field,
    float_field,
    int_field,
    name_list_field,
    refuse_constant,
    reject_unknown,
    require_mapping,
    str_field,
)
from contract.layout import device_data_path
from contract.vocabulary import (
    DATASETS,
    IDLE_METHOD,
    LOWMEM_SWITCHES,
    LOWMEM_VARIANTS,
    METHODS,
    MODELS,
    OPTIMIZERS,
    SCRIPT_METHOD,
    check_momentum_format,
    default_optimizer,
)

JOB_SCHEMA_VERSION = 1
# Job ids become file and directory names on the device: keep them to a safe alphabet.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_EPOCHS = 1_000_000
MAX_LIMIT_S = 30 * 86_400.0  # the longest stall timeout, wall-clock limit or heartbeat
MAX_BATCH_SIZE = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's and most generators' seed range


@dataclass(frozen=True)
class MethodSpec:
    """Which method and its options (the engine's `make_recipe` arguments, plus idle)."""

    name: str
    optimizer: str | None = None  # None: the method's default (bop for bop, adam otherwise)
    lr: float = 1e-3
    enable: tuple[str, ...] = ()  # lowmem switches to turn on
    disable: tuple[str, ...] = ()  # lowmem switches to turn off
    momentum_format: str | None = None  # Bop low-bit momentum "E,M[,bias]" or "auto"
    lr_plateau: bool = False
    duration_s: float | None = None  # idle only: how long to rest

    @classmethod
    def from_dict(cls, data: object, prefix: str = "method.") -> MethodSpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        name = str_field(data.get("name"), prefix + "name", choices=METHODS)
        spec = cls(
            name=name,
            optimizer=str_field(data.get("optimizer"), prefix + "optimizer", True, OPTIMIZERS),
            lr=float_field(data.get("lr", 1e-3), prefix + "lr", positive=True),
            enable=name_list_field(data.get("enable", []), prefix + "enable", LOWMEM_SWITCHES),
            disable=name_list_field(data.get("disable", []), prefix + "disable", LOWMEM_SWITCHES),
            momentum_format=str_field(data.get("momentum_format"), prefix + "momentum_format",
                                      True),
            lr_plateau=bool_field(data.get("lr_plateau", False), prefix + "lr_plateau"),
            duration_s=float_field(data.get("duration_s"), prefix + "duration_s", True,
                                   optional=True),
        )
        if spec.momentum_format is not None:
            check_momentum_format(spec.momentum_format, prefix + "momentum_format")
            if (spec.optimizer or default_optimizer(name)) != "bop":
                raise SpecError(prefix + "momentum_format", spec.momentum_format,
                                "null unless the optimizer is bop")
        chosen = spec.optimizer or default_optimizer(name)
        if spec.lr_plateau and chosen == "bop":  # trainers.train refuses it at run time
            raise SpecError(prefix + "lr_plateau", True,
                            "false with the bop optimizer (it has no learning rate)")
        if name == "cwr":  # the continual-learning run takes the learning rate only
            for option in ("optimizer", "enable", "disable", "momentum_format", "lr_plateau"):
                if data.get(option) not in (None, [], False):
                    raise SpecError(prefix + option, data[option],
                                    "nothing for method cwr (it takes lr only)")
        for variant in spec.enable:  # the engine refuses a variant without its technique
            technique = LOWMEM_VARIANTS.get(variant)
            if technique and not (technique in spec.enable or (
                    name == "lowmem" and technique not in spec.disable)):
                raise SpecError(prefix + "enable", variant,
                                f"{technique!r} on too (the switch is its variant)")
        if name == IDLE_METHOD and spec.duration_s is None:
            raise SpecError(prefix + "duration_s", None, "a positive number for method idle")
        if name != IDLE_METHOD and spec.duration_s is not None:
            raise SpecError(prefix + "duration_s", spec.duration_s, "null unless method is idle")
        return spec


@dataclass(frozen=True)
class FileRef:
    """Where a file a job reads is, and its checksum: known once the host has the file (the
    prepared data set, the run's copy of a script), so a planned job has none."""

    path: str
    sha256: str


def sha256_field(value: object, name: str) -> str:
    """A checksum: 64 lower-case hex digits."""
    sha = str_field(value, name)
    if not SHA256_PATTERN.match(sha):
        raise SpecError(name, sha, "64 lower-case hex digits")
    return sha


@dataclass(frozen=True)
class DatasetRef:
    """A planned job's data set: named, not yet located (see the module's docstring)."""

    name: str

    @classmethod
    def from_dict(cls, data: object, prefix: str = "dataset.") -> DatasetRef:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        return cls(name=str_field(data.get("name"), prefix + "name", choices=DATASETS))


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared canonical data set file on the device, checked by checksum before use."""

    name: str
    path: str  # relative to the agent's working directory, or absolute
    sha256: str

    @classmethod
    def from_dict(cls, data: object, prefix: str = "dataset.") -> DatasetSpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        sha = sha256_field(data.get("sha256"), prefix + "sha256")
        return cls(
            name=str_field(data.get("name"), prefix + "name", choices=DATASETS),
            path=str_field(data.get("path"), prefix + "path"),
            sha256=sha,
        )


@dataclass(frozen=True)
class PowerModelSpec:
    """The device's `modeled` power source, computed by the agent where the load is:
    idle_w + (busy_w - idle_w) x CPU utilisation x (frequency / max frequency)."""

    profile: str
    idle_w: float
    busy_w: float

    @classmethod
    def from_dict(cls, data: object, prefix: str = "telemetry.power_model.") -> PowerModelSpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        spec = cls(
            profile=str_field(data.get("profile"), prefix + "profile"),
            idle_w=float_field(data.get("idle_w"), prefix + "idle_w", positive=True),
            busy_w=float_field(data.get("busy_w"), prefix + "busy_w", positive=True),
        )
        if spec.busy_w < spec.idle_w:
            raise SpecError(prefix + "busy_w", spec.busy_w, f"at least idle_w ({spec.idle_w})")
        return spec


@dataclass(frozen=True)
class ScriptRef:
    """A planned job's script: its name and arguments, not yet located."""

    name: str
    args: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object, prefix: str = "script.") -> ScriptRef:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        return cls(name=_script_name(data, prefix), args=_script_args(data, prefix))


@dataclass(frozen=True)
class ScriptSpec:
    """A user's training script, deployed to the device by checksum, with its arguments."""

    name: str
    path: str  # relative to the agent's working directory, or absolute
    sha256: str
    args: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object, prefix: str = "script.") -> ScriptSpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        name = _script_name(data, prefix)
        sha = sha256_field(data.get("sha256"), prefix + "sha256")
        args = _script_args(data, prefix)
        return cls(name=name, path=str_field(data.get("path"), prefix + "path"), sha256=sha,
                   args=args)


def _script_name(data: Mapping[str, Any], prefix: str) -> str:
    name = str_field(data.get("name"), prefix + "name")
    if not JOB_ID_PATTERN.match(name):
        raise SpecError(prefix + "name", name, "letters, digits, '.', '_', '-'")
    return name


def _script_args(data: Mapping[str, Any], prefix: str) -> tuple[str, ...]:
    args = data.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(prefix + "args", args, "a list of strings")
    return tuple(args)


@dataclass(frozen=True)
class TelemetrySpec:
    """How often the agent samples memory and on-board power, and which steps it reports."""

    memory_hz: float = 10.0
    power_hz: float = 5.0
    step_every: int = 1  # emit a `step` event every N steps
    # the first N training steps run under the engine's tensor ledger (a little slower), so
    # the job reports its tensor-level peak memory beside the process-level one; 0: off
    tensor_peak_steps: int = 2
    power_model: PowerModelSpec | None = None  # a remote device's `modeled` power source
    # before the job (in its setup), wait up to cool_max_s for the board to cool to this
    # temperature (the device's idle baseline's, plus a margin): arms start alike
    cool_to_c: float | None = None
    cool_max_s: float = 120.0
    heartbeat_s: float = 5.0  # a `heartbeat` event this often while the agent lives

    @classmethod
    def from_dict(cls, data: object, prefix: str = "telemetry.") -> TelemetrySpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        spec = cls(
            memory_hz=float_field(data.get("memory_hz", 10.0), prefix + "memory_hz",
                                  positive=True),
            power_hz=float_field(data.get("power_hz", 5.0), prefix + "power_hz", positive=True),
            step_every=int_field(data.get("step_every", 1), prefix + "step_every", minimum=1),
            tensor_peak_steps=int_field(data.get("tensor_peak_steps", 2),
                                        prefix + "tensor_peak_steps", minimum=0),
            power_model=(PowerModelSpec.from_dict(data["power_model"])
                         if data.get("power_model") is not None else None),
            cool_to_c=float_field(data.get("cool_to_c"), prefix + "cool_to_c", optional=True),
            cool_max_s=float_field(data.get("cool_max_s", 120.0), prefix + "cool_max_s",
                                   positive=True),
            heartbeat_s=float_field(data.get("heartbeat_s", 5.0), prefix + "heartbeat_s",
                                    positive=True),
        )
        if not 0.1 <= spec.heartbeat_s <= MAX_LIMIT_S:
            raise SpecError(prefix + "heartbeat_s", spec.heartbeat_s,
                            f"seconds between 0.1 and {MAX_LIMIT_S:g}")
        for name in ("memory_hz", "power_hz"):
            if getattr(spec, name) > 1000:
                raise SpecError(prefix + name, getattr(spec, name), "a rate of at most 1000 Hz")
        return spec


@dataclass(frozen=True)
class LimitsSpec:
    """Resource limits the agent applies to itself before the job runs.

    `extra_address_space_bytes` sets RLIMIT_AS to the agent's address space after
    start-up plus this many bytes: a big host can then behave like a small device.
    The host enforces the other two: no event (heartbeats included) for `stall_timeout_s`
    ends the job as `stalled`, a job running longer than `wall_clock_s` as `timed_out`;
    either way the agent is stopped and the device goes on with its next job.
    """

    extra_address_space_bytes: int | None = None
    stall_timeout_s: float | None = None  # None: no stall detection
    wall_clock_s: float | None = None  # None: no wall-clock limit

    @classmethod
    def from_dict(cls, data: object, prefix: str = "limits.") -> LimitsSpec:
        data = require_mapping(data, prefix.rstrip("."))
        reject_unknown(data, cls, prefix)
        return cls(
            extra_address_space_bytes=int_field(
                data.get("extra_address_space_bytes"),
                prefix + "extra_address_space_bytes",
                minimum=1,
                optional=True,
            ),
            stall_timeout_s=_seconds(data.get("stall_timeout_s"), prefix + "stall_timeout_s"),
            wall_clock_s=_seconds(data.get("wall_clock_s"), prefix + "wall_clock_s"),
        )


def _seconds(value: object, name: str) -> float | None:
    """An optional duration: a finite number of seconds, 1 s to 30 days."""
    seconds = float_field(value, name, positive=True, optional=True)
    if seconds is not None and not 1.0 <= seconds <= MAX_LIMIT_S:
        raise SpecError(name, seconds, f"seconds between 1 and {MAX_LIMIT_S:g}")
    return seconds


@dataclass(frozen=True)
class JobSpec:
    """One job for one device: everything the agent needs, nothing host-specific."""

    job_id: str
    method: MethodSpec
    model: str | None
    dataset: DatasetSpec | None
    batch_size: int = 100
    epochs: int | None = 1
    max_steps: int | None = None  # stop after this many steps in total (None: all epochs)
    seed: int = 0
    eval_every_epochs: int = 1
    telemetry: TelemetrySpec = field(default_factory=TelemetrySpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    script: ScriptSpec | None = None  # method `script` only
    schema_version: int = JOB_SCHEMA_VERSION

    @property
    def is_idle(self) -> bool:
        return self.method.name == IDLE_METHOD

    @classmethod
    def from_dict(cls, data: object) -> JobSpec:
        """Validate a decoded JSON object; raise `SpecError` naming the first bad field."""
        return cls(**_checked_fields(data, located=True))

    @classmethod
    def describe(cls, data: object) -> dict[str, Any]:
        """Check a planned job (its files named, not located: `dataset: {name}`, `script:
        {name, args}`) as `from_dict` checks a spec; returns it with the defaults filled in,
        as the store records it and `harness plan show` prints it."""
        return _plain(_checked_fields(data, located=False))

    @classmethod
    def from_description(
        cls,
        description: Mapping[str, Any],
        *,
        dataset: FileRef | None = None,
        script: FileRef | None = None,
    ) -> JobSpec:
        """The job's spec, built once its files are known: a description (`describe`) with
        the data set's and the script's path and checksum filled in."""
        data = dict(description)
        for key, file in (("dataset", dataset), ("script", script)):
            if file is not None:
                named = require_mapping(data.get(key), key)
                data[key] = {**named, "path": file.path, "sha256": file.sha256}
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        try:
            data = json.loads(text, parse_constant=refuse_constant)
        except json.JSONDecodeError as exc:
            raise SpecError("job", text[:40], f"valid JSON ({exc.msg} at {exc.pos})") from exc
        except (ValueError, RecursionError) as exc:  # NaN / Infinity, absurd nesting
            raise SpecError("job", text[:40], f"valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def on_device(self) -> JobSpec:
        """The spec as the agent reads it: files named where deployment puts them on every
        device (`contract.layout`: data/<file name>), whatever the host's paths."""
        dataset = self.dataset and dataclasses.replace(
            self.dataset, path=device_data_path(self.dataset.path))
        script = self.script and dataclasses.replace(
            self.script, path=device_data_path(self.script.path))
        return dataclasses.replace(self, dataset=dataset, script=script)


def _checked_fields(data: object, located: bool) -> dict[str, Any]:
    """A job's fields, each checked; its data set and script located (a spec: `DatasetSpec`,
    `ScriptSpec`) or only named (a description: `DatasetRef`, `ScriptRef`)."""
    data = require_mapping(data, "job")
    reject_unknown(data, JobSpec, "")
    version = data.get("schema_version")
    if version != JOB_SCHEMA_VERSION:
        raise SpecError("schema_version", version, f"{JOB_SCHEMA_VERSION}")
    job_id = str_field(data.get("job_id"), "job_id")
    if not JOB_ID_PATTERN.match(job_id):
        raise SpecError("job_id", job_id, "letters, digits, '.', '_', '-' (max 128)")
    method = MethodSpec.from_dict(data.get("method"))
    script = method.name == SCRIPT_METHOD
    idle = method.name == IDLE_METHOD or script  # neither has the engine's model or data
    model = str_field(data.get("model"), "model", optional=idle,
                      choices=None if idle else MODELS)
    raw_dataset = data.get("dataset")
    dataset_type = DatasetSpec if located else DatasetRef
    dataset = None if idle and raw_dataset is None else dataset_type.from_dict(raw_dataset)
    if idle and (model is not None or dataset is not None):
        raise SpecError("model" if model else "dataset", model or raw_dataset,
                        f"null for {method.name}")
    raw_script = data.get("script")
    if script != (raw_script is not None):
        raise SpecError("script", raw_script,
                        "the script to run" if script else "null unless method is script")
    script_spec = (ScriptSpec if located else ScriptRef).from_dict(raw_script) if script else None
    epochs = int_field(data.get("epochs", 1), "epochs", minimum=1, optional=True,
                       maximum=MAX_EPOCHS)
    max_steps = int_field(data.get("max_steps"), "max_steps", minimum=1, optional=True)
    if not idle and epochs is None and max_steps is None:
        raise SpecError("epochs", None, "epochs or max_steps (or both)")
    telemetry = TelemetrySpec.from_dict(data.get("telemetry", {}))
    limits = LimitsSpec.from_dict(data.get("limits", {}))
    stall = limits.stall_timeout_s
    if stall is not None and stall < 2 * telemetry.heartbeat_s:
        raise SpecError("limits.stall_timeout_s", stall,
                        f"at least twice telemetry.heartbeat_s ({telemetry.heartbeat_s:g} s)")
    return dict(
        job_id=job_id,
        method=method,
        model=model,
        dataset=dataset,
        batch_size=int_field(data.get("batch_size", 100), "batch_size", minimum=1,
                             maximum=MAX_BATCH_SIZE),
        epochs=epochs,
        max_steps=max_steps,
        seed=int_field(data.get("seed", 0), "seed", minimum=0, maximum=MAX_SEED),
        eval_every_epochs=int_field(data.get("eval_every_epochs", 1), "eval_every_epochs",
                                    1),
        telemetry=telemetry,
        limits=limits,
        script=script_spec,
        schema_version=JOB_SCHEMA_VERSION,
    )


def _plain(value: Any) -> Any:
    """Records as JSON-ready data: dataclasses as dicts (field order), tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
