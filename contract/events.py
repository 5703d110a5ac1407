"""What a device streams back: the event envelope, one payload per event kind, exit codes.

Event line (one JSON object per line on the agent's stdout)::

    {"v": 1, "kind": "step", "job_id": "...", "seq": 7,
     "t_mono_ns": 123456789, "t_wall_s": 1763769600.25, "data": {...}}

`data` is the kind's payload: `Hello`, `JobStart`, `Setup`, `EpochStart`, `Step`,
`EpochEnd`, `Memory`, `Power`, `Board`, `WindowStart`, `WindowEnd`, `JobEnd`, `Error` or
`Interrupted` (`PAYLOADS` maps kind -> class).
Each is a frozen dataclass: `Kind.from_data(dict)` validates (unknown or mistyped
fields raise `SpecError` naming `kind.field`), `payload.to_data()` serialises (every
field, null where a value is unknown; a missing optional field reads as null). The
agent emits payloads, the host's recorder and dashboard read them: neither reads an
event by string keys.

`parse_event_line` never raises: a line that is not a valid event (bad JSON, bad
envelope, a known kind whose payload does not validate) becomes a `MalformedLine`
the host stores as such. Events of unknown kinds are valid and carry no payload.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from contract.fields import (
    SpecError,
    bool_field,
    float_field,
    int_field,
    refuse_constant,
    reject_unknown,
    require_mapping,
    str_field,
)
from contract.jobspec import JobSpec

EVENT_SCHEMA_VERSION = 1
# An event line longer than this is not parsed (a runaway traceback, a corrupt stream).
MAX_EVENT_LINE_BYTES = 1 << 20


class AgentExit(IntEnum):
    """Exit codes of `python -m device_agent`; the host tells outcomes apart by them."""

    OK = 0  # job_end emitted
    CRASHED = 1  # the job raised; an `error` event says what
    BAD_SPEC = 2  # the job spec did not validate (or bad command line)
    OUT_OF_MEMORY = 3  # MemoryError or the allocator refused; `error` event with oom true
    INTERRUPTED = 130  # SIGTERM / SIGINT / host gone; `interrupted` event


# ---------------------------------------------------------------- payloads, one per kind


@dataclass(frozen=True)
class EventPayload:
    """The payload of one event kind. Subclasses name their `kind` and declare fields."""

    kind: ClassVar[str] = ""

    @classmethod
    def from_data(cls, data: object) -> EventPayload:
        """Validate a decoded `data` object; `SpecError` naming `kind.field` if it is bad."""
        data = require_mapping(data, cls.kind)
        reject_unknown(data, cls, f"{cls.kind}.")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            name = f"{cls.kind}.{f.name}"
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    raise SpecError(name, None, "a value (the field is required)")
                continue
            values[f.name] = _checked(data[f.name], hints[f.name], name)
        return cls(**values)

    def to_data(self) -> dict[str, Any]:
        """The JSON object for the event's `data`: every field (null where unknown)."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = value.to_dict() if isinstance(value, JobSpec) else value
        return data


def _checked(value: object, hint: Any, name: str) -> Any:
    """`value` checked against a field's type (int, float, str, bool, dict, list[str], JobSpec,
    X | None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is bool:
        return bool_field(value, name)
    if hint is int:
        return int_field(value, name)
    if hint is float:
        return float_field(value, name)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(name, value, "a string")
        return value
    if hint is JobSpec:
        return JobSpec.from_dict(value)
    if typing.get_origin(hint) is dict:
        return require_mapping(value, name)
    if typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(name, value, "a list of strings")
        return value
    raise TypeError(f"{name}: no check for fields of type {hint!r}")  # a contract bug


@dataclass(frozen=True)
class Hello(EventPayload):
    """The agent's first line: facts about the device (gathered without torch)."""

    kind: ClassVar[str] = "hello"
    agent_version: str
    python_version: str
    python_executable: str | None = None
    torch_version: str | None = None
    psutil_version: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    total_memory_bytes: int | None = None
    os: str | None = None
    machine: str | None = None
    emulation: str | None = None  # "qemu-user on <host CPU>" when emulated
    hostname: str | None = None
    pi_model: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class JobStart(EventPayload):
    """The job is about to run: its spec as validated and the memory baseline."""

    kind: ClassVar[str] = "job_start"
    spec: JobSpec
    rss_start_bytes: int | None
    hwm_reset: bool
    address_space_limit_bytes: int | None = None
    power_source: str | None = None  # "pmic" when the agent streams on-board power
    kernel_build_s: float | None = None  # building the engine's kernels before the clock started
    lowmem_block: str | None = None  # which low-memory block runs ("fused C++" or why not)
    conditions: dict[str, Any] | None = None  # what the job starts under


