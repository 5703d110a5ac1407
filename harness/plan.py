"""Plans: a YAML matrix (methods x models x datasets x batch sizes x seeds x repeats) -> jobs.

Every job gets a stable id built from its coordinates
(`mlp-digits-lowmem-b100-s0-r0`), so a resumed run finds the same jobs. The
plan also says how long the idle baseline lasts, how long devices cool down
between jobs, how often the agent samples, and how often a lost job is retried.
Errors name the file, line and field. Example (the embedded default)::

    idle_baseline_s: 8
    cooldown_s: 1
    order_seed: 7                    # optional: the jobs' random order per device
    max_attempts: 2                  # a job whose device was lost is retried once
    stall_timeout_s: 120             # no event (heartbeats included) this long: `stalled`
    wall_clock_s: null               # a job running longer than this: `timed_out`
    telemetry: {memory_hz: 10, power_hz: 5}  # also step_every, tensor_peak_steps (2),
                                     # heartbeat_s (5), cool_max_s (120: after the cooldown,
                                     # the longest wait for the idle temperature)
    datasets:
      digits: {}                     # or {from: /path/to/source/files}
    matrix:
      - methods: [standard, lowmem]  # or {name: lowmem, label: no-fp16, disable: [fp16_grads]}
        models: [mlp]
        datasets: [digits]
        batch_sizes: [100]
        seeds: [0]
        repeats: 1
        epochs: 3
        devices: [local]             # optional: pin to device names or tags
        stall_timeout_s: 300         # optional: this entry's own limits (null: none)
        wall_clock_s: 3600
        limits: {extra_address_space_bytes: 500000000}  # optional: RLIMIT_AS headroom
    scripts:                         # your own training scripts (optional; matrix optional then)
      - name: my-bnn                 # job id script-my-bnn-r0
        path: train_my_bnn.py        # relative to the plan; deployed to devices by checksum
        args: [--epochs, "2"]
        devices: [pi5]               # optional, as above; repeats: N optional

A script runs in the device agent like a built-in job (same events, memory sampling,
meters, clock alignment, faults); `import device_agent` and `with
device_agent.window("NAME"):` inside it marks windows that get their own energy.

A job whose agent sends nothing for its stall timeout, or runs past its wall-clock
limit, is stopped and recorded as `stalled` / `timed_out`; the device goes on.
"""

from __future__ import annotations

import itertools
import random
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from contract.fields import SpecError
from contract.jobspec import JobSpec
from contract.vocabulary import DATASETS, IDLE_METHOD, SCRIPT_METHOD, TRAINING_METHODS
from harness.errors import HarnessUsageError
from harness.fleet.yaml_lines import YamlList, YamlMap, load_yaml_with_lines
from harness.store import PlannedJob

PLAN_KEYS = ("idle_baseline_s", "cooldown_s", "max_attempts", "order_seed", "stall_timeout_s",
             "wall_clock_s", "telemetry", "datasets", "matrix", "scripts")
SCRIPT_KEYS = ("name", "path", "args", "devices", "repeats")
MAX_SCRIPT_BYTES = 16 << 20
ENTRY_KEYS = (
    "methods",
    "models",
    "datasets",
    "batch_sizes",
    "seeds",
    "repeats",
    "epochs",
    "max_steps",
    "eval_every_epochs",
    "devices",
    "stall_timeout_s",
    "wall_clock_s",
    "limits",
)
METHOD_KEYS = (
    "name",
    "label",
    "optimizer",
    "lr",
    "enable",
    "disable",
    "momentum_format",
    "lr_plateau",
)
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$")
# A plan expands to at most this many jobs (a typo in `repeats` must not eat the machine).
MAX_PLAN_JOBS = 10_000
# No event (the agent sends a heartbeat every telemetry.heartbeat_s) for this long: stalled.
DEFAULT_STALL_TIMEOUT_S = 120.0
# A job spec field -> the matrix entry key it comes from (errors point at the entry's line).
SPEC_TO_ENTRY_KEY = {"model": "models", "dataset": "datasets", "batch_size": "batch_sizes",
                     "seed": "seeds"}


@dataclass(frozen=True)
class DatasetSource:
    """A data set the plan uses and where to prepare it from (None: the built-in source)."""

    name: str
    source: Path | None


@dataclass(frozen=True)
class ScriptSource:
    """A script the plan names and its file, as the plan gives it (`harness run` copies it
    into the run directory; devices get the copy)."""

    name: str
    path: Path


