"""One harness at a time in a run directory: an OS-level lock on `RUN_DIR/run.lock`.

`harness run` (new or `--resume`) holds an exclusive `flock` on the file for as long
as it runs; a second process on the same directory is refused at once, with the
holder's pid and start time. The kernel releases the lock when the holder dies, even
by SIGKILL, so a crashed run never needs a hand-removed lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from harness.errors import HarnessError

LOCK_NAME = "run.lock"


class RunDirBusy(HarnessError):
    """Another harness process holds the run directory."""


class RunDirLock:
    """The held lock; `release()` (or the process ending) frees it."""

    def __init__(self, run_dir: Path, handle: int) -> None:
        self.run_dir = run_dir
        self._fd: int | None = handle

    @classmethod
    def acquire(cls, run_dir: Path) -> RunDirLock:
        """Lock `run_dir` (which must exist) or raise `RunDirBusy` naming the holder."""
        path = Path(run_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{run_dir}: another harness is running this run ({holder}); wait for it to "
                "end or stop it (Ctrl-C) first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since_s": time.time()}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return cls(Path(run_dir), fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record["since_s"])))
        return f"pid {int(record['pid'])} on {record['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
