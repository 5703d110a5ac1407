"""Helpers for tests that watch a `harness run` subprocess write its store."""

from __future__ import annotations

import sqlite3
from pathlib import Path


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
