"""The run service: one run of a plan on an inventory, from its directory to its summary.

`harness run` turns its command line into a `RunRequest` and calls `RunService.run`;
everything else is here, one step per method, in the order it happens: the locked run
directory with its store, plan copy and manifest (written before anything can fail, so
`--resume` can finish any run); the dashboard; the data sets, prepared and hashed once;
the idle baselines and each device's job order; the meters; the runner, with its progress
on the terminal; and the end-of-run summary (`harness.summary`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from contract.checksum import file_sha256
from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus
from harness.manifest import build_manifest, path_sha256, redact
from harness.plan import Plan, ScriptSource, assign_to_devices, eligible, idle_job, load_plan
from harness.progress import FleetProgress
from harness.recorder import Recorder
from harness.runner import RERUN_STATUSES, Runner, check_pins
from harness.store import DB_NAME, PlannedJob, RunStore
from harness.store.lock import RunDirLock
from harness.summary import print_comparison
from harness.transport import make_transport

if TYPE_CHECKING:
    from harness.inventory import Inventory

PLAN_COPY = "plan.yaml"
LATEST = "latest"  # runs/latest -> the newest run
POLL_S = 0.25  # how often the terminal's bars are redrawn and the store's health checked

Say = Callable[..., None]


@dataclass(frozen=True)
class RunRequest:
    """What `harness run` was asked: a new run (`plan_path`, `inventory_path`) into
    `run_dir`, or the unfinished jobs of the run in `run_dir` (`resume`: its own plan, and
    its own inventory unless `inventory_path` is given)."""

    run_dir: Path
    resume: bool = False
    plan_path: Path | None = None
    inventory_path: Path | None = None
    dashboard_port: int | None = None  # serve the live dashboard on this port
    argv: tuple[str, ...] = ()  # recorded in the manifest


@dataclass(frozen=True)
class _Run:
    """An open run: its store, plan and inventory (what every later step reads)."""

    store: RunStore
    run_dir: Path
    plan: Plan
    inventory: Inventory
    resumed: bool


class RunService:
    """Carries out one `RunRequest`; `run()` returns the exit status."""

    def __init__(self, request: RunRequest, say: Say) -> None:
        self.request = request
        self.say = say  # progress lines and warnings (stderr)

    def run(self) -> int:
        with ExitStack() as stack:
            run = self._resume(stack) if self.request.resume else self._create(stack)
            point_latest(run.run_dir, self.say)
            self._serve_dashboard(stack, run.run_dir)
            return self._execute(run)

    # ------------------------------------------------------------ the run directory

    def _create(self, stack: ExitStack) -> _Run:
        from harness.inventory import load_inventory

        request = self.request
        run_dir, plan_path = request.run_dir, request.plan_path
        if plan_path is None or request.inventory_path is None:
            raise ValueError("a new run needs its plan and inventory")
        inventory = load_inventory(request.inventory_path)
        plan = load_plan(plan_path)
        check_pins(list(plan.jobs), inventory.devices, plan_path)
        if (run_dir / DB_NAME).exists():
            raise HarnessUsageError(f"{run_dir}: a run store already exists there (use --resume)")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessUsageError(
                f"--out: cannot make {run_dir}: {exc.strerror or exc}"
            ) from exc
        # From here on the directory is a run that `--resume` can finish: locked, with its
        # store, its plan and its manifest written before anything else can fail.
        stack.enter_context(RunDirLock.acquire(run_dir))
        store = stack.enter_context(RunStore.create(run_dir))
        shutil.copyfile(plan_path, run_dir / PLAN_COPY)
        store.write_manifest(
            build_manifest(run_dir.name, list(request.argv), plan, inventory, [], {})
        )
        store.set_run_info(run_id=run_dir.name, created_host_s=time.time())
        return _Run(store, run_dir, plan, inventory, resumed=False)

    def _resume(self, stack: ExitStack) -> _Run:
        from harness.inventory import load_inventory

        run_dir = self.request.run_dir
        if not (run_dir / DB_NAME).is_file():
            raise HarnessUsageError(f"{run_dir}: no {DB_NAME} (not a run directory)")
        stack.enter_context(RunDirLock.acquire(run_dir))
        store = stack.enter_context(RunStore.open(run_dir))
        inventory = load_inventory(self._resume_inventory_path(store.read_manifest()))
        plan = load_plan(run_dir / PLAN_COPY)
        check_pins(list(plan.jobs), inventory.devices, run_dir / PLAN_COPY)
        return _Run(store, run_dir, plan, inventory, resumed=True)

    def _resume_inventory_path(self, manifest: dict[str, Any]) -> Path:
        """--devices, or the inventory the run started with (warning if it changed since)."""
        if self.request.inventory_path is not None:
            return self.request.inventory_path
        recorded = manifest.get("inventory", {})
        path = Path(str(recorded.get("path", "")))
        if not path.is_absolute():  # a manifest from before paths were absolute
            path = Path(str(manifest.get("cwd", "."))) / path
        if not path.exists():
            raise HarnessUsageError(
                f"{self.request.run_dir}: the run's inventory {path} is gone; "
                "give it with --devices"
            )
        digest = recorded.get("sha256")
        if digest and digest != path_sha256(path):
            self.say(f"[yellow]warning[/yellow]: {path} changed since the run started "
                     "(devices may differ from the first attempt's)", soft_wrap=True)
        return path

    def _serve_dashboard(self, stack: ExitStack, run_dir: Path) -> None:
        if self.request.dashboard_port is None:
            return
        from harness.dashboard import start_dashboard

        try:
            server = stack.enter_context(
                start_dashboard(run_dir, port=self.request.dashboard_port))
        except HarnessError as exc:
            raise HarnessUsageError(
                f"{exc}; the run {run_dir} is kept: `harness run --resume {run_dir}` "
                "starts it (with --dashboard on a free port, or without)"
            ) from exc
        self.say(f"dashboard: {server.url}")

    # ------------------------------------------------------------ the run

    def _execute(self, run: _Run) -> int:
        store, devices = run.store, run.inventory.devices
        prepared, checksums = self._prepare_data(run)
        scripts = snapshot_scripts(run.plan.scripts, run.run_dir)
        checksums.update({path: file_sha256(path) for path in scripts.values()})
        meters = {d.name: redact(run.inventory.redacted_meter(d.name)) for d in devices}
        planned = self._record_jobs(run, meters)
        if run.resumed:
            self._record_resume(store)
        todo, attempts = _jobs_to_run(store, planned)
        recorders, power = _start_meters(devices, meters, store, self.say)
        manifest = store.read_manifest()
        if not manifest.get("datasets") or not manifest.get("power"):  # the first start
            manifest["datasets"] = [
                {"name": n, "file": str(p), "sha256": checksums[p]} for n, p in prepared.items()
            ]
            manifest["power"] = power
            store.write_manifest(manifest)
        self.say(
            f"run {run.run_dir}: {len(todo)} job(s) to run on {len(devices)} device(s)"
            + (f" (resumed; {len(planned) - len(todo)} already finished)"
               if run.resumed else "")
        )
        runner = Runner(
            Recorder(store, log=self.say),
            devices,
            todo,
            prepared,
            max_attempts=run.plan.max_attempts,
            cooldown_s=run.plan.cooldown_s,
            attempts=attempts,
            log=self.say,
            transport_factory=lambda d: make_transport(
                d, local_root=run.run_dir / "devices" / d.name),
            script_files=scripts,
            checksums=checksums,
        )
        try:
            interrupted = self._drive(runner, store)
        finally:
            for recorder in recorders:
                recorder.stop()
            store.flush()
        return self._finish(run, interrupted)

    def _prepare_data(self, run: _Run) -> tuple[dict[str, Path], dict[Path, str]]:
        """Each data set's prepared file (prepared now unless the run has it) and every
        file's checksum, computed once for the run (manifest, specs and deployment)."""
        from harness.commands.data import prepare_dataset

        data_dir = run.run_dir / "data"
        prepared: dict[str, Path] = {}
        checksums: dict[Path, str] = {}
        for source in run.plan.datasets:
            existing = data_dir / f"{source.name}.npz"
            if existing.is_file():
                prepared[source.name] = existing
                checksums[existing] = file_sha256(existing)
                continue
            self.say(f"preparing data set {source.name} ...")
            try:
                made = prepare_dataset(source.name, source.source, data_dir)
            except HarnessError as exc:
                raise type(exc)(
                    f"{exc} (the run {run.run_dir} is kept: fix this, then "
                    f"`harness run --resume {run.run_dir}`)"
                ) from exc
            prepared[source.name], checksums[made.path] = made.path, made.sha256
        return prepared, checksums

    def _record_jobs(self, run: _Run, meters: dict[str, Any]) -> list[PlannedJob]:
        """The idle baselines and the plan's jobs in each device's order, with the devices,
        into the store (a resume finds its jobs there already and keeps them)."""
        store, plan, devices = run.store, run.plan, run.inventory.devices
        idle_jobs = (
            [idle_job(d.name, plan.idle_baseline_s, plan.telemetry, plan.stall_timeout_s)
             for d in devices]
            if plan.idle_baseline_s > 0
            else []
        )
        seed = _order_seed(store, plan, run.resumed)
        arms = assign_to_devices(plan.jobs, devices, seed)
        store.set_run_info(order={
            "seed": seed,
            "jobs": {d.name: [j.job_id for j in arms if eligible(j, d.name, d.tags)]
                     for d in devices},
        })
        self.say(f"job order per device: random, seed {seed} (plan order_seed to repeat it)")
        for device in devices:
            store.add_device(
                device.name, device.transport, device.host, device.tags, meters[device.name]
            )
        planned = idle_jobs + arms
        store.add_jobs(planned)
        return planned

    def _record_resume(self, store: RunStore) -> None:
        """Jobs a dead harness left running become incomplete; the manifest lists the resume."""
        left = store.mark_unfinished_incomplete("the harness stopped while it ran")
        manifest = store.read_manifest()
        manifest.setdefault("resumes", []).append(
            {"t_host_s": time.time(), "argv": list(self.request.argv), "incomplete_jobs": left}
        )
        store.write_manifest(manifest)

    def _drive(self, runner: Runner, store: RunStore) -> bool:
        """Run the jobs with a progress bar per device until they end, the store can no
        longer write, or Ctrl-C (True: interrupted)."""
        interrupted = False
        fleet = FleetProgress([w.progress for w in runner.workers], console=Console(stderr=True))
        with fleet.progress:
            try:
                runner.start()
                while runner.alive():
                    fleet.update()
                    if store.fatal_error is not None:
                        self.say(f"{store.fatal_error}: stopping the agents ...")
                        runner.stop()
                        break
                    time.sleep(POLL_S)
                fleet.update()
            except KeyboardInterrupt:
                interrupted = True
                self.say("interrupted: stopping the agents ...")
                runner.stop()
            runner.finish()
        return interrupted

    def _finish(self, run: _Run, interrupted: bool) -> int:
        """The summary and the exit status (the store's fatal error is the run's)."""
        store = run.store
        if store.fatal_error is not None:
            raise HarnessError(
                f"{store.fatal_error}; the run stopped, everything recorded before is kept "
                f"({store.lost_rows} record(s) could not be written). Free space, then "
                f"`harness run --resume {run.run_dir}`"
            )
        if store.rejected_rows:
            self.say(f"run store: {store.rejected_rows} bad record(s) rejected "
                     "(see the messages above)")
        store.flush()
        print_comparison(run.run_dir)
        if interrupted:
            return ExitStatus.INTERRUPTED
        statuses = [r["status"] for r in store.reader.job_states().values()]
        return ExitStatus.OK if all(s == "completed" for s in statuses) else ExitStatus.PARTIAL