@dataclass(frozen=True)
class Plan:
    path: Path
    idle_baseline_s: float
    cooldown_s: float
    max_attempts: int
    order_seed: int | None  # None: drawn at run time (and recorded)
    telemetry: dict[str, Any]
    datasets: tuple[DatasetSource, ...]
    jobs: tuple[PlannedJob, ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S
    wall_clock_s: float | None = None
    scripts: tuple[ScriptSource, ...] = ()


class _Where:
    """Builds error messages that name the file, line and field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, node: Any, key: Any, field_name: str, message: str) -> HarnessUsageError:
        line = node.line_of(key) if isinstance(node, (YamlMap, YamlList)) else 0
        where = f"{self.path}:{line}" if line else f"{self.path}"
        text = f"{where}: field {field_name!r}: {message}"
        return HarnessUsageError(text.replace("\r", "\\r").replace("\n", "\\n"))


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _positive_number(where: _Where, node: YamlMap, key: str, name: str, default: float) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise where.error(node, key, name, f"expected a number >= 0, got {value!r}")
    return float(value)


def _optional_seconds(
    where: _Where, node: YamlMap, key: str, name: str, default: float | None
) -> float | None:
    """A stall timeout or wall-clock limit: seconds (>= 1), or null for none."""
    if key not in node:
        return default
    value = node[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 2.6e6:
        raise where.error(
            node, key, name, f"expected seconds (1 to 30 days) or null, got {value!r}"
        )
    return float(value)


def _int_list(
    where: _Where, node: YamlMap, key: str, name: str, default: list, minimum: int
) -> list[int]:
    values = _as_list(node.get(key, default))
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise where.error(node, key, name, f"expected integers >= {minimum}, got {value!r}")
    if not values:
        raise where.error(node, key, name, "expected at least one value")
    return values


def _name_list(where: _Where, node: YamlMap, key: str, name: str, default: list | None) -> list:
    if key not in node and default is None:
        raise where.error(node, node.line, name, "is required")
    values = _as_list(node.get(key, default))
    if not values or not all(isinstance(v, str) and v for v in values):
        raise where.error(node, key, name, f"expected a list of names, got {values!r}")
    return values


def _method(where: _Where, entry: YamlMap, value: Any, name: str) -> dict[str, Any]:
    """A method given as a name or a mapping of options -> a method dict with a label."""
    method = {"name": value} if isinstance(value, str) else value
    if not isinstance(method, dict):
        raise where.error(entry, "methods", name, f"expected a name or a mapping, got {value!r}")
    for key in method:
        if key not in METHOD_KEYS:
            raise where.error(
                method,
                key,
                f"{name}.{key}",
                f"unknown option; choose from {', '.join(METHOD_KEYS)}",
            )
    if method.get("name") == SCRIPT_METHOD:
        raise where.error(method if isinstance(method, YamlMap) else entry, "name",
                          f"{name}.name", "your own scripts go in the plan's 'scripts' list")
    if method.get("name") not in TRAINING_METHODS:
        raise where.error(
            method if isinstance(method, YamlMap) else entry,
            "name",
            f"{name}.name",
            f"unknown method {method.get('name')!r}; choose one of "
            f"{', '.join(TRAINING_METHODS)}",
        )
    label = method.get("label", method["name"])
    if not isinstance(label, str) or not LABEL_PATTERN.match(label):
        raise where.error(
            method if isinstance(method, YamlMap) else entry,
            "label",
            f"{name}.label",
            f"expected letters, digits, '.', '_', '-', got {label!r}",
        )
    options = {k: v for k, v in method.items() if k != "label"}
    return {"label": label, "options": options}


def load_plan(path: Path) -> Plan:
    """Read and expand a plan; `HarnessUsageError` (file:line: field ...) for bad input."""
    path = Path(path)
    where = _Where(path)
    doc = load_yaml_with_lines(path)
    if not isinstance(doc, YamlMap):
        raise HarnessUsageError(f"{path}: a plan is a mapping with a 'matrix' list")
    for key in doc:
        if key not in PLAN_KEYS:
            raise where.error(
                doc, key, str(key), f"unknown key; choose from {', '.join(PLAN_KEYS)}"
            )
    idle_s = _positive_number(where, doc, "idle_baseline_s", "idle_baseline_s", 0.0)
    cooldown_s = _positive_number(where, doc, "cooldown_s", "cooldown_s", 0.0)
    max_attempts = _int_list(where, doc, "max_attempts", "max_attempts", [2], 1)[0]
    order_seed = (_int_list(where, doc, "order_seed", "order_seed", [0], 0)[0]
                  if "order_seed" in doc else None)
    stall_s = _optional_seconds(
        where, doc, "stall_timeout_s", "stall_timeout_s", DEFAULT_STALL_TIMEOUT_S
    )
    wall_s = _optional_seconds(where, doc, "wall_clock_s", "wall_clock_s", None)
    telemetry = doc.get("telemetry", {})
    if not isinstance(telemetry, dict):
        raise where.error(doc, "telemetry", "telemetry", f"expected a mapping, got {telemetry!r}")
    datasets = _datasets(where, doc, path)
    script_sources, scripts = _scripts(
        where, doc, path, telemetry, {"stall_timeout_s": stall_s, "wall_clock_s": wall_s}
    )
    matrix = doc.get("matrix", YamlList() if scripts else None)
    if not isinstance(matrix, YamlList) or not (matrix or scripts):
        raise where.error(doc, "matrix", "matrix", f"expected a non-empty list, got {matrix!r}")
    jobs: list[PlannedJob] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(matrix):
        budget = MAX_PLAN_JOBS - len(jobs) - len(scripts)
        defaults = {"stall_timeout_s": stall_s, "wall_clock_s": wall_s}
        for job in _expand_entry(
            where, entry, f"matrix[{index}]", telemetry, datasets, budget, defaults
        ):
            if job.job_id in seen:
                raise where.error(
                    entry,
                    entry.line,
                    f"matrix[{index}]",
                    f"job {job.job_id!r} is also made by {seen[job.job_id]}; "
                    "give the methods distinct labels",
                )
            seen[job.job_id] = f"matrix[{index}]"
            jobs.append(PlannedJob(**{**job.__dict__, "plan_index": len(jobs)}))
    for job in scripts:
        jobs.append(PlannedJob(**{**job.__dict__, "plan_index": len(jobs)}))
    return Plan(
        path,
        idle_s,
        cooldown_s,
        max_attempts,
        order_seed,
        dict(telemetry),
        tuple(DatasetSource(n, s) for n, s in datasets.items()),
        tuple(jobs),
        doc,
        stall_s,
        wall_s,
        tuple(script_sources),
    )


def _scripts(
    where: _Where,
    doc: YamlMap,
    path: Path,
    telemetry: dict,
    limits: dict[str, float | None] | None = None,
) -> tuple[list[ScriptSource], list[PlannedJob]]:
    """The plan's own scripts: `scripts: [{name, path, args, devices, repeats}]`, each run by
    the agent like a built-in job (job id `script-NAME-rREPEAT`); their files, and the jobs."""
    section = doc.get("scripts", [])
    if not isinstance(section, list):
        raise where.error(doc, "scripts", "scripts", f"expected a list, got {section!r}")
    jobs: list[PlannedJob] = []
    sources: list[ScriptSource] = []
    names = set()
    for index, entry in enumerate(section):
        label = f"scripts[{index}]"
        if not isinstance(entry, YamlMap):
            raise where.error(section, index, label, "expected {name, path, args}")
        for key in entry:
            if key not in SCRIPT_KEYS:
                raise where.error(entry, key, f"{label}.{key}",
                                  f"unknown key; choose from {', '.join(SCRIPT_KEYS)}")
        name = entry.get("name")
        if not isinstance(name, str) or not LABEL_PATTERN.match(name) or name in names:
            raise where.error(entry, "name", f"{label}.name",
                              f"expected a new name of letters, digits, '.', '_', '-', got "
                              f"{name!r}")
        names.add(name)
        raw_path = entry.get("path")
        if not isinstance(raw_path, str) or not raw_path:
            raise where.error(entry, "path" if "path" in entry else entry.line,
                              f"{label}.path", f"expected the script's file, got {raw_path!r}")
        script = (path.parent / Path(raw_path).expanduser()).resolve()
        if not script.is_file():
            raise where.error(entry, "path", f"{label}.path", f"no such file {str(script)!r}")
        if script.stat().st_size > MAX_SCRIPT_BYTES:
            raise where.error(entry, "path", f"{label}.path",
                              f"{script} is larger than {MAX_SCRIPT_BYTES} bytes")
        args = entry.get("args", [])
        if isinstance(args, str):
            args = shlex.split(args)
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise where.error(entry, "args", f"{label}.args",
                              f"expected a list of arguments, got {args!r}")
        repeats = _int_list(where, entry, "repeats", f"{label}.repeats", [1], 1)[0]
        if len(jobs) + repeats > MAX_PLAN_JOBS:
            raise where.error(entry, "repeats", f"{label}.repeats",
                              f"{repeats:,} repeats; a plan may have at most "
                              f"{MAX_PLAN_JOBS:,} jobs")
        pinned = tuple(_name_list(where, entry, "devices", f"{label}.devices", [])
                       if "devices" in entry else ())
        sources.append(ScriptSource(name, script))
        for repeat in range(repeats):
            job_id = f"script-{name}-r{repeat}"
            spec = JobSpec.describe({
                "schema_version": 1, "job_id": job_id, "method": {"name": SCRIPT_METHOD},
                "model": None, "dataset": None, "epochs": None, "telemetry": dict(telemetry),
                "script": {"name": name, "args": [str(a) for a in args]},
                "limits": {k: v for k, v in (limits or {}).items() if v is not None},
            })
            jobs.append(PlannedJob(
                job_id=job_id, plan_index=0, kind="script", method="script", model=None,
                dataset=None, batch_size=None, epochs=None, max_steps=None, seed=None,
                repeat=repeat, pinned=pinned, spec=spec,
            ))
    return sources, jobs


def _datasets(where: _Where, doc: YamlMap, path: Path) -> dict[str, Path | None]:
    section = doc.get("datasets", {})
    if not isinstance(section, dict):
        raise where.error(doc, "datasets", "datasets", f"expected a mapping, got {section!r}")
    result: dict[str, Path | None] = {}
    for name, options in section.items():
        options = options or {}
        if not isinstance(options, dict) or set(options) - {"from"}:
            raise where.error(
                section,
                name,
                f"datasets.{name}",
                f"expected {{}} or {{from: PATH}}, got {options!r}",
            )
        if name not in DATASETS:
            raise where.error(section, name, f"datasets.{name}",
                              f"unknown data set; choose from {', '.join(DATASETS)}")
        source = options.get("from")
        if source is not None and (not isinstance(source, str) or not source):
            raise where.error(options, "from", f"datasets.{name}.from",
                              f"expected a path, got {source!r}")
        result[str(name)] = (path.parent / Path(source).expanduser()) if source else None
    return result


def _expand_entry(
    where: _Where,
    entry: Any,
    name: str,
    telemetry: dict,
    datasets: dict[str, Path | None],
    budget: int = MAX_PLAN_JOBS,
    limit_defaults: dict[str, float | None] | None = None,
) -> list[PlannedJob]:
    if not isinstance(entry, YamlMap):
        raise HarnessUsageError(f"{where.path}: field {name!r}: expected a mapping, got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise where.error(
                entry, key, f"{name}.{key}", f"unknown key; choose from {', '.join(ENTRY_KEYS)}"
            )
    methods = [
        _method(where, entry, value, f"{name}.methods[{i}]")
        for i, value in enumerate(_as_list(entry.get("methods", [])))
    ]
    if not methods:
        raise where.error(entry, "methods", f"{name}.methods", "expected at least one method")
    models = _name_list(where, entry, "models", f"{name}.models", None)
    data_names = _name_list(where, entry, "datasets", f"{name}.datasets", None)
    for data_name in data_names:
        if data_name not in datasets:
            raise where.error(
                entry,
                "datasets",
                f"{name}.datasets",
                f"{data_name!r} is not in the plan's 'datasets' section",
            )
    batch_sizes = _int_list(where, entry, "batch_sizes", f"{name}.batch_sizes", [100], 1)
    seeds = _int_list(where, entry, "seeds", f"{name}.seeds", [0], 0)
    repeats = _int_list(where, entry, "repeats", f"{name}.repeats", [1], 1)[0]
    pinned = tuple(
        _name_list(where, entry, "devices", f"{name}.devices", []) if "devices" in entry else ()
    )
    limits = entry.get("limits", {}) or {}
    if not isinstance(limits, dict):
        raise where.error(entry, "limits", f"{name}.limits", f"expected a mapping, got {limits!r}")
    limits = dict(limits)
    for key, default in (limit_defaults or {}).items():  # the entry's own, else the plan's
        value = _optional_seconds(where, entry, key, f"{name}.{key}", default)
        if value is not None:
            limits.setdefault(key, value)
    count = (
        len(methods) * len(models) * len(data_names) * len(batch_sizes) * len(seeds) * repeats
    )
    if count > budget:
        raise where.error(
            entry,
            entry.line,
            name,
            f"expands to {count:,} jobs; a plan may have at most {MAX_PLAN_JOBS:,} "
            f"({MAX_PLAN_JOBS - budget:,} before this entry)",
        )
    jobs = []
    for method, model, data_name, batch, seed, repeat in itertools.product(
        methods, models, data_names, batch_sizes, seeds, range(repeats)
    ):
        job_id = f"{model}-{data_name}-{method['label']}-b{batch}-s{seed}-r{repeat}"
        spec = {
            "schema_version": 1,
            "job_id": job_id,
            "method": method["options"],
            "model": model,
            "dataset": {"name": data_name},  # located when the run has the file
            "batch_size": batch,
            "epochs": entry.get("epochs", 1),
            "max_steps": entry.get("max_steps"),
            "seed": seed,
            "eval_every_epochs": entry.get("eval_every_epochs", 1),
            "telemetry": dict(telemetry),
            "limits": dict(limits),
        }
        try:
            checked = JobSpec.describe(spec)
        except SpecError as exc:
            key = exc.field.split(".")[0]
            key = SPEC_TO_ENTRY_KEY.get(key, key)
            node = entry if key in entry else (method["options"] if key == "method" else entry)
            raise where.error(
                node if isinstance(node, YamlMap) else entry,
                key,
                f"{name}.{exc.field}",
                str(exc).split(": ", 1)[1],
            ) from exc
        jobs.append(
            PlannedJob(
                job_id=job_id,
                plan_index=0,
                kind="train",
                method=checked["method"]["name"],
                model=model,
                dataset=data_name,
                batch_size=batch,
                epochs=checked["epochs"],
                max_steps=checked["max_steps"],
                seed=seed,
                repeat=repeat,
                pinned=pinned,
                spec=checked,
            )
        )
    return jobs


def idle_job(
    device: str,
    duration_s: float,
    telemetry: dict[str, Any],
    stall_timeout_s: float | None = None,
) -> PlannedJob:
    """The idle baseline of one device, as a job the agent runs (method `idle`)."""
    job_id = "idle-" + re.sub(r"[^A-Za-z0-9._-]", "_", device)
    spec = JobSpec.describe(
        {
            "schema_version": 1,
            "job_id": job_id,
            "method": {"name": IDLE_METHOD, "duration_s": duration_s},
            "model": None,
            "dataset": None,
            "epochs": None,
            "telemetry": dict(telemetry),
            "limits": {"stall_timeout_s": stall_timeout_s},
        }
    )
    return PlannedJob(
        job_id=job_id,
        plan_index=-1,
        kind="idle",
        method="idle",
        model=None,
        dataset=None,
        batch_size=None,
        epochs=None,
        max_steps=None,
        seed=None,
        repeat=None,
        pinned=(device,),
        spec=spec,
    )


def assign_to_devices(
    jobs: Sequence[PlannedJob], devices: Sequence[Any], seed: int
) -> list[PlannedJob]:
    """Every arm of a comparison on every device that may run it, in a random order per
    device (from `seed` and the device's name, so a resumed run finds the same order).

    A job eligible on several devices becomes one job per device (`<id>-on-<device>`,
    pinned to it); on one device it keeps its id. Each device's jobs run in blocks of
    (seed, repeat), shuffled within a block: the arms of one repeat run close together,
    in an order no arm can always win or lose by (warm-up, temperature, drift)."""
    by_device: dict[str, list[PlannedJob]] = {d.name: [] for d in devices}
    for job in jobs:
        names = [d.name for d in devices if eligible(job, d.name, d.tags)]
        for name in names:
            by_device[name].append(job if len(names) == 1 else _on_device(job, name))
    ordered: list[PlannedJob] = []
    for name, own in by_device.items():
        rng = random.Random(f"{seed}:{name}")
        blocks: dict[tuple, list[PlannedJob]] = {}
        for job in own:
            blocks.setdefault((job.seed or 0, job.repeat or 0), []).append(job)
        for key in sorted(blocks):
            block = blocks[key]
            rng.shuffle(block)
            ordered += block
    return ordered


def _on_device(job: PlannedJob, device: str) -> PlannedJob:
    job_id = f"{job.job_id}-on-{re.sub(r'[^A-Za-z0-9._-]', '_', device)}"
    return replace(job, job_id=job_id, pinned=(device,), spec={**job.spec, "job_id": job_id})


def eligible(job: PlannedJob, device_name: str, device_tags: tuple[str, ...] | list[str]) -> bool:
    """A job pinned to names or tags runs only on a matching device; unpinned jobs run anywhere."""
    return not job.pinned or device_name in job.pinned or any(t in job.pinned for t in device_tags)
