"""`harness dashboard` over real HTTP and a real SQLite store: the cursor follower, the store
problems (missing, empty, older schema), the event stream, the run list and the token rule."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from analysis.run_energy import PhaseWindow, figure_for, unknown_meter
from harness.dashboard import start_dashboard
from harness.dashboard.follow import StoreFollower, StoreProblem, open_store
from harness.errors import HarnessUsageError
from harness.store import SCHEMA_VERSION, PlannedJob, RunStore

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Sample:
    t_host_s: float
    power_w: float
    volts: float = 5.1
    amps: float | None = None


def planned(job_id: str, method: str = "standard") -> PlannedJob:
    return PlannedJob(job_id, 0, "train", method, "mlp", "digits", 100, 2, None, 0, 0, (), {})


def write_run(run_dir: Path, t0: float, n: int = 50) -> RunStore:
    """A small run written through the store's public API, as the runner writes one."""
    store = RunStore.create(run_dir).start()
    store.add_device("pi-1", "ssh", "10.0.0.1", ["pi4"], {"type": "um25c"})
    store.add_jobs([planned("job-a")])
    store.set_device_status("pi-1", "running")
    store.start_job("job-a", "pi-1", 1, t0)
    store.add_power_samples("pi-1", "um25c", [Sample(t0 + i * 0.1, 3.0 + i % 5) for i in range(n)])
    store.add_phase("pi-1", "job-a", 1, "setup", 0, t0, t0 + 0.5)
    store.add_phase("pi-1", "job-a", 1, "epoch", 1, t0 + 0.5, t0 + 2.5)
    store.flush()
    return store


def read_stream(url: str, until: str, timeout_s: float = 10.0) -> list[tuple[str, dict]]:
    """Server-sent events from `url` up to and including the first event named `until`."""
    events: list[tuple[str, dict]] = []
    name = None
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
                if name == until:
                    return events
    return events


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_follower_returns_only_new_rows_and_energy_so_far_matches_analysis(tmp_path):
    t0 = time.time() - 10
    store = write_run(tmp_path / "run", t0)
    try:
        follower = StoreFollower(tmp_path / "run")
        rows, more = follower.poll()
        assert not more
        ((device, meter, t_s, power_w, volts, amps),) = rows["power"]  # one series, columns
        assert (device, meter, len(t_s), len(rows["phases"])) == ("pi-1", "um25c", 50, 2)
        assert (t_s[0], power_w[:6], volts[0], amps[0]) == (t0, [3, 4, 5, 6, 7, 3], 5.1, None)
        assert follower.poll()[0]["power"] == []  # the cursor moved on: nothing re-read
        later = [Sample(t0 + 5.0 + i * 0.1, 4.0) for i in range(7)]
        store.add_power_samples("pi-1", "um25c", later)
        store.flush()
        ((_, _, t_s, *_),) = follower.poll()[0]["power"]
        assert t_s == [s.t_host_s for s in later]

        summary = follower.summary()
        (job,) = summary["jobs"]
        (figure,) = job["energy"]
        t = np.array([t0 + i * 0.1 for i in range(50)] + [t0 + 5.0 + i * 0.1 for i in range(7)])
        w = np.array([3.0 + i % 5 for i in range(50)] + [4.0] * 7)
        # the work so far: from the end of setup to the meter's latest sample
        so_far = PhaseWindow("pi-1", "job-a", 1, "job", 0, t0 + 0.5, t[-1])
        expected = figure_for(t, w, so_far, idle=None, gaps=[],
                              accuracy=unknown_meter("um25c").accuracy, clock=None)
        assert figure["so_far"] and figure["energy_j"] == pytest.approx(expected.energy_j)
        assert (figure["energy_lo_j"], figure["energy_hi_j"]) == pytest.approx(
            (expected.energy_lo_j, expected.energy_hi_j))
        assert summary["devices"][0]["category"] == "running"
        assert not follower.run_finished()
        follower.close()
    finally:
        store.close()


def test_store_problems_are_readable_messages(tmp_path):
    with pytest.raises(StoreProblem, match="no such run directory"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "pending").mkdir()
    with pytest.raises(StoreProblem, match=r"missing run\.sqlite"):
        open_store(tmp_path / "pending")
    (tmp_path / "pending" / "run.sqlite").write_bytes(b"")
    with pytest.raises(StoreProblem, match="empty"):
        open_store(tmp_path / "pending")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.sqlite").write_bytes(b"not a database, just text" * 100)
    with pytest.raises(StoreProblem, match="not a readable run store"):
        open_store(tmp_path / "junk")
    make_old_store(tmp_path / "old")
    with pytest.raises(StoreProblem, match=f"schema version 0 is older .*\\({SCHEMA_VERSION}\\)"):
        open_store(tmp_path / "old")
    make_newer_store(tmp_path / "newer")
    with pytest.raises(StoreProblem, match=f"version {SCHEMA_VERSION + 1} is newer"):
        open_store(tmp_path / "newer")


