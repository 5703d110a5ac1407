"""`harness run`: run a plan on an inventory into a new run store, or finish one (`--resume`).

With no arguments it runs the embedded default: `inventory/local.yaml` (this
machine) and `inventory/plan-default.yaml` (standard vs lowmem, MLP on the
digits, after an idle baseline), shows progress per device and ends with a
comparison table per method and the run directory's path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from contract.checksum import file_sha256
from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus
from harness.manifest import build_manifest, path_sha256, redact
from harness.plan import assign_to_devices, eligible, idle_job, load_plan
from harness.progress import FleetProgress
from harness.runner import RERUN_STATUSES, Runner, check_pins
from harness.store import DB_NAME, RunStore
from harness.store.lock import RunDirLock
from harness.transport import make_transport

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PLAN_COPY = "plan.yaml"
LATEST = "latest"  # runs/latest -> the newest run
MIB = 1024 * 1024


def packaged_file(name: str) -> Path:
    """A file shipped in the `inventory` package (works from an installed package too)."""
    resource = resources.files("inventory") / name
    return Path(str(resource))


def point_latest(run_dir: Path, say) -> None:
    """`<runs>/latest` -> this run: a relative symlink, replaced atomically (the notebooks'
    and `harness notebook`'s default run)."""
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        say(f"{link} is not a link; left as it is (runs/latest not updated)")
        return
    temporary = run_dir.parent / f".{LATEST}-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as exc:  # e.g. a file system without symbolic links
        say(f"cannot point {link} at {run_dir.name}: {exc}")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def _start_meters(
    devices: list[Any], meters: dict[str, Any], store: RunStore, say
) -> tuple[list[Any], dict[str, Any]]:
    """A recorder per device with a meter, for the whole run (None: power not recorded).

    `meters` are the inventory's meter sections as recorded (`${VAR}` references, not
    their values): what goes into the manifest, and the name the samples are stored under.
    """
    try:
        from harness.meters import describe_meter, start_recorder
    except ImportError as exc:
        say(f"power: not recorded (the meters package is not available: {exc})")
        return [], {"recorded": False, "reason": f"harness.meters unavailable: {exc}"}
    recorders, sources, described = [], {}, {}
    for device in devices:
        if not device.meter:
            sources[device.name] = None
            continue
        config = dict(device.meter)
        if "name" in config:  # a name from ${VAR} is recorded as the reference
            config["name"] = meters[device.name].get("name", config["name"])
        recorders.append(start_recorder(config, store, device.name,
                                        remote=device.transport != "local"))
        sources[device.name] = meters[device.name]
        described[device.name] = [describe_meter(config, device.name)]
    store.set_run_info(meters=described)  # what produced each figure (analysis.run_energy)
    if not recorders:
        say("power: no device has a meter in the inventory; energy is not measured")
    return recorders, {"recorded": bool(recorders), "meters": sources}


def _jobs_to_run(store: RunStore, planned: list[Any]) -> tuple[list[Any], dict[str, int]]:
    store.flush()
    rows = store.reader.job_states()
    todo = [job for job in planned if rows[job.job_id]["status"] in RERUN_STATUSES]
    attempts = {job_id: row["attempts"] for job_id, row in rows.items()}
    return todo, attempts


def _run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    say = err.print
    from harness.inventory import load_inventory

    if args.resume:
        return _resume(args, say)
    inventory_path = Path(args.devices) if args.devices else packaged_file("local.yaml")
    plan_path = Path(args.plan) if args.plan else packaged_file("plan-default.yaml")
    run_id = args.run_id or new_run_id()
    if not RUN_ID_PATTERN.match(run_id):
        raise HarnessUsageError(
            f"--run-id: expected letters, digits, '.', '_', '-', got {run_id!r}"
        )
    if run_id == LATEST:
        raise HarnessUsageError(f"--run-id: {LATEST!r} names the link to the newest run")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HarnessUsageError(f"--out: {out} is a file, not a directory of runs")
    run_dir = out / run_id
    inventory = load_inventory(inventory_path)
    plan = load_plan(plan_path)
    check_pins(list(plan.jobs), inventory.devices, plan_path)
    if (run_dir / DB_NAME).exists():
        raise HarnessUsageError(f"{run_dir}: a run store already exists there (use --resume)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessUsageError(f"--out: cannot make {run_dir}: {exc.strerror or exc}") from exc
    with ExitStack() as stack:
        # From here on the directory is a run that `--resume` can finish: locked, with its
        # store, its plan and its manifest written before anything else can fail.
        stack.enter_context(RunDirLock.acquire(run_dir))
        store = RunStore.create(run_dir)
        stack.callback(store.close)
        shutil.copyfile(plan_path, run_dir / PLAN_COPY)
        store.write_manifest(build_manifest(run_dir.name, sys.argv, plan, inventory, [], {}))
        store.set_run_info(run_id=run_dir.name, created_host_s=time.time())
        return _serve_and_execute(args, stack, store, run_dir, plan, inventory, False, say)


def _resume(args: argparse.Namespace, say) -> int:
    from harness.inventory import load_inventory

    run_dir = Path(args.resume)
    if args.plan:
        raise HarnessUsageError("--plan: a resumed run keeps its own plan (run_dir/plan.yaml)")
    if not (run_dir / DB_NAME).is_file():
        raise HarnessUsageError(f"{run_dir}: no {DB_NAME} (not a run directory)")
    with ExitStack() as stack:
        stack.enter_context(RunDirLock.acquire(run_dir))
        store = RunStore.open(run_dir)
        stack.callback(store.close)
        manifest = store.read_manifest()
        inventory_path = _resume_inventory_path(args, manifest, run_dir, say)
        inventory = load_inventory(inventory_path)
        plan = load_plan(run_dir / PLAN_COPY)
        check_pins(list(plan.jobs), inventory.devices, run_dir / PLAN_COPY)
        return _serve_and_execute(args, stack, store, run_dir, plan, inventory, True, say)


def _resume_inventory_path(args, manifest: dict[str, Any], run_dir: Path, say) -> Path:
    """--devices, or the inventory the run started with (warning if it changed since)."""
    if args.devices:
        return Path(args.devices)
    recorded = manifest.get("inventory", {})
    path = Path(str(recorded.get("path", "")))
    if not path.is_absolute():  # a manifest from before paths were absolute
        path = Path(str(manifest.get("cwd", "."))) / path
    if not path.exists():
        raise HarnessUsageError(
            f"{run_dir}: the run's inventory {path} is gone; give it with --devices"
        )
    digest = recorded.get("sha256")
    if digest and digest != path_sha256(path):
        say(f"[yellow]warning[/yellow]: {path} changed since the run started "
            "(devices may differ from the first attempt's)", soft_wrap=True)
    return path


def _serve_and_execute(
    args, stack: ExitStack, store: RunStore, run_dir: Path, plan, inventory, resumed: bool, say
) -> int:
    point_latest(run_dir, say)
    if args.dashboard is not None:
        from harness.dashboard import start_dashboard

        try:
            server = stack.enter_context(start_dashboard(run_dir, port=args.dashboard))
        except HarnessError as exc:
            raise HarnessUsageError(
                f"{exc}; the run {run_dir} is kept: `harness run --resume {run_dir}` "
                "starts it (with --dashboard on a free port, or without)"
            ) from exc
        say(f"dashboard: {server.url}")
    return _execute(args, store, run_dir, plan, inventory, inventory.devices, resumed, say)


def _execute(
    args, store: RunStore, run_dir: Path, plan, inventory, devices, resumed: bool, say
) -> int:
    from harness.commands.data import prepare_dataset

    data_dir = run_dir / "data"
    prepared = {}
    for source in plan.datasets:
        existing = data_dir / f"{source.name}.npz"
        if existing.is_file():
            prepared[source.name] = existing
        else:
            say(f"preparing data set {source.name} ...")
            try:
                prepared[source.name] = prepare_dataset(source.name, source.source, data_dir).path
            except HarnessError as exc:
                raise type(exc)(
                    f"{exc} (the run {run_dir} is kept: fix this, then "
                    f"`harness run --resume {run_dir}`)"
                ) from exc
    scripts = snapshot_scripts(plan.jobs, run_dir)
    idle_jobs = (
        [idle_job(d.name, plan.idle_baseline_s, plan.telemetry, plan.stall_timeout_s)
         for d in devices]
        if plan.idle_baseline_s > 0
        else []
    )
    seed = _order_seed(store, plan, resumed)
    arms = assign_to_devices(plan.jobs, devices, seed)
    planned = idle_jobs + arms
    store.set_run_info(order={
        "seed": seed,
        "jobs": {d.name: [j.job_id for j in arms if eligible(j, d.name, d.tags)]
                 for d in devices},
    })
    say(f"job order per device: random, seed {seed} (plan order_seed to repeat it)")
    meters = {device.name: redact(inventory.redacted_meter(device.name)) for device in devices}
    for device in devices:
        store.add_device(
            device.name, device.transport, device.host, device.tags, meters[device.name]
        )
    store.add_jobs(planned)
    if resumed:
        left = store.mark_unfinished_incomplete("the harness stopped while it ran")
        manifest = store.read_manifest()
        manifest.setdefault("resumes", []).append(
            {"t_host_s": time.time(), "argv": sys.argv, "incomplete_jobs": left}
        )
        store.write_manifest(manifest)
    todo, attempts = _jobs_to_run(store, planned)
    checksums = {path: file_sha256(path) for path in {*prepared.values(), *scripts.values()}}
    recorders, power = _start_meters(devices, meters, store, say)
    manifest = store.read_manifest()
    if not manifest.get("datasets") or not manifest.get("power"):  # the first start
        manifest["datasets"] = [
            {"name": n, "file": str(p), "sha256": checksums[p]} for n, p in prepared.items()
        ]
        manifest["power"] = power
        store.write_manifest(manifest)
    say(
        f"run {run_dir}: {len(todo)} job(s) to run on {len(devices)} device(s)"
        + (f" (resumed; {len(planned) - len(todo)} already finished)" if resumed else "")
    )
    runner = Runner(
        store,
        devices,
        todo,
        prepared,
        max_attempts=plan.max_attempts,
        cooldown_s=plan.cooldown_s,
        attempts=attempts,
        log=say,
        transport_factory=lambda d: make_transport(d, local_root=run_dir / "devices" / d.name),
        script_files=scripts,
        checksums=checksums,
    )
    interrupted = False
    try:
        fleet = FleetProgress([w.progress for w in runner.workers], console=Console(stderr=True))
        with fleet.progress:
            try:
                runner.start()
                while runner.alive():
                    fleet.update()
                    if store.fatal_error is not None:
                        say(f"{store.fatal_error}: stopping the agents ...")
                        runner.stop()
                        break
                    time.sleep(0.25)
                fleet.update()
            except KeyboardInterrupt:
                interrupted = True
                say("interrupted: stopping the agents ...")
                runner.stop()
            runner.finish()
    finally:
        for recorder in recorders:
            recorder.stop()
        store.flush()
    if store.fatal_error is not None:
        raise HarnessError(
            f"{store.fatal_error}; the run stopped, everything recorded before is kept "
            f"({store.lost_rows} record(s) could not be written). Free space, then "
            f"`harness run --resume {run_dir}`"
        )
    if store.rejected_rows:
        say(f"run store: {store.rejected_rows} bad record(s) rejected (see the messages above)")
    print_comparison(store, run_dir)
    if interrupted:
        return ExitStatus.INTERRUPTED
    statuses = [r["status"] for r in store.reader.job_states().values()]
    return ExitStatus.OK if all(s == "completed" for s in statuses) else ExitStatus.PARTIAL


def _order_seed(store: RunStore, plan, resumed: bool) -> int:
    """The plan's `order_seed`; else the one this run recorded (resume); else a new one."""
    if plan.order_seed is not None:
        return plan.order_seed
    if resumed:
        store.flush()
        rows = store.query("SELECT value FROM run_info WHERE key = 'order'")
        if rows:
            return int(json.loads(rows[0]["value"])["seed"])
    return secrets.randbelow(2**31)


def snapshot_scripts(jobs: Any, run_dir: Path) -> dict[str, Path]:
    """The plan's scripts copied into RUN/scripts/ (once: a resumed run runs the same code);
    script name -> the copy, which is what devices get."""
    copies: dict[str, Path] = {}
    for job in jobs:
        if job.kind != "script" or job.spec["script"]["name"] in copies:
            continue
        name, source = job.spec["script"]["name"], Path(job.spec["script"]["path"])
        target = run_dir / "scripts" / f"script-{name}{source.suffix or '.py'}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        copies[name] = target
    return copies


def print_comparison(store: RunStore, run_dir: Path) -> None:
    """Per device, meter, method, model and data set: jobs, peak memory, time and energy per
    epoch (with its interval, from `analysis`: the figures the report and export show),
    accuracy; then how many energy figures are ok, low-confidence or withheld, and why."""
    from analysis.compare import ENERGY_PER_EPOCH, t_interval, with_measurement
    from analysis.jobs import job_table
    from analysis.load import load_run
    from analysis.run_energy import energy_table, meter_infos

    store.flush()
    run = load_run(run_dir)
    energy = energy_table(run)
    meters = meter_infos(run.info, run.devices)
    assumed: dict[str, str] = {}  # meter type -> why its class is an assumption
    jobs = job_table(run, energy)
    # A terminal's own width; in a log or a pipe wide enough that no figure wraps away
    # from its interval and its 'modeled' label.
    console = Console(width=None if sys.stdout.isatty() else 220)
    table = Table(title="comparison per method (within a device and meter)")
    for column in ("device", "meter", "method", "model", "data", "jobs ok", "peak tensor MiB",
                   "peak RSS+ MiB", "peak RSS MiB", "s / epoch", "J / epoch [95 %]",
                   "test accuracy"):
        table.add_column(column, justify="right")
    keys = ["device", "meter", "meter_kind", "method", "model", "dataset"]
    emulated = _emulated_devices(run)
    for key, frame in jobs.groupby(keys, dropna=False, sort=False):
        device, meter, kind, method, model, dataset = key
        done = frame[frame["result_status"] == "completed"]
        figure = with_measurement(t_interval(done[ENERGY_PER_EPOCH.column]), done,
                                  ENERGY_PER_EPOCH)
        withheld = int((done["energy_status"] == "withheld").sum())
        if figure.n:
            text = f"{figure.mean:.3g} [{figure.low:.3g}, {figure.high:.3g}]"
            text += " modeled" if kind == "modeled" else ""
            text += f" ({withheld} withheld)" if withheld else ""
        else:
            text = "withheld" if withheld else "n/a"
        throttled = int(done["throttled"].fillna(False).astype(bool).sum())
        shown = f"{method} ({throttled} throttled)" if throttled else str(method)
        name = f"{device} (emulated)" if device in emulated else str(device)
        info = meters.get((device, meter))
        shown_meter = meter if isinstance(meter, str) else "-"
        if info is not None and info.accuracy.assumed:
            shown_meter += " (class assumed)"
            assumed[info.type] = info.accuracy.source
        table.add_row(name, shown_meter, shown,
                      str(model), str(dataset), f"{len(done)}/{len(frame)}",
                      _mean(done["peak_tensor_bytes"], MIB),
                      _mean(done["peak_rss_delta_bytes"], MIB),
                      _mean(done["peak_hwm_bytes"], MIB), _mean(done["epoch_s"]), text,
                      _mean(done["test_accuracy"]))
    console.print(table)
    for device, how in emulated.items():
        console.print(f"{device}: emulated ({how}): its times and energy are not the target's")
    for kind, source in sorted(assumed.items()):
        console.print(f"{kind}: its accuracy class (in every interval above) is {source}")
    console.print("memory: 'peak tensor' is the engine's tensor ledger over the first steps; "
                  "'peak RSS+' the process's resident-set growth over the job, 'peak RSS' its "
                  "high-water mark: RSS also counts the allocator's retained pages, torch's "
                  "scratch and the interpreter, torch and the engine themselves")
    if energy.empty:
        console.print("energy: no figures (no power samples or no recorded phases)")
    else:
        counts = energy["status"].value_counts()
        console.print(
            f"energy figures: {counts.get('ok', 0)} ok, {counts.get('low_confidence', 0)} "
            f"low-confidence, {counts.get('withheld', 0)} withheld (of {len(energy)} windows; "
            "`harness export` writes them all to energy.csv)"
        )
        for r in energy[energy["status"] != "ok"].head(10).itertuples():
            where = f"epoch {r.epoch}" if r.phase == "epoch" else r.phase
            console.print(f"  {r.status}: {r.device}/{r.meter} {r.job} {where}: {r.reason}")
    print(f"run directory: {run_dir}")


def _emulated_devices(run) -> dict[str, str]:
    """Devices whose `hello` facts say they run emulated (the lab's arm64 devices)."""
    from analysis.conditions import device_table

    table = device_table(run)
    return {str(d): str(e) for d, e in zip(table["device"], table["emulation"]) if e == e and e}


def _mean(values, scale: float = 1.0) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    return f"{sum(values) / len(values) / scale:.3f}"


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a plan on devices (default: this machine)")
    run.add_argument("--devices", help="inventory file (default: the embedded local.yaml)")
    run.add_argument("--plan", help="plan file (default: the embedded plan-default.yaml)")
    run.add_argument("--out", default="runs", help="directory of run directories (./runs)")
    run.add_argument("--run-id", help="name of the run directory (default: time + random)")
    run.add_argument(
        "--resume", metavar="RUN_DIR", help="finish the jobs of this run that did not complete"
    )
    run.add_argument(
        "--dashboard", nargs="?", type=int, const=8050, metavar="PORT",
        help="serve the live dashboard on 127.0.0.1:PORT (default 8050) during the run",
    )
    run.set_defaults(handler=_run)