@dataclass(frozen=True)
class Setup(EventPayload):
    """A setup stage begins (checking data, loading the engine or building kernels, ...)."""

    kind: ClassVar[str] = "setup"
    stage: str
    steps_per_epoch: int | None = None  # "building model": the job's pace to come


@dataclass(frozen=True)
class WindowStart(EventPayload):
    """A user window began (`device_agent.window` / `begin_window` in a plan's script)."""

    kind: ClassVar[str] = "window_start"
    name: str
    index: int


@dataclass(frozen=True)
class WindowEnd(EventPayload):
    """... and ended, with its device-side times."""

    kind: ClassVar[str] = "window_end"
    name: str
    index: int
    t_start_wall_s: float
    t_start_mono_ns: int
    elapsed_s: float


@dataclass(frozen=True)
class EpochStart(EventPayload):
    kind: ClassVar[str] = "epoch_start"
    epoch: int  # 1-based (continual learning: the experience)


@dataclass(frozen=True)
class Step(EventPayload):
    """One training step (every `telemetry.step_every`-th)."""

    kind: ClassVar[str] = "step"
    global_step: int  # steps of this job so far, as the agent counts them
    epoch: int
    step: int  # the engine's step number over the whole run
    loss: float
    step_time_s: float  # the engine's train_step alone (forward, backward, update)
    # bytes of tensors live at the step's peak (the engine's tensor ledger), for the first
    # `telemetry.tensor_peak_steps` steps; the one name of the tensor-level peak everywhere
    peak_tensor_bytes: int | None = None


@dataclass(frozen=True)
class EpochEnd(EventPayload):
    """An epoch (continual learning: an experience) and its evaluation."""

    kind: ClassVar[str] = "epoch_end"
    epoch: int
    steps: int  # steps taken in this epoch
    train_loss: float
    test_loss: float
    test_accuracy: float  # fraction 0..1
    seconds: float  # wall time of the epoch including evaluation
    train_accuracy: float | None = None  # training methods: on up to 10000 fixed samples
    lr: float | None = None  # learning rate the epoch trained with
    experience: int | None = None  # continual learning: the experience (= epoch)
    train_samples: int | None = None
    replay_entries: int | None = None
    buffer_bytes: int | None = None
    trainable_bytes: int | None = None


@dataclass(frozen=True)
class Memory(EventPayload):
    """One sample of the agent's process memory (/proc/self/status)."""

    kind: ClassVar[str] = "memory"
    rss_bytes: int | None
    hwm_bytes: int | None
    vm_bytes: int | None
    peak_tensor_bytes: int | None = None  # of the last step run under the tensor ledger
    step: int | None = None  # steps done when sampled


@dataclass(frozen=True)
class Power(EventPayload):
    """One power reading the agent takes itself (a Pi 5's PMIC, or its modeled source)."""

    kind: ClassVar[str] = "power"
    source: str  # "pmic" (a Pi 5's rails) or "modeled" (the agent's CPU-load model)
    power_w: float
    rails: int | None = None
    modeled: bool | None = None  # true for the modeled source
    utilisation: float | None = None  # modeled: CPU utilisation over the interval
    frequency_fraction: float | None = None  # modeled: frequency / max frequency
    interval_s: float | None = None  # modeled: the interval the figure covers
    profile: str | None = None  # modeled: the device profile
    read_cpu_s: float | None = None  # CPU time of this read (vcgencmd)
    period_s: float | None = None  # the sampler's period now (stretched to stay under 1 %)


@dataclass(frozen=True)
class Board(EventPayload):
    """The board's temperature and firmware throttling word (at most once a second)."""

    kind: ClassVar[str] = "board"
    temp_c: float | None = None
    throttled: str | None = None  # the throttling word (hex)
    throttled_now: list[str] | None = None  # names of the "now" bits set
    source: str | None = None  # "sysfs" or "vcgencmd"