def make_old_store(run_dir: Path) -> None:
    """A store from before schema versioning: samples, no schema_version table."""
    run_dir.mkdir(parents=True)
    db = sqlite3.connect(run_dir / "run.sqlite")
    db.execute("CREATE TABLE power_samples (device TEXT, t_host_s REAL, power_w REAL)")
    db.execute("INSERT INTO power_samples VALUES ('pi-1', 1.0, 2.0)")
    db.commit()
    db.close()


def make_newer_store(run_dir: Path) -> None:
    RunStore.create(run_dir).close()
    db = sqlite3.connect(run_dir / "run.sqlite")
    db.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()


def test_stream_and_run_list_report_each_problem_and_the_good_run(tmp_path):
    runs = tmp_path / "runs"
    (runs / "pending").mkdir(parents=True)
    (runs / "empty").mkdir()
    (runs / "empty" / "run.sqlite").write_bytes(b"")
    make_old_store(runs / "old")
    store = write_run(runs / "good", time.time() - 5)
    server = start_dashboard(runs, port=0)
    try:
        base = server.base_url
        assert server.url == base + "/"
        status, page, _ = get(base + "/")
        assert status == 200
        assert "missing run.sqlite" in page and "schema version 0 is older" in page
        assert "/run/good/" in page and "running 1" in page
        for run, message in [
            ("pending", "missing run.sqlite"),
            ("empty", "the run store is empty"),
            ("old", "schema version 0 is older"),
        ]:
            events = read_stream(f"{base}/run/{run}/stream", until="problem")
            assert events[-1][0] == "problem" and message in events[-1][1]["message"], run
        events = read_stream(f"{base}/run/good/stream", until="summary")
        names = [name for name, _ in events]
        assert names == ["hello", "rows", "summary"], names
        assert len(events[1][1]["power"][0][2]) == 50
        assert events[2][1]["devices"][0]["name"] == "pi-1"
        status, page, _ = get(base + "/run/good/")
        assert status == 200 and "/static/dashboard.js" in page
        assert get(base + "/static/dashboard.js")[0] == 200
        for path in ("/run/nope/", "/run/../", "/static/..%2Fserver.py", "/static/server.py"):
            assert get(base + path)[0] == 404, path
        # without a token only loopback Host names are answered (no DNS rebinding)
        assert get(base + "/", {"Host": f"evil.example:{server.server_address[1]}"})[0] == 401
        assert get(base + "/", {"Host": f"localhost:{server.server_address[1]}"})[0] == 200
    finally:
        server.stop()
        store.close()


def test_missing_runs_directory_is_a_page_not_an_error(tmp_path):
    with start_dashboard(tmp_path / "no-runs-here", port=0) as server:  # as `run --dashboard`
        status, page, _ = get(server.url)
        assert status == 200 and "no-runs-here: no such directory" in page
    with pytest.raises(urllib.error.URLError):
        get(server.url)  # stopped on leaving the block


def test_binding_beyond_loopback_needs_a_token_checked_on_every_request(tmp_path):
    store = write_run(tmp_path / "run", time.time() - 5)
    with pytest.raises(HarnessUsageError, match=r"--host: .*give --token"):
        start_dashboard(tmp_path / "run", host="0.0.0.0", port=0)
    # 127.0.0.2 is loopback on Linux but not the default address: the token rule applies
    server = start_dashboard(tmp_path / "run", host="127.0.0.2", port=0, token="s3cret-token")
    try:
        base = server.base_url
        assert server.url == f"{base}/run/run/?token=s3cret-token"  # one run: its page
        paths = ("/", "/run/run/", "/run/run/stream", "/static/dashboard.js", "/api/runs")
        for path in paths:
            assert get(base + path)[0] == 401, path
            assert get(base + path + "?token=wrong")[0] == 401, path
            assert get(base + path, {"Authorization": "Bearer wrong"})[0] == 401, path
        status, _, headers = get(base + "/?token=s3cret-token")
        assert status == 200 and "harness_dashboard_token=s3cret-token" in headers["Set-Cookie"]
        cookie = {"Cookie": "harness_dashboard_token=s3cret-token"}
        for path in paths[:2] + paths[3:]:
            assert get(base + path, cookie)[0] == 200, path
            assert get(base + path, {"Authorization": "Bearer s3cret-token"})[0] == 200, path
        req = urllib.request.Request(base + "/run/run/stream", headers=cookie)
        with urllib.request.urlopen(req, timeout=10) as response:
            assert response.status == 200 and response.readline() == b"retry: 2000\n"
    finally:
        server.stop()
        store.close()


def test_cli_refuses_a_public_host_without_a_token(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HARNESS_DASHBOARD_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-m", "harness", "dashboard", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --host: binding to '0.0.0.0' exposes the run to the network; give --token too"
    )
