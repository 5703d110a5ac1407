"""Scale of the SSH fleet: 16 loopback sshd devices running short jobs through `harness run`.

Measures, side by side in one invocation:

- the host's CPU time per device event: CPU (user + system) of the `harness run`
  process divided by the events it stored, for a short and a longer run; the
  difference of the two gives the marginal cost of one more event without
  start-up (imports, deployment, data preparation);
- how fast events reach the store: a reader polls `run.sqlite` (WAL, read-only)
  every 20 ms and notes when each event row first appears; the delay is that
  moment minus the event's device time mapped to host time (`t_host_s`).

    python benchmarks/fleet_scale.py [--devices 16] [--short-s 4] [--long-s 12]
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from harness.lab import Lab  # noqa: E402

POLL_S = 0.02
# One tiny training job (pinned to dev1) besides the idle jobs every device runs.
PLAN = """\
idle_baseline_s: {idle_s}
cooldown_s: 0
max_attempts: 1
telemetry: {{memory_hz: 10, power_hz: 1, step_every: 1}}
datasets:
  digits: {{}}
matrix:
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    batch_sizes: [64]
    seeds: [0]
    epochs: 1
    max_steps: 2
    devices: [dev1]
"""


@dataclass
class RunFigures:
    idle_s: float
    exit_code: int
    wall_s: float
    cpu_s: float
    events: int
    delays_s: list[float]
    transport_delays_s: list[float]


class StoreWatcher(threading.Thread):
    """Polls the run store and records when each event row becomes visible."""

    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.delays_s: list[float] = []
        self.transport_delays_s: list[float] = []

    def run(self) -> None:
        while not self.db.exists() and not self.stop.is_set():
            time.sleep(POLL_S)
        connection = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        last_id = 0
        try:
            while True:
                done = self.stop.is_set()
                try:
                    rows = connection.execute(
                        "SELECT id, t_host_s, t_received_host_s FROM events WHERE id > ? "
                        "ORDER BY id", (last_id,)
                    ).fetchall()
                except sqlite3.OperationalError:  # tables not created yet
                    rows = []
                seen = time.time()
                for row_id, t_host_s, received_s in rows:
                    last_id = row_id
                    if t_host_s is not None:
                        self.delays_s.append(seen - t_host_s)
                        if received_s is not None:
                            self.transport_delays_s.append(received_s - t_host_s)
                if done:
                    return
                time.sleep(POLL_S)
        finally:
            connection.close()


def run_once(lab: Lab, work: Path, idle_s: float, tag: str) -> RunFigures:
    plan = work / f"plan-{tag}.yaml"
    plan.write_text(PLAN.format(idle_s=idle_s))
    run_dir = work / "runs" / tag
    watcher = StoreWatcher(run_dir / "run.sqlite")
    watcher.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--devices", str(lab.inventory_path),
         "--plan", str(plan), "--out", str(work / "runs"), "--run-id", tag],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
    )
    wall_s = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(0.2)
    watcher.stop.set()
    watcher.join(10)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
    connection = sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True)
    (events,) = connection.execute("SELECT count(*) FROM events").fetchone()
    connection.close()
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RunFigures(idle_s, result.returncode, wall_s, cpu_s, events,
                      watcher.delays_s, watcher.transport_delays_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--short-s", type=float, default=4.0, help="idle job length, short run")
    parser.add_argument("--long-s", type=float, default=12.0, help="idle job length, long run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        work = Path(tmp)
        lab = Lab(work / "lab")
        lab.up(args.devices)
        try:
            runs = [run_once(lab, work, args.short_s, "short"),
                    run_once(lab, work, args.long_s, "long")]
        finally:
            lab.down()
    print(f"{args.devices} loopback sshd devices, idle jobs + 1 training job, memory_hz 10")
    print(f"{'run':>6} {'exit':>4} {'wall s':>7} {'host CPU s':>10} {'events':>7} "
          f"{'CPU ms/event':>12} {'median delay s':>14} {'p95 delay s':>11} "
          f"{'median wire s':>13}")
    for name, r in zip(("short", "long"), runs):
        p95 = statistics.quantiles(r.delays_s, n=20)[-1] if len(r.delays_s) > 1 else float("nan")
        print(f"{name:>6} {r.exit_code:>4} {r.wall_s:>7.1f} {r.cpu_s:>10.2f} {r.events:>7} "
              f"{1000 * r.cpu_s / max(1, r.events):>12.3f} "
              f"{statistics.median(r.delays_s):>14.3f} {p95:>11.3f} "
              f"{statistics.median(r.transport_delays_s):>13.3f}")
    short, long = runs
    extra_events = long.events - short.events
    if extra_events > 0:
        marginal_ms = 1000 * (long.cpu_s - short.cpu_s) / extra_events
        print(f"marginal host CPU per extra event: {marginal_ms:.3f} ms "
              f"({extra_events} more events cost {long.cpu_s - short.cpu_s:.2f} s)")
    worst = max(statistics.median(r.delays_s) for r in runs)
    verdict = "<" if worst < 1 else ">="
    print(f"median event-to-store delay {verdict} 1 s: worst median {worst:.3f} s")
    return 0 if worst < 1 and all(r.exit_code == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
