"""The contract between host and device: the job spec and the event stream.

Both sides import this module, so it uses the standard library only (no torch,
no pydantic: a Pi 3B+ has 1 GiB). Every record is a dataclass with explicit
validation; a bad value raises `SpecError`, whose message names the field and
the value. Parsing an event line never raises: anything that is not a valid
event becomes a `MalformedLine` the host records as such.

Job spec (JSON object, `schema_version` 1)::

    {"schema_version": 1, "job_id": "mlp-digits-lowmem-b100-s0-r0",
     "method": {"name": "lowmem", "optimizer": "adam", "lr": 0.001,
                "enable": [], "disable": [], "momentum_format": null,
                "lr_plateau": false, "duration_s": null},
     "model": "mlp",
     "dataset": {"name": "digits", "path": "data/digits.npz", "sha256": "..."},
     "batch_size": 100, "epochs": 3, "max_steps": null, "seed": 0,
     "eval_every_epochs": 1,
     "telemetry": {"memory_hz": 10.0, "power_hz": 5.0, "step_every": 1},
     "limits": {"extra_address_space_bytes": null}}

Method `script` runs the user's script named in `script` ({"name", "path", "sha256",
"args"}) in the agent, like a built-in job (`model` and `dataset` null); inside it,
`device_agent.window("NAME")` marks phases, streamed as `window_start` / `window_end`.

Method `idle` runs no training: the agent rests `method.duration_s` seconds
while its samplers run (the idle baseline); `model` and `dataset` are null.

Event line (one JSON object per line)::

    {"v": 1, "kind": "step", "job_id": "...", "seq": 7,
     "t_mono_ns": 123456789, "t_wall_s": 1763769600.25, "data": {...}}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any

JOB_SCHEMA_VERSION = 1
EVENT_SCHEMA_VERSION = 1

METHODS = ("standard", "lowmem", "bop", "cwr", "idle", "script")
OPTIMIZERS = ("adam", "sgd", "bop")
EVENT_KINDS = (
    "hello",
    "job_start",
    "epoch_start",
    "step",
    "epoch_end",
    "memory",
    "power",
    "board",
    "setup",  # a setup stage began: checking data, building kernels, loading data, ...
    "window_start",  # a user window began (device_agent.window / begin_window)
    "window_end",  # ... and ended: name, index, start and end times
    "job_end",
    "error",
    "interrupted",
)
# An event line longer than this is not parsed (a runaway traceback, a corrupt stream).
MAX_EVENT_LINE_BYTES = 1 << 20
# Job ids become file and directory names on the device: keep them to a safe alphabet.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# Integers travel into SQLite, whose integers are 64-bit: anything beyond is refused here.
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's and most generators' seed range


class AgentExit(IntEnum):
    """Exit codes of `python -m device_agent`; the host tells outcomes apart by them."""

    OK = 0  # job_end emitted
    CRASHED = 1  # the job raised; an `error` event says what
    BAD_SPEC = 2  # the job spec did not validate (or bad command line)
    OUT_OF_MEMORY = 3  # MemoryError or the allocator refused; `error` event with oom true
    INTERRUPTED = 130  # SIGTERM / SIGINT / host gone; `interrupted` event


class SpecError(ValueError):
    """A job spec or event field is invalid; the message names the field and the value."""

    def __init__(self, field_name: str, value: object, expected: str) -> None:
        self.field = field_name
        self.value = value
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field_name!r}: expected {expected}, got {shown}")


# ---------------------------------------------------------------- validation helpers


def _require_mapping(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(name, value, "an object")
    return value


def _reject_unknown(data: dict, cls: type, prefix: str) -> None:
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise SpecError(f"{prefix}{key}", data[key], f"one of the fields {sorted(known)}")


def _int(
    value: object,
    name: str,
    minimum: int | None = None,
    optional: bool = False,
    maximum: int = INT64_MAX,
):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, value, "an integer" + (" or null" if optional else ""))
    if minimum is not None and value < minimum:
        raise SpecError(name, value, f"an integer >= {minimum}")
    if value > maximum:
        raise SpecError(name, value, f"an integer <= {maximum}")
    return value


def fits_int64(value: object) -> bool:
    """True for an int (not bool) SQLite can store: -2**63 .. 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return INT64_MIN <= value <= INT64_MAX


