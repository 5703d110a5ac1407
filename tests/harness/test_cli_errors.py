"""One line, never a traceback: damaged stores, files where directories belong, noisy SSH.

Each case runs the real `harness` command line in a child process against real files
(an SQLite store truncated, overwritten with random bytes, missing a table, from a newer
schema) or a real TCP server that speaks broken SSH.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.exit_codes import ExitStatus
from harness.store import EventRecord, PlannedJob, RunStore

REPO = Path(__file__).resolve().parents[2]


def harness(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _store(run_dir: Path) -> Path:
    store = RunStore.create(run_dir).start()
    store.add_jobs([PlannedJob("j", 0, "train", "standard", "mlp", "digits", 10, 1, None, 0,
                               0, (), {"job_id": "j"})])
    store.add_events([EventRecord("d", "j", 1, i, "x" * 200, time.time(), seq=i, kind="step")
                      for i in range(5000)])
    store.close()
    store.write_manifest({"run_id": run_dir.name, "inventory": {"path": "/nowhere"}})
    return run_dir


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    good = _store(root / "good")
    runs = {}
    for name in ("garbage", "truncated", "dropped", "newer"):
        shutil.copytree(good, root / name)
        runs[name] = root / name
    db = runs["garbage"] / "run.sqlite"
    db.write_bytes(os.urandom(db.stat().st_size))
    os.truncate(runs["truncated"] / "run.sqlite", (good / "run.sqlite").stat().st_size // 3)
    with sqlite3.connect(runs["dropped"] / "run.sqlite") as conn:
        conn.execute("DROP TABLE phases")
    with sqlite3.connect(runs["newer"] / "run.sqlite") as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 0)")
    return runs


def _rows(run_dir: Path) -> int | bytes:
    """The events a readable store holds; the raw bytes of one that is not."""
    try:
        conn = sqlite3.connect(f"{(run_dir / 'run.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return (run_dir / "run.sqlite").read_bytes()


EXPECTED = {
    "garbage": "file is not a database",
    "truncated": "database disk image is malformed",
    "dropped": "phases",
    "newer": "schema version 999 is newer than",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["report", "export", "compare", "resume"])
def test_damaged_stores_get_one_line(damaged, tmp_path, kind, command):
    run = str(damaged[kind])
    argv = {
        "report": ["report", run, "--no-model", "--out", str(tmp_path / "r")],
        "export": ["export", run, "--format", "csv", "--out", str(tmp_path / "e")],
        "compare": ["compare", run, run],
        "resume": ["run", "--resume", run],
    }[command]
    before = _rows(damaged[kind])
    result = harness(*argv, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if kind == "dropped" and command in ("report", "compare"):
        # the store reader reads what is there: report says what is missing, compare finds
        # nothing to compare; either way no traceback
        assert result.returncode in (0, ExitStatus.USAGE), result.stderr[-2000:]
    else:
        assert result.returncode in (ExitStatus.ERROR, ExitStatus.USAGE), result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and EXPECTED[kind] in lines[0], result.stderr[-2000:]
    assert _rows(damaged[kind]) == before  # refused: nothing changed, nothing lost


@pytest.mark.parametrize("command", ["report", "export"])
def test_out_that_is_a_file(damaged, tmp_path, command):
    target = tmp_path / "taken"
    target.write_text("mine")
    extra = ["--no-model"] if command == "report" else []
    result = harness(command, str(damaged["dropped"].parent / "good"), "--out", str(target),
                     *extra, cwd=tmp_path)
    assert result.returncode == ExitStatus.USAGE, result.stderr
    assert result.stderr.strip() == f"error: --out: {target} is a file, not a directory"
    assert target.read_text() == "mine"


def _broken_ssh_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                client.sendall(b"SSH-2.0-broken\r\n" + b"\x00\xff" * 64)
                client.recv(100)
            except OSError:
                pass
            client.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_connection_retries_print_no_paramiko_traceback(tmp_path):
    server, port = _broken_ssh_server()
    try:
        (tmp_path / "inventory.yaml").write_text(
            f"devices:\n  - name: broken\n    host: 127.0.0.1\n    port: {port}\n"
            f"    connect_retries: 2\n    retry_backoff_s: 0.1\n"
            f"    known_hosts: {tmp_path / 'known_hosts'}\n"
        )
        result = harness("devices", "check", "--devices", "inventory.yaml", cwd=tmp_path)
    finally:
        server.close()
    assert result.returncode == ExitStatus.PARTIAL, result.stderr
    assert "Traceback" not in result.stderr and "Exception (client)" not in result.stderr
    assert "cannot connect to 127.0.0.1" in " ".join(result.stderr.split())