def _start_meters(
    devices: list[Any], meters: dict[str, Any], store: RunStore, say: Say
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


def _jobs_to_run(
    store: RunStore, planned: list[PlannedJob]
) -> tuple[list[PlannedJob], dict[str, int]]:
    store.flush()
    rows = store.reader.job_states()
    todo = [job for job in planned if rows[job.job_id]["status"] in RERUN_STATUSES]
    attempts = {job_id: row["attempts"] for job_id, row in rows.items()}
    return todo, attempts


def _order_seed(store: RunStore, plan: Plan, resumed: bool) -> int:
    """The plan's `order_seed`; else the one this run recorded (resume); else a new one."""
    if plan.order_seed is not None:
        return plan.order_seed
    if resumed:
        store.flush()
        rows = store.query("SELECT value FROM run_info WHERE key = 'order'")
        if rows:
            return int(json.loads(rows[0]["value"])["seed"])
    return secrets.randbelow(2**31)


def snapshot_scripts(scripts: Sequence[ScriptSource], run_dir: Path) -> dict[str, Path]:
    """The plan's scripts copied into RUN/scripts/ (once: a resumed run runs the same code);
    script name -> the copy, which is what devices get."""
    copies: dict[str, Path] = {}
    for script in scripts:
        target = run_dir / "scripts" / f"script-{script.name}{script.path.suffix or '.py'}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(script.path, target)
        copies[script.name] = target
    return copies


def point_latest(run_dir: Path, say: Say) -> None:
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