def _float(value: object, name: str, positive: bool = False, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(name, value, "a finite number" + (" or null" if optional else ""))
    if positive and value <= 0:
        raise SpecError(name, value, "a positive number")
    return float(value)


def _str(value: object, name: str, optional: bool = False, choices=None):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(name, value, "a non-empty string" + (" or null" if optional else ""))
    if choices is not None and value not in choices:
        raise SpecError(name, value, f"one of {', '.join(choices)}")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(name, value, "true or false")
    return value


def _str_list(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(name, value, "a list of names")
    return tuple(value)


# ---------------------------------------------------------------- job spec


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
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        name = _str(data.get("name"), prefix + "name", choices=METHODS)
        spec = cls(
            name=name,
            optimizer=_str(data.get("optimizer"), prefix + "optimizer", True, OPTIMIZERS),
            lr=_float(data.get("lr", 1e-3), prefix + "lr", positive=True),
            enable=_str_list(data.get("enable", []), prefix + "enable"),
            disable=_str_list(data.get("disable", []), prefix + "disable"),
            momentum_format=_str(data.get("momentum_format"), prefix + "momentum_format", True),
            lr_plateau=_bool(data.get("lr_plateau", False), prefix + "lr_plateau"),
            duration_s=_float(data.get("duration_s"), prefix + "duration_s", True, optional=True),
        )
        if name == "idle" and spec.duration_s is None:
            raise SpecError(prefix + "duration_s", None, "a positive number for method idle")
        if name != "idle" and spec.duration_s is not None:
            raise SpecError(prefix + "duration_s", spec.duration_s, "null unless method is idle")
        return spec


@dataclass(frozen=True)
class DatasetSpec:
    """A prepared canonical data set file on the device, checked by checksum before use."""

    name: str
    path: str  # relative to the agent's working directory, or absolute
    sha256: str

    @classmethod
    def from_dict(cls, data: object, prefix: str = "dataset.") -> DatasetSpec:
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        sha = _str(data.get("sha256"), prefix + "sha256")
        if not SHA256_PATTERN.match(sha):
            raise SpecError(prefix + "sha256", sha, "64 lower-case hex digits")
        return cls(
            name=_str(data.get("name"), prefix + "name"),
            path=_str(data.get("path"), prefix + "path"),
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
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        spec = cls(
            profile=_str(data.get("profile"), prefix + "profile"),
            idle_w=_float(data.get("idle_w"), prefix + "idle_w", positive=True),
            busy_w=_float(data.get("busy_w"), prefix + "busy_w", positive=True),
        )
        if spec.busy_w < spec.idle_w:
            raise SpecError(prefix + "busy_w", spec.busy_w, f"at least idle_w ({spec.idle_w})")
        return spec


@dataclass(frozen=True)
class ScriptSpec:
    """A user's training script, deployed to the device by checksum, with its arguments."""

    name: str
    path: str  # relative to the agent's working directory, or absolute
    sha256: str
    args: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object, prefix: str = "script.") -> ScriptSpec:
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        name = _str(data.get("name"), prefix + "name")
        if not JOB_ID_PATTERN.match(name):
            raise SpecError(prefix + "name", name, "letters, digits, '.', '_', '-'")
        sha = _str(data.get("sha256"), prefix + "sha256")
        if not SHA256_PATTERN.match(sha):
            raise SpecError(prefix + "sha256", sha, "64 lower-case hex digits")
        args = data.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise SpecError(prefix + "args", args, "a list of strings")
        return cls(name=name, path=_str(data.get("path"), prefix + "path"), sha256=sha,
                   args=tuple(args))


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

    @classmethod
    def from_dict(cls, data: object, prefix: str = "telemetry.") -> TelemetrySpec:
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        spec = cls(
            memory_hz=_float(data.get("memory_hz", 10.0), prefix + "memory_hz", positive=True),
            power_hz=_float(data.get("power_hz", 5.0), prefix + "power_hz", positive=True),
            step_every=_int(data.get("step_every", 1), prefix + "step_every", minimum=1),
            tensor_peak_steps=_int(data.get("tensor_peak_steps", 2),
                                   prefix + "tensor_peak_steps", minimum=0),
            power_model=(PowerModelSpec.from_dict(data["power_model"])
                         if data.get("power_model") is not None else None),
            cool_to_c=_float(data.get("cool_to_c"), prefix + "cool_to_c", optional=True),
            cool_max_s=_float(data.get("cool_max_s", 120.0), prefix + "cool_max_s",
                              positive=True),
        )
        for name in ("memory_hz", "power_hz"):
            if getattr(spec, name) > 1000:
                raise SpecError(prefix + name, getattr(spec, name), "a rate of at most 1000 Hz")
        return spec


@dataclass(frozen=True)
class LimitsSpec:
    """Resource limits the agent applies to itself before the job runs.

    `extra_address_space_bytes` sets RLIMIT_AS to the agent's address space after
    start-up plus this many bytes: a big host can then behave like a small device.
    """

    extra_address_space_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: object, prefix: str = "limits.") -> LimitsSpec:
        data = _require_mapping(data, prefix.rstrip("."))
        _reject_unknown(data, cls, prefix)
        return cls(
            extra_address_space_bytes=_int(
                data.get("extra_address_space_bytes"),
                prefix + "extra_address_space_bytes",
                minimum=1,
                optional=True,
            )
        )


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

    @classmethod
    def from_dict(cls, data: object) -> JobSpec:
        """Validate a decoded JSON object; raise `SpecError` naming the first bad field."""
        data = _require_mapping(data, "job")
        _reject_unknown(data, cls, "")
        version = data.get("schema_version")
        if version != JOB_SCHEMA_VERSION:
            raise SpecError("schema_version", version, f"{JOB_SCHEMA_VERSION}")
        job_id = _str(data.get("job_id"), "job_id")
        if not JOB_ID_PATTERN.match(job_id):
            raise SpecError("job_id", job_id, "letters, digits, '.', '_', '-' (max 128)")
        method = MethodSpec.from_dict(data.get("method"))
        script = method.name == "script"
        idle = method.name == "idle" or script  # neither has the engine's model or data set
        model = _str(data.get("model"), "model", optional=idle)
        raw_dataset = data.get("dataset")
        dataset = None if idle and raw_dataset is None else DatasetSpec.from_dict(raw_dataset)
        if idle and (model is not None or dataset is not None):
            raise SpecError("model" if model else "dataset", model or raw_dataset,
                            f"null for {method.name}")
        raw_script = data.get("script")
        if script != (raw_script is not None):
            raise SpecError("script", raw_script,
                            "the script to run" if script else "null unless method is script")
        script_spec = ScriptSpec.from_dict(raw_script) if script else None
        epochs = _int(data.get("epochs", 1), "epochs", minimum=1, optional=True,
                      maximum=MAX_EPOCHS)
        max_steps = _int(data.get("max_steps"), "max_steps", minimum=1, optional=True)
        if not idle and epochs is None and max_steps is None:
            raise SpecError("epochs", None, "epochs or max_steps (or both)")
        return cls(
            job_id=job_id,
            method=method,
            model=model,
            dataset=dataset,
            batch_size=_int(data.get("batch_size", 100), "batch_size", minimum=1,
                            maximum=MAX_BATCH_SIZE),
            epochs=epochs,
            max_steps=max_steps,
            seed=_int(data.get("seed", 0), "seed", minimum=0, maximum=MAX_SEED),
            eval_every_epochs=_int(data.get("eval_every_epochs", 1), "eval_every_epochs", 1),
            telemetry=TelemetrySpec.from_dict(data.get("telemetry", {})),
            limits=LimitsSpec.from_dict(data.get("limits", {})),
            script=script_spec,
        )

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise SpecError("job", text[:40], f"valid JSON ({exc.msg} at {exc.pos})") from exc
        except (ValueError, RecursionError) as exc:  # NaN / Infinity, absurd nesting
            raise SpecError("job", text[:40], f"valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["method"]["enable"] = list(self.method.enable)
        data["method"]["disable"] = list(self.method.disable)
        if self.script is not None:
            data["script"]["args"] = list(self.script.args)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One line of the agent's stdout. `data` holds the kind-specific fields."""

    kind: str
    job_id: str
    seq: int
    t_mono_ns: int
    t_wall_s: float
    data: dict[str, Any]
    v: int = EVENT_SCHEMA_VERSION

    def to_line(self) -> str:
        return json.dumps(
            {
                "v": self.v,
                "kind": self.kind,
                "job_id": self.job_id,
                "seq": self.seq,
                "t_mono_ns": self.t_mono_ns,
                "t_wall_s": self.t_wall_s,
                "data": self.data,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @property
    def known_kind(self) -> bool:
        return self.kind in EVENT_KINDS


@dataclass(frozen=True)
class MalformedLine:
    """A line that is not a valid event: kept (truncated) with the reason."""

    reason: str
    raw: str  # the first 1000 characters
    length: int


def parse_event_line(line: str | bytes) -> Event | MalformedLine:
    """Decode one stdout line; never raises. Unknown kinds are valid (the host skips them)."""
    length = len(line)
    if length > MAX_EVENT_LINE_BYTES:
        head = line[:1000]
        head = head.decode("utf-8", "replace") if isinstance(head, bytes) else head
        return MalformedLine(f"line too long ({length} > {MAX_EVENT_LINE_BYTES})", head, length)
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    raw = line[:1000]
    try:
        obj = json.loads(line, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, over-long integer text
        return MalformedLine(f"not JSON: {exc}", raw, length)
    except RecursionError:
        return MalformedLine("not JSON: nested too deeply", raw, length)
    try:
        return _event_from_obj(obj)
    except SpecError as exc:
        return MalformedLine(str(exc), raw, length)


def _refuse_constant(name: str) -> float:
    """JSON has no NaN or Infinity; Python's decoder accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


def _event_from_obj(obj: object) -> Event:
    obj = _require_mapping(obj, "event")
    version = obj.get("v")
    if version != EVENT_SCHEMA_VERSION:
        raise SpecError("v", version, f"event schema version {EVENT_SCHEMA_VERSION}")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise SpecError("data", data, "an object")
    t_wall_s = _float(obj.get("t_wall_s"), "t_wall_s")
    return Event(
        kind=_str(obj.get("kind"), "kind"),
        job_id=_str(obj.get("job_id"), "job_id"),
        seq=_int(obj.get("seq"), "seq", minimum=0),
        t_mono_ns=_int(obj.get("t_mono_ns"), "t_mono_ns", minimum=0),
        t_wall_s=t_wall_s,
        data=data,
    )


# ---------------------------------------------------------------- clock request/response


def clock_reply(t_wall_s: float, t_mono_ns: int) -> str:
    """The agent's answer to one clock request line."""
    return json.dumps({"t_wall_s": t_wall_s, "t_mono_ns": t_mono_ns})


def parse_clock_reply(line: str | bytes) -> float:
    """The device wall time in a clock reply; `SpecError` if the line is not one."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise SpecError("clock reply", line[:80], "a JSON object") from exc
    obj = _require_mapping(obj, "clock reply")
    return _float(obj.get("t_wall_s"), "t_wall_s")