@dataclass(frozen=True)
class JobEnd(EventPayload):
    """The job completed: its figures (the host's `results` row)."""

    kind: ClassVar[str] = "job_end"
    epochs: int
    steps: int
    seconds_total: float  # from the dataset check to the end, as the agent saw it
    train_loss: float | None = None  # of the last epoch
    train_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    mean_epoch_s: float | None = None
    peak_tensor_bytes: int | None = None  # the largest tensor-level peak of the job's steps
    peak_hwm_bytes: int | None = None
    peak_rss_delta_bytes: int | None = None  # VmHWM at the end minus RSS at job_start
    seconds: float | None = None  # the engine's own training time
    latent_layer: int | None = None  # continual learning
    duration_s: float | None = None  # idle baseline: how long it rested
    script: str | None = None  # a user script's name
    unclosed_windows: str | None = None  # its windows begun and never ended
    cpu_temp_max_c: float | None = None  # the board's hottest reading during the job
    throttled_bits: str | None = None  # every firmware throttling bit seen (hex)
    throttled: str | None = None  # their names
    pmic_reads: int | None = None  # Pi 5 on-board power: reads taken
    pmic_cpu_share: float | None = None  # and the share of a core they cost
    conditions: dict[str, Any] | None = None  # what the job ran under (implementation, ...)


@dataclass(frozen=True)
class Error(EventPayload):
    """The job (or its spec) failed; `oom` when the allocator refused."""

    kind: ClassVar[str] = "error"
    type: str
    message: str
    oom: bool
    traceback: str | None = None
    steps: int | None = None
    field: str | None = None  # a refused spec: the field at fault
    conditions: dict[str, Any] | None = None


@dataclass(frozen=True)
class Interrupted(EventPayload):
    """The job stopped on a signal or because the host went away."""

    kind: ClassVar[str] = "interrupted"
    reason: str
    steps: int
    conditions: dict[str, Any] | None = None


@dataclass(frozen=True)
class Heartbeat(EventPayload):
    """The agent lives: sent every telemetry.heartbeat_s from a thread of its own, so the
    host can tell a frozen agent (nothing arrives for the stall timeout) from a quiet one."""

    kind: ClassVar[str] = "heartbeat"
    n: int


PAYLOADS: dict[str, type[EventPayload]] = {
    cls.kind: cls
    for cls in (Hello, JobStart, Setup, EpochStart, Step, EpochEnd, Memory, Power, Board,
                WindowStart, WindowEnd, JobEnd, Error, Interrupted, Heartbeat)
}
EVENT_KINDS = tuple(PAYLOADS)
FINAL_KINDS = ("job_end", "error", "interrupted")  # a job's last event is one of these


# ---------------------------------------------------------------- the envelope


@dataclass(frozen=True)
class Event:
    """One line of the agent's stdout: the envelope and, for a known kind, its payload."""

    kind: str
    job_id: str
    seq: int
    t_mono_ns: int
    t_wall_s: float
    data: dict[str, Any]
    v: int = EVENT_SCHEMA_VERSION
    payload: EventPayload | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, payload: EventPayload, job_id: str, seq: int, t_mono_ns: int,
           t_wall_s: float) -> Event:
        """The event carrying `payload` (the agent's way of making one)."""
        return cls(payload.kind, job_id, seq, t_mono_ns, t_wall_s, payload.to_data(),
                   payload=payload)

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
        return self.kind in PAYLOADS


@dataclass(frozen=True)
class MalformedLine:
    """A line that is not a valid event: kept (truncated) with the reason."""

    reason: str
    raw: str  # the first 1000 characters
    length: int
    kind: str | None = None  # the envelope's kind when only the payload was bad


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
        obj = json.loads(line, parse_constant=refuse_constant)
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, over-long integer text
        return MalformedLine(f"not JSON: {exc}", raw, length)
    except RecursionError:
        return MalformedLine("not JSON: nested too deeply", raw, length)
    try:
        event = _event_from_obj(obj)
    except SpecError as exc:
        return MalformedLine(str(exc), raw, length)
    if event.known_kind:
        try:
            payload = PAYLOADS[event.kind].from_data(event.data)
        except SpecError as exc:
            return MalformedLine(str(exc), raw, length, event.kind)
        event = dataclasses.replace(event, payload=payload)
    return event


def _event_from_obj(obj: object) -> Event:
    obj = require_mapping(obj, "event")
    version = obj.get("v")
    if version != EVENT_SCHEMA_VERSION:
        raise SpecError("v", version, f"event schema version {EVENT_SCHEMA_VERSION}")
    data = obj.get("data", {})
    if not isinstance(data, dict):
        raise SpecError("data", data, "an object")
    t_wall_s = float_field(obj.get("t_wall_s"), "t_wall_s")
    return Event(
        kind=str_field(obj.get("kind"), "kind"),
        job_id=str_field(obj.get("job_id"), "job_id"),
        seq=int_field(obj.get("seq"), "seq", minimum=0),
        t_mono_ns=int_field(obj.get("t_mono_ns"), "t_mono_ns", minimum=0),
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
    obj = require_mapping(obj, "clock reply")
    return float_field(obj.get("t_wall_s"), "t_wall_s")
