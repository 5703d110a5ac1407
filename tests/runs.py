"""Helpers for tests that run `harness run` and watch it write its store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

# The smallest whole run: one standard mlp job of two steps on the bundled digits, no idle
# baseline or cooldown.
TINY_PLAN = """\
idle_baseline_s: 0
cooldown_s: 0
datasets: {digits: {}}
matrix:
  - methods: [standard]
    models: [mlp]
    datasets: [digits]
    epochs: 1
    max_steps: 2
"""


def table_ready(db_path: Path) -> bool:
    """True once the harness has created the schema (the file exists a moment before)."""
    db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return (
            db.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is not None
        )
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()
