"""Hostile input to the plan, inventory and event parsers: a clear error, never a traceback.

Hypothesis builds plans and inventories from the real keys with hostile values (huge
integers, NaN, infinity, wrong types, deep nesting, aliases) and random bytes; every
document must load or be refused with `HarnessUsageError`, each within a time limit
(hypothesis' deadline) and a memory limit (tracemalloc's peak). Event lines must parse
to an event whose numbers fit the store, or to a `MalformedLine`, never raise.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.events import Event, MalformedLine, parse_event_line
from contract.fields import fits_int64
from harness.errors import HarnessUsageError
from harness.inventory import load_inventory
from harness.plan import ENTRY_KEYS, METHOD_KEYS, PLAN_KEYS, load_plan

REPO = Path(__file__).resolve().parents[2]
MAX_PEAK_BYTES = 64 * 1024 * 1024  # what parsing one small document may allocate at most
FUZZ = settings(
    max_examples=150,
    deadline=10_000,  # ms per document: bounded time (a bomb spun for minutes)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

hostile_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**63, 2**64, 10**23, 99999999999999999999999]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(
    hostile_numbers,
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.sampled_from(["standard", "lowmem", "bop", "cwr", "idle", "mlp", "digits", "adam",
                     "bop", "5,10", "auto", "fp16_grads", "${HOME}", "${NOT_SET_ANYWHERE}"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mapping_of(keys: tuple[str, ...]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(keys), values, max_size=len(keys))


methods = st.one_of(values, st.lists(st.one_of(scalars, _mapping_of(METHOD_KEYS)), max_size=3))
entries = _mapping_of(ENTRY_KEYS).flatmap(
    lambda entry: st.fixed_dictionaries({"methods": methods}).map(lambda m: {**entry, **m})
)
plans = _mapping_of(PLAN_KEYS).flatmap(
    lambda top: st.lists(entries, max_size=3).map(
        lambda matrix: {**top, "matrix": matrix, "datasets": top.get("datasets", {"digits": {}})}
    )
)


def _bounded(load, path: Path):
    """Load `path`; only `HarnessUsageError` may come out, within MAX_PEAK_BYTES."""
    tracemalloc.start()
    try:
        load(path)
    except HarnessUsageError as exc:
        assert "\n" not in str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, peak


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> None:
    """Import the inventory readers (ansible-core is slow to import) outside the deadline."""
    path = tmp_path_factory.mktemp("warm") / "inventory.yaml"
    for text in ("devices: [{name: a, transport: local}]\n", "all: {hosts: {a: {}}}\n"):
        path.write_text(text)
        with contextlib.suppress(HarnessUsageError):
            load_inventory(path)


def _dump(document: object) -> str:
    return yaml.safe_dump(document, allow_unicode=True)


@FUZZ
@given(plan=plans)
def test_fuzzed_plans_load_or_fail_with_one_line(tmp_path_factory, plan):
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    path.write_text(_dump(plan), encoding="utf-8")
    _bounded(load_plan, path)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_as_plan_or_inventory(tmp_path_factory, warm, data):
    path = tmp_path_factory.mktemp("bytes") / "file.yaml"
    path.write_bytes(data)
    _bounded(load_plan, path)
    _bounded(load_inventory, path)


DEVICE_KEYS = (
    "name", "transport", "host", "port", "user", "key_file", "python", "workdir", "tags",
    "meter", "known_hosts", "trust_on_first_use", "connect_timeout_s", "connect_retries",
    "retry_backoff_s", "keepalive_s", "password", "key_passphrase",
)
inventories = st.one_of(
    st.fixed_dictionaries(
        {"devices": st.lists(_mapping_of(DEVICE_KEYS), max_size=3)},
        optional={"version": values, "defaults": _mapping_of(DEVICE_KEYS[1:])},
    ),
    st.fixed_dictionaries(  # Ansible style
        {"all": st.fixed_dictionaries({}, optional={
            "hosts": st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.dictionaries(
                st.sampled_from(["ansible_host", "ansible_port", "ansible_user",
                                 "harness_keepalive_s", "harness_meter"]), values, max_size=3)),
                max_size=3),
            "vars": st.dictionaries(st.sampled_from(["ansible_port", "harness_python"]), values),
            "children": st.dictionaries(st.text(max_size=6), values, max_size=3),
        })}
    ),
)


@FUZZ
@given(inventory=inventories)
def test_fuzzed_inventories_load_or_fail_with_one_line(tmp_path_factory, warm, inventory):
    path = tmp_path_factory.mktemp("inv") / "inventory.yaml"
    path.write_text(_dump(inventory), encoding="utf-8")
    _bounded(load_inventory, path)


event_objects = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), values), "kind": st.one_of(st.sampled_from(
        ["step", "memory", "power", "job_end", "epoch_end", "heartbeat"]), values),
     "job_id": st.one_of(st.just("j"), values), "seq": st.one_of(hostile_numbers, values),
     "t_mono_ns": hostile_numbers, "t_wall_s": hostile_numbers,
     "data": st.one_of(st.dictionaries(st.sampled_from(
         ["epoch", "rss_bytes", "power_w", "global_step", "loss"]), hostile_numbers), values)},
)


@settings(max_examples=300, deadline=1000)
@given(obj=event_objects)
def test_fuzzed_events_parse_to_storable_numbers_or_malformed(obj):
    line = json.dumps(obj)  # Python writes NaN / Infinity, which JSON does not have
    parsed = parse_event_line(line)
    if isinstance(parsed, Event):
        assert fits_int64(parsed.seq) and fits_int64(parsed.t_mono_ns)
        assert math.isfinite(parsed.t_wall_s)
    else:
        assert isinstance(parsed, MalformedLine) and parsed.reason


@settings(max_examples=200, deadline=1000)
@given(line=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_random_event_lines_never_raise(line):
    assert isinstance(parse_event_line(line), (Event, MalformedLine))


def test_deep_event_line_is_malformed_not_a_crash():
    assert isinstance(parse_event_line("[" * 100_000 + "]" * 100_000), MalformedLine)


# ---------------------------------------------------------------- the reported inputs, by CLI


def harness(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


PLAN_HEAD = "datasets: {digits: {}}\nmatrix:\n  - methods: [standard]\n    models: [mlp]\n" \
            "    datasets: [digits]\n"
ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh")
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (PLAN_HEAD + "    epochs: 99999999999999999999999\n", "epochs': expected an integer <="),
        (PLAN_HEAD + "    repeats: 100000000\n", "expands to 100,000,000 jobs"),
        (PLAN_HEAD + "    limits: [1, 2]\n", "limits': expected a mapping"),
        (PLAN_HEAD + "    seeds: [18446744073709551616]\n", "seed': expected an integer <="),
        (PLAN_HEAD + "cooldown_s: .inf\n", "'cooldown_s': expected a finite number"),
        (PLAN_HEAD + "    epochs: .nan\n", "expected a finite number"),
        ("[" * 100_000 + "]" * 100_000, "nested more than"),
        (ALIAS_BOMB, "once aliases (*name) are expanded"),
        (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ],
    ids=["huge-epochs", "repeats", "limits-list", "huge-seed", "inf", "nan", "nesting",
         "alias-bomb", "bytes"],
)
def test_reported_plans_get_one_line(tmp_path, content, expected):
    path = tmp_path / "plan.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = harness("plan", "show", str(path), cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_dev_zero_is_refused_without_reading_it_all(tmp_path):
    result = harness("plan", "show", "/dev/zero", cwd=REPO)
    assert result.returncode == 2 and "larger than 1024 KiB" in result.stderr


@pytest.mark.parametrize("value", [".inf", ".nan", "1e400", "100000000000000000000000000"])
def test_inventory_keepalive_must_be_a_sane_number(tmp_path, value):
    path = tmp_path / "inventory.yaml"
    path.write_text(f"devices:\n  - name: a\n    host: 127.0.0.1\n    keepalive_s: {value}\n")
    with pytest.raises(HarnessUsageError, match="keepalive_s"):
        load_inventory(path)


def test_ansible_alias_bomb_is_refused_at_once(tmp_path):
    def children(prev: str) -> str:
        return ", ".join(f"{prev}{i}: *{prev}" for i in range(9))

    groups = "".join(
        f"    {name}: &{name}\n      children: {{{children(prev)}}}\n"
        if prev else f"    {name}: &{name}\n      hosts: {{pi: {{ansible_host: 127.0.0.1}}}}\n"
        for prev, name in zip(["", "a", "b", "c", "d", "e", "f"], "abcdefg")
    )
    path = tmp_path / "hosts.yaml"
    path.write_text("all:\n  children:\n" + groups)
    assert len(path.read_bytes()) < 1500
    with pytest.raises(HarnessUsageError, match="aliases"):
        load_inventory(path)
