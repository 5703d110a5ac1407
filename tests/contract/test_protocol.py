"""The host/device contract: job spec validation and event line parsing (pure functions)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.events import (
    EVENT_KINDS,
    EVENT_SCHEMA_VERSION,
    MAX_EVENT_LINE_BYTES,
    PAYLOADS,
    Board,
    EpochEnd,
    EpochStart,
    Error,
    Event,
    Heartbeat,
    Hello,
    Interrupted,
    JobEnd,
    JobStart,
    MalformedLine,
    Memory,
    Power,
    Setup,
    Step,
    WindowEnd,
    WindowStart,
    clock_reply,
    parse_clock_reply,
    parse_event_line,
)
from contract.fields import SpecError
from contract.jobspec import JobSpec

SHA = "ab" * 32


def valid_spec(**changes) -> dict:
    spec = {
        "schema_version": 1,
        "job_id": "mlp-digits-lowmem-b100-s0-r0",
        "method": {"name": "lowmem", "disable": ["fp16_grads"]},
        "model": "mlp",
        "dataset": {"name": "digits", "path": "data/digits.npz", "sha256": SHA},
        "batch_size": 100,
        "epochs": 2,
        "seed": 3,
        "telemetry": {"memory_hz": 20},
        "limits": {"extra_address_space_bytes": 1 << 20},
    }
    spec.update(changes)
    return spec


def test_valid_spec_round_trips_through_json():
    spec = JobSpec.from_dict(valid_spec())
    assert spec.method.disable == ("fp16_grads",)
    assert spec.telemetry.memory_hz == 20.0
    assert spec.telemetry.step_every == 1  # default filled in
    again = JobSpec.from_json(spec.to_json())
    assert again == spec


def test_idle_spec_needs_a_duration_and_no_model():
    idle = {
        "schema_version": 1,
        "job_id": "idle-x",
        "method": {"name": "idle", "duration_s": 2},
        "model": None,
        "dataset": None,
        "epochs": None,
    }
    assert JobSpec.from_dict(idle).method.duration_s == 2.0
    with pytest.raises(SpecError, match=r"'method.duration_s'"):
        JobSpec.from_dict({**idle, "method": {"name": "idle"}})
    with pytest.raises(SpecError, match=r"'model'"):
        JobSpec.from_dict({**idle, "model": "mlp"})


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"schema_version": 2}, "schema_version", "2"),
        ({"schema_version": None}, "schema_version", "None"),
        ({"batch_size": "100"}, "batch_size", "'100'"),
        ({"batch_size": 0}, "batch_size", "0"),
        ({"batch_size": True}, "batch_size", "True"),
        ({"epochs": 1.5}, "epochs", "1.5"),
        ({"seed": -1}, "seed", "-1"),
        ({"job_id": "a b;rm -rf"}, "job_id", "'a b;rm -rf'"),
        ({"job_id": ""}, "job_id", "''"),
        ({"method": {"name": "fancy"}}, "method.name", "'fancy'"),
        ({"method": {"name": "bop", "lr": -1}}, "method.lr", "-1"),
        ({"method": {"name": "bop", "lr": float("nan")}}, "method.lr", "nan"),
        ({"method": {"name": "lowmem", "enable": "all"}}, "method.enable", "'all'"),
        ({"method": "lowmem"}, "method", "'lowmem'"),
        ({"dataset": {"name": "digits", "path": "x", "sha256": "XYZ"}}, "dataset.sha256", "'XYZ'"),
        ({"dataset": None}, "dataset", "None"),
        ({"telemetry": {"memory_hz": 0}}, "telemetry.memory_hz", "0"),
        ({"telemetry": {"memory_hz": 1e6}}, "telemetry.memory_hz", "1000000.0"),
        ({"telemetry": {"samples": 3}}, "telemetry.samples", "3"),
        ({"limits": {"extra_address_space_bytes": 0}}, "limits.extra_address_space_bytes", "0"),
        ({"epochs": None, "max_steps": None}, "epochs", "None"),
        ({"colour": "blue"}, "colour", "'blue'"),
        # the engine's vocabulary
        ({"model": "mpl"}, "model", "'mpl'"),
        ({"method": {"name": "lowmem", "disable": ["fp16grads"]}}, "method.disable",
         "'fp16grads'"),
        ({"method": {"name": "standard", "enable": ["wang_po2"]}}, "method.enable",
         "'wang_po2'"),
        ({"method": {"name": "lowmem", "enable": ["wang_fp16"], "disable": ["fp16_grads"]}},
         "method.enable", "'wang_fp16'"),
        ({"method": {"name": "standard", "optimizer": "rmsprop"}}, "method.optimizer",
         "'rmsprop'"),
        ({"method": {"name": "bop", "momentum_format": "6;5"}}, "method.momentum_format", "'6;5'"),
        ({"method": {"name": "bop", "momentum_format": "9,5"}}, "method.momentum_format", "9"),
        ({"method": {"name": "bop", "momentum_format": "8,23,0"}}, "method.momentum_format",
         "'8,23,0'"),
        ({"method": {"name": "lowmem", "momentum_format": "6,5"}}, "method.momentum_format",
         "'6,5'"),
        ({"dataset": {"name": "imagenet", "path": "x", "sha256": "ab" * 32}}, "dataset.name",
         "'imagenet'"),
    ],
)
def test_bad_spec_fields_are_named_with_their_value(changes, field, value):
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(valid_spec(**changes))
    assert info.value.field == field
    assert f"field {field!r}" in str(info.value)
    assert value in str(info.value)


def test_truncated_spec_json_is_a_spec_error():
    text = json.dumps(valid_spec())[:-10]
    with pytest.raises(SpecError, match="valid JSON"):
        JobSpec.from_json(text)
    with pytest.raises(SpecError, match="'job'"):
        JobSpec.from_json("[1, 2]")


def event_line(**changes) -> str:
    event = {
        "v": EVENT_SCHEMA_VERSION,
        "kind": "step",
        "job_id": "j",
        "seq": 4,
        "t_mono_ns": 12,
        "t_wall_s": 1.5,
        "data": {"global_step": 4, "epoch": 1, "step": 4, "loss": 0.25, "step_time_s": 0.01},
    }
    event.update(changes)
    return json.dumps(event)


EXAMPLE_PAYLOADS = [
    Hello(agent_version="0.1.0", python_version="3.11.2", cpu_cores=2),
    JobStart(spec=JobSpec.from_dict(valid_spec()), rss_start_bytes=1 << 20, hwm_reset=True),
    Setup(stage="building model", steps_per_epoch=71),
    EpochStart(epoch=1),
    Step(global_step=3, epoch=1, step=3, loss=0.5, step_time_s=0.01, peak_tensor_bytes=4096),
    EpochEnd(epoch=1, steps=10, train_loss=0.4, test_loss=0.5, test_accuracy=0.9, seconds=1.5,
             train_accuracy=0.91, lr=1e-3),
    Memory(rss_bytes=10, hwm_bytes=12, vm_bytes=None, peak_tensor_bytes=None, step=3),
    Power(source="pmic", power_w=3.25, rails=7),
    Board(temp_c=48.5, throttled="0x50000", throttled_now=["under-voltage"], source="sysfs"),
    JobEnd(epochs=2, steps=20, seconds_total=4.0, test_accuracy=0.9, peak_tensor_bytes=4096),
    Error(type="RuntimeError", message="", oom=False, traceback="...", steps=0),
    WindowStart(name="warm-up", index=0),
    WindowEnd(name="warm-up", index=0, t_start_wall_s=1.5, t_start_mono_ns=10, elapsed_s=0.5),
    Interrupted(reason="SIGTERM", steps=5),
    Heartbeat(n=3),
]


def test_every_kind_has_one_payload_class():
    assert sorted(type(p).kind for p in EXAMPLE_PAYLOADS) == sorted(EVENT_KINDS)
    assert set(PAYLOADS) == set(EVENT_KINDS)


@pytest.mark.parametrize("payload", EXAMPLE_PAYLOADS, ids=lambda p: p.kind)
def test_every_payload_round_trips_through_an_event_line(payload):
    event = Event.of(payload, "j", 3, 99, 12.5)
    parsed = parse_event_line(event.to_line())
    assert parsed == event
    assert parsed.known_kind
    assert parsed.payload == payload
    assert type(payload).from_data(json.loads(json.dumps(payload.to_data()))) == payload


def test_every_field_is_sent_and_missing_optional_fields_read_as_null():
    data = Memory(rss_bytes=None, hwm_bytes=1, vm_bytes=2).to_data()
    assert data == {"rss_bytes": None, "hwm_bytes": 1, "vm_bytes": 2,
                    "peak_tensor_bytes": None, "step": None}
    assert Memory.from_data({"rss_bytes": None, "hwm_bytes": 1, "vm_bytes": 2}) == Memory(
        rss_bytes=None, hwm_bytes=1, vm_bytes=2)


@pytest.mark.parametrize(
    ("kind", "data", "named"),
    [
        ("step", {"global_step": 1, "epoch": 1, "step": 1, "loss": "low", "step_time_s": 0.1},
         "'step.loss'"),
        ("step", {"global_step": 1, "epoch": 1, "step": 1, "step_time_s": 0.1}, "'step.loss'"),
        ("memory", {"rss_bytes": 1, "hwm_bytes": 1, "vm_bytes": 1, "tensor_peak_bytes": 1},
         "'memory.tensor_peak_bytes'"),
        ("epoch_start", {"epoch": True}, "'epoch_start.epoch'"),
        ("error", {"type": "X", "message": "m", "oom": "no"}, "'error.oom'"),
        ("job_start", {"spec": {"job_id": "x"}, "rss_start_bytes": 1, "hwm_reset": True},
         "'schema_version'"),
    ],
)
def test_a_known_kind_with_a_bad_payload_is_malformed_naming_the_field(kind, data, named):
    parsed = parse_event_line(event_line(kind=kind, data=data))
    assert isinstance(parsed, MalformedLine)
    assert named in parsed.reason
    assert parsed.kind == kind


def test_unknown_kind_is_a_valid_event_the_host_can_skip():
    parsed = parse_event_line(event_line(kind="thermal"))
    assert isinstance(parsed, Event)
    assert not parsed.known_kind


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (event_line()[:-7], "not JSON"),  # truncated
        (event_line(v=99), "'v'"),  # unknown version
        (event_line(seq="4"), "'seq'"),  # wrong type
        (event_line(seq=-1), "'seq'"),
        (event_line(t_wall_s="now"), "'t_wall_s'"),
        (event_line(data=[1, 2]), "'data'"),
        (event_line(kind=""), "'kind'"),
        ("[1, 2, 3]", "'event'"),
        ("", "not JSON"),
        ("NaN", "not JSON"),  # JSON has no NaN (Python's decoder would accept it)
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
    ],
)
def test_malformed_lines_become_records_with_a_reason(line, reason):
    parsed = parse_event_line(line)
    assert isinstance(parsed, MalformedLine)
    assert reason in parsed.reason
    assert len(parsed.raw) <= 1000


def test_huge_line_is_refused_without_parsing():
    line = event_line(data={"blob": "x" * (MAX_EVENT_LINE_BYTES + 10)})
    parsed = parse_event_line(line)
    assert isinstance(parsed, MalformedLine)
    assert "too long" in parsed.reason
    assert parsed.length == len(line)


def test_invalid_utf8_bytes_do_not_raise():
    parsed = parse_event_line(b"\xff\xfe{" + event_line().encode())
    assert isinstance(parsed, MalformedLine)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_parsing_arbitrary_input_never_raises(line):
    assert isinstance(parse_event_line(line), (Event, MalformedLine))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "kind", "job_id", "seq", "t_mono_ns", "t_wall_s", "data"]),
        st.one_of(
            st.none(),
            st.integers(),
            st.floats(),
            st.text(max_size=5),
            st.lists(st.integers(), max_size=2),
        ),
    )
)
def test_parsing_arbitrary_objects_never_raises(obj):
    assert isinstance(parse_event_line(json.dumps(obj)), (Event, MalformedLine))


def test_clock_reply_round_trip_and_garbage():
    assert parse_clock_reply(clock_reply(123.25, 7)) == 123.25
    with pytest.raises(SpecError):
        parse_clock_reply("garbage")
    with pytest.raises(SpecError, match="'t_wall_s'"):
        parse_clock_reply('{"t_wall_s": "x"}')


@pytest.mark.parametrize("text", ["6,5,67", "5,10", "8,7", "auto"])
def test_momentum_formats_the_engine_takes_pass_the_contract(text):
    assert JobSpec.from_dict(valid_spec(method={"name": "bop", "momentum_format": text}))
